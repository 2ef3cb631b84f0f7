r"""Export a trained model as one file that runs with JAX alone (`jax.export`), and load it back.

  python -m maskrcnn_jax.export --workdir=W [--step=N] --out=model.jax [--batch_size=1] \
    [--platforms=cpu,cuda]
  python -m maskrcnn_jax.export --torchvision=maskrcnn_r50_coco.npz \
    --config=configs/torchvision_r50.py --out=model.jax

The artifact is the inference step (`maskrcnn_jax.train.step.infer_step`: normalisation, model,
detection post-processing) at the config's canvas ``data.image_size`` with the variables baked in
as constants, so its only inputs are the canvas batch the `Predictor` builds:

  FILE        `jax.export.Exported.serialize()` bytes
  FILE.json   what it takes and gives (`describe`): shapes, dtypes, canvas, resize rule, pixel
              statistics, class index -> category id and name, platforms, versions, the config

Anyone with jax runs it without this package (docs/export.md):

  exported = jax.export.deserialize(open('model.jax', 'rb').read())
  out = exported.call(images, image_sizes)   # uint8 (B, H, W, 3), int32 (B, 2) -> dict of
                                             # boxes, classes, masks, scores, valid

`load(FILE)` gives an `ExportedPredictor`: the same ``predict`` as `maskrcnn_jax.inference.
Predictor` (any image size in, boxes in original pixels and pasted masks out), run by the artifact.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from maskrcnn_jax import huge_pages
from maskrcnn_jax import files
from maskrcnn_jax import inference
from maskrcnn_jax import model_flags

FORMAT = 'maskrcnn_jax.export/1'
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # the platform names jax.export lowers for
INPUT_NAMES = ('images', 'image_sizes')
OUTPUT_DOCS = {
    'boxes': 'xyxy, pixels of the canvas; divide by the image\'s resize scale for its own pixels',
    'classes': 'class index (1 .. num_classes - 1; 0, the background, is never output): see '
               '"classes" for category ids and names',
    'masks': 'per-detection mask probabilities in box coordinates (M x M over the box); paste '
             'into the box and threshold at 0.5',
    'scores': 'class probability, in descending order per image',
    'valid': 'False for the unused detection slots (their other fields are padding)',
}


class ExportError(ValueError):
  """A bad export request (platforms) or an artifact this process cannot run."""


def parse_platforms(text: str) -> tuple[str, ...]:
  """'cpu,cuda' -> ('cpu', 'cuda'): known names (`PLATFORMS`), no repeats, at least one."""
  names = tuple(p.strip().lower() for p in str(text).split(',') if p.strip())
  unknown = [p for p in names if p not in PLATFORMS]
  if unknown or not names:
    raise ExportError(f'--platforms={text}: give one or more of {",".join(PLATFORMS)} '
                      f'(comma-separated){"; unknown: " + ",".join(unknown) if unknown else ""}')
  if len(set(names)) != len(names):
    raise ExportError(f'--platforms={text}: a platform is repeated')
  return names


def canvas_function(predictor: inference.Predictor):
  """(images (B, H, W, 3) uint8, image_sizes (B, 2) int32) -> the inference step's dict, with the
  predictor's variables closed over (they become constants of the exported module)."""
  variables = predictor.variables

  def detect(images, image_sizes):
    return predictor.infer_step(variables, {'images': images, 'image_sizes': image_sizes})

  return detect


def export_predictor(predictor: inference.Predictor, platforms: Sequence[str] = ('cpu',)
                     ) -> jax.export.Exported:
  """`jax.export` of the predictor's inference step at its canvas and batch size.

  `platforms`: names of `PLATFORMS` (a sequence, or one comma-separated string).
  """
  platforms = parse_platforms(platforms if isinstance(platforms, str) else ','.join(platforms))
  b, (h, w) = predictor.batch_size, predictor.canvas
  args = (jax.ShapeDtypeStruct((b, h, w, 3), np.uint8), jax.ShapeDtypeStruct((b, 2), np.int32))
  return jax.export.export(jax.jit(canvas_function(predictor)), platforms=platforms)(*args)


def _arrays(avals, names) -> list[dict[str, Any]]:
  return [{'name': n, 'shape': [int(d) for d in a.shape], 'dtype': str(a.dtype)}
          for n, a in zip(names, avals)]


def output_names(exported: jax.export.Exported) -> tuple[str, ...]:
  """The outputs' names in the order of ``exported.out_avals`` (the dict's sorted keys)."""
  index = jax.tree_util.tree_unflatten(exported.out_tree, range(len(exported.out_avals)))
  return tuple(sorted(index, key=index.get))


def describe(predictor: inference.Predictor, exported: jax.export.Exported,
             source: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The JSON description written beside an artifact (fields in docs/export.md)."""
  config = predictor.config
  num_classes = int(config.model.num_classes)
  classes = []
  for index in range(1, num_classes):
    category = predictor.class_to_category.get(index, index)
    classes.append({'index': index, 'category_id': category,
                    'name': predictor.category_names.get(category)})
  outputs = _arrays(exported.out_avals, output_names(exported))
  for entry in outputs:
    entry['doc'] = OUTPUT_DOCS.get(entry['name'], '')
  inputs = _arrays(exported.in_avals, INPUT_NAMES)
  inputs[0]['doc'] = ('RGB pixels, each image resized into the canvas (see "resize") at the top '
                      'left, zeros elsewhere; normalised inside the artifact')
  inputs[1]['doc'] = '(height, width) of each resized image on the canvas; (0, 0) for an empty slot'
  h, w = predictor.canvas
  return {
      'format': FORMAT,
      'call': 'jax.export.deserialize(bytes).call(images, image_sizes) -> dict of the outputs',
      'platforms': list(exported.platforms),
      'jax_version': jax.__version__,
      'calling_convention_version': int(exported.calling_convention_version),
      'batch_size': predictor.batch_size,
      'canvas': [h, w],
      'inputs': inputs,
      'outputs': outputs,
      'resize': (f'scale = min({h} / height, {w} / width); the image resized (PIL bilinear, '
                 f'uint8) to (min({h}, max(1, round(height * scale))), min({w}, max(1, '
                 'round(width * scale)))); original pixels = canvas pixels / scale'),
      'normalization': {'inside': True, 'pixel_mean': [float(v) for v in config.data.pixel_mean],
                        'pixel_std': [float(v) for v in config.data.pixel_std],
                        'formula': '(images / 255 - pixel_mean) / pixel_std inside image_sizes, '
                                   '0 outside'},
      'precision': str(config.model.precision),
      'inference_products': str(config.model.inference_products),
      'classes': classes,
      'categories': [{'id': k, 'name': v} for k, v in sorted(predictor.category_names.items())],
      'source': dict(source or {}),
      'config': json.loads(config.to_json_best_effort()),
  }


def description_path(path: str) -> str:
  """Where the JSON description of the artifact at `path` lives: ``path + '.json'``."""
  return os.fspath(path) + '.json'


def _write(path: str, data: bytes) -> None:
  with files.atomic_open(path, 'wb') as f:
    f.write(data)


def save(predictor: inference.Predictor, path: str, platforms: Sequence[str] = ('cpu',),
         source: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Exports `predictor` to `path` (serialized bytes) and `description_path(path)` (JSON).

  Returns the description. `source` (e.g. {'workdir': W, 'step': N}) is recorded in it.
  """
  exported = export_predictor(predictor, platforms)
  description = describe(predictor, exported, source)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  _write(os.fspath(path), bytes(exported.serialize()))
  _write(description_path(path), json.dumps(description, indent=1).encode())
  return description


class ExportedPredictor(inference.CanvasPredictor):
  """An exported artifact with `Predictor`'s ``predict``/``detections`` (`load` builds one).

  Attributes: ``exported`` (the `jax.export.Exported`), ``description`` (its JSON), ``canvas``,
  ``batch_size``, ``class_to_category``, ``category_names``.
  """

  def __init__(self, exported: jax.export.Exported, description: Mapping[str, Any]):
    classes = description.get('classes', [])
    super().__init__(description['canvas'], description['batch_size'],
                     {c['index']: c['category_id'] for c in classes},
                     {c['category_id']: c['name'] for c in classes if c.get('name') is not None})
    self.exported = exported
    self.description = dict(description)

  def infer_canvas(self, images: np.ndarray, image_sizes: np.ndarray) -> Mapping[str, Any]:
    # `Exported.call` compiles once per process and caches.
    return self.exported.call(np.asarray(images, np.uint8), np.asarray(image_sizes, np.int32))


def load(path: str) -> ExportedPredictor:
  """The artifact at `path` and its description, ready to ``predict`` on this process's platform.

  Raises FileNotFoundError naming a missing file, ExportError when the description is of another
  format version or the artifact was not exported for this platform (its platforms are named).
  """
  path = os.fspath(path)
  for name in (path, description_path(path)):
    if not os.path.isfile(name):
      raise FileNotFoundError(f'{name} not found: export with python -m maskrcnn_jax.export')
  with open(description_path(path)) as f:
    description = json.load(f)
  if description.get('format') != FORMAT:
    raise ExportError(f'{description_path(path)}: format {description.get("format")!r}, this '
                      f'version reads {FORMAT!r}')
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  here = jax.export.default_export_platform()
  if here not in exported.platforms:
    raise ExportError(f'{path} was exported for {",".join(exported.platforms)}; this process runs '
                      f'on {here}: export again with --platforms={",".join(exported.platforms)},'
                      f'{here}')
  return ExportedPredictor(exported, description)


# ------------------------------------------------------------------------------ command line
def _define_flags():
  """The command's flags, defined only when it runs (importing `load` defines none)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  model_flags.define_flags()
  flags.DEFINE_string('out', None, 'The artifact to write; its description goes to OUT.json.')
  flags.DEFINE_integer('batch_size', 1, 'Images per call of the artifact (a fixed shape).')
  flags.DEFINE_string('platforms', 'cpu', f'Comma-separated, of {",".join(PLATFORMS)}: the '
                      'artifact runs on each (lowered here, no such device needed).')
  flags.mark_flags_as_required(['out'])


def main(argv) -> int:
  """Exports the model of --workdir or --torchvision to --out (see the module docstring)."""
  del argv
  from absl import app  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  model_flags.check_flags(FLAGS)
  if FLAGS.torchvision and FLAGS.step is not None:
    raise app.UsageError('--step is for --workdir')
  if FLAGS.batch_size < 1:
    raise app.UsageError(f'--batch_size={FLAGS.batch_size}: must be at least 1')
  try:
    platforms = parse_platforms(FLAGS.platforms)
  except ExportError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  from maskrcnn_jax import configs  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax import weights  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  try:
    predictor = model_flags.load_predictor(FLAGS, FLAGS.batch_size)
    source = ({'workdir': os.path.abspath(FLAGS.workdir), 'step': predictor.step}
              if FLAGS.workdir else {'torchvision': os.path.abspath(FLAGS.torchvision)})
  except (FileNotFoundError, checkpoint.CorruptCheckpointError, configs.ConfigError,
          weights.WeightImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  try:
    description = save(predictor, FLAGS.out, platforms, source)
  except OSError as e:
    print(f'error: cannot write --out={FLAGS.out}: {e}', file=sys.stderr)
    return 1
  size = os.path.getsize(FLAGS.out)
  shapes = ', '.join(f'{a["name"]} {a["dtype"]}{a["shape"]}' for a in description['inputs'])
  print(f'exported {os.path.abspath(FLAGS.out)} ({size / 2**20:.1f} MiB, platforms '
        f'{",".join(description["platforms"])}; inputs {shapes}) and '
        f'{os.path.abspath(description_path(FLAGS.out))}')
  return 0


if __name__ == '__main__':
  huge_pages.restart_with_huge_pages()
  from absl import app as _app  # pylint: disable=import-outside-toplevel
  _define_flags()
  _app.run(main)
