"""Use a trained model: `Predictor` turns images of any size into instances in their own pixels.

  from maskrcnn_jax.inference import Predictor
  predictor = Predictor.from_workdir('/tmp/maskrcnn_shapes_demo/work')   # or from_torchvision
  [record] = predictor.predict(['image.png'], score_threshold=0.5)
  record['boxes'], record['scores'], record['category_ids'], record['masks']  # (N, 4) (N,) ...

The images go through the evaluation path exactly: the same resize into ``config.data.image_size``
(`maskrcnn_jax.data.preprocess.resize_to_canvas`), the same inference step
(`maskrcnn_jax.train.step.infer_step`), the same box rescaling, clipping and mask pasting
(`maskrcnn_jax.evaluation.coco`), so a record holds what evaluation scores. Batches are padded to
``batch_size`` images, so one compiled function serves every call (the first call compiles).
`CanvasPredictor` holds that resize, batching and post-processing around any function of a canvas
batch; `Predictor` runs the model, `maskrcnn_jax.export.ExportedPredictor` an exported artifact.

``from_workdir`` rebuilds the model from the workdir's recorded ``config.json`` (keys added to the
project since are taken from today's defaults, with a log line) and restores only its parameters
and batch statistics, so no training flag has to be repeated. Category ids and names come from
the workdir's ``categories.json`` (written when training starts) or, failing that, from the
prepared dataset's metadata; without either, category id = class index.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageOps

from maskrcnn_jax import configs as config_lib
from maskrcnn_jax import modeling
from maskrcnn_jax.data import preprocess
from maskrcnn_jax.evaluation import coco
from maskrcnn_jax.train import checkpoint as ckpt
from maskrcnn_jax.train import experiment
from maskrcnn_jax.train import step as step_lib

CATEGORIES_FILE = 'categories.json'
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'coco_r50.py'


# ------------------------------------------------------------------------------ workdirs
def recorded_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (``<workdir>/config.json``), validated.

  Keys the project added after the run was made are filled from configs/coco_r50.py's defaults
  (when that file is present) and logged; keys the project no longer reads are dropped, logged.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a training workdir?')
  with open(path) as f:
    recorded = json.load(f)
  if DEFAULT_CONFIG.is_file():
    config = config_lib.import_config_module(DEFAULT_CONFIG).get_config()
    flat = config_lib.flatten(recorded)
    known = set(config_lib.flatten(config.to_dict()))
    added = sorted(known - set(flat))
    dropped = sorted(set(flat) - known)
    if added:
      logging.info('%s predates config keys %s: using their defaults', path, added)
    if dropped:
      logging.info('%s has keys the code no longer reads, ignored: %s', path, dropped)
    config.update_from_flattened_dict({k: _as_config_value(v) for k, v in flat.items()
                                       if k in known})
  else:
    config = ml_collections.ConfigDict(recorded)
  config_lib.validate_config(config)
  return config


def _as_config_value(value):
  """JSON lists back to the tuples the configs use (nested for the anchors' aspect ratios)."""
  if isinstance(value, list):
    return tuple(_as_config_value(v) for v in value)
  return value


def write_categories(workdir: str, metadata: Mapping[str, Any]) -> None:
  """Records the dataset's category table in the workdir (read by `Predictor.from_workdir`)."""
  table = {'categories': [{'id': int(c['id']), 'name': str(c.get('name', c['id']))}
                          for c in metadata.get('categories', [])],
           'class_index_to_category_id': {str(k): int(v) for k, v in
                                          coco.class_to_category_map(metadata).items()}}
  with open(os.path.join(workdir, CATEGORIES_FILE), 'w') as f:
    json.dump(table, f, indent=1)


def _workdir_categories(workdir: str, config) -> Mapping[str, Any] | None:
  path = os.path.join(workdir, CATEGORIES_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  try:  # the prepared dataset, if it is still where the run found it (imports TensorFlow)
    return experiment.build_source(config, config.data.eval_split).metadata
  except Exception as e:  # pylint: disable=broad-except  # names are optional
    logging.info('no %s in %s and the dataset is not readable (%s): category id = class '
                 'index, no names', CATEGORIES_FILE, workdir, str(e).splitlines()[0][:200])
    return None


# ------------------------------------------------------------------------------ images
def load_image(image) -> Image.Image:
  """A path (EXIF orientation applied), a PIL image or a uint8 HxWx3 array -> RGB PIL image."""
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as opened:
      return ImageOps.exif_transpose(opened).convert('RGB')
  if isinstance(image, Image.Image):
    return image if image.mode == 'RGB' else image.convert('RGB')
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
    raise ValueError(f'an image array must be uint8 (H, W, 3), got {array.dtype} {array.shape}')
  return Image.fromarray(array)


# ------------------------------------------------------------------------------ predictors
class CanvasPredictor:
  """Images of any size -> instances in their own pixels, around a detections function at a fixed
  canvas: the resize and pad into the canvas, the padding of batches to ``batch_size``, the boxes
  back in original pixels and the pasted masks. `Predictor` (a model and its variables) and
  `maskrcnn_jax.export.ExportedPredictor` (a serialized artifact) differ only in
  `infer_canvas`.

  Args:
    canvas: (H, W) the detections function takes.
    batch_size: images per call of the detections function.
    class_to_category: class index -> category id (identity for missing indices).
    category_names: category id -> name (None for missing ids).
  """

  def __init__(self, canvas: Sequence[int], batch_size: int, class_to_category: Mapping[int, int],
               category_names: Mapping[int, str]):
    self.canvas = tuple(int(v) for v in canvas)
    self.batch_size = int(batch_size)
    self.class_to_category = {int(k): int(v) for k, v in class_to_category.items()}
    self.category_names = {int(k): str(v) for k, v in category_names.items()}

  def infer_canvas(self, images: np.ndarray, image_sizes: np.ndarray) -> Mapping[str, Any]:
    """The detections of one canvas batch: images (B, H, W, 3) uint8, image_sizes (B, 2) int32
    -> boxes (B, D, 4) xyxy canvas pixels, scores (B, D), classes (B, D), masks (B, D, M, M)
    probabilities, valid (B, D) (`maskrcnn_jax.train.step.infer_step`)."""
    raise NotImplementedError

  def predict(self, images, score_threshold: float = 0.5, with_masks: bool = True
              ) -> list[dict[str, Any]]:
    """Instances of each image (one record per image, in order).

    Args:
      images: one image or a sequence of them: paths, PIL images or uint8 (H, W, 3) arrays.
      score_threshold: keep detections scoring at least this.
      with_masks: paste the masks at the original size (the slow part on a CPU).

    Returns:
      Records with ``boxes`` (N, 4) float32 xyxy original pixels (clipped to the image),
      ``scores`` (N,) float32, ``category_ids`` (N,) int64, ``category_names`` (N strings, or
      None where unknown), ``masks`` (N, H, W) bool at the original size (with masks), and
      ``image_size`` (H, W). Detections are in descending score order.
    """
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
      images = [images]
    records = []
    for chunk in _chunks(list(images), self.batch_size):
      records.extend(self._predict_batch([load_image(i) for i in chunk], score_threshold,
                                         with_masks))
    return records

  def canvas_batch(self, pil_images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
    """One batch on the canvas, padded to ``batch_size`` images: images (B, H, W, 3) uint8 (each
    resized into the canvas as evaluation does, top-left, zero padded), image_sizes (B, 2) int32
    (h, w) of each resized image (0 for padding slots), and the host fields image_ids (0),
    original_sizes (B, 2) int32 (height, width), scales (B,) float32, example_valid (B,) bool."""
    b, (h, w) = self.batch_size, self.canvas
    if len(pil_images) > b:
      raise ValueError(f'{len(pil_images)} images for a batch of {b}')
    batch = {'images': np.zeros((b, h, w, 3), np.uint8),
             'image_sizes': np.zeros((b, 2), np.int32),
             'image_ids': np.zeros((b,), np.int64),
             'original_sizes': np.zeros((b, 2), np.int32),
             'scales': np.ones((b,), np.float32),
             'example_valid': np.zeros((b,), bool)}
    for i, image in enumerate(pil_images):
      pixels, scale = preprocess.resize_to_canvas(image, self.canvas)
      batch['images'][i, :pixels.shape[0], :pixels.shape[1]] = pixels
      batch['image_sizes'][i] = pixels.shape[:2]
      batch['original_sizes'][i] = (image.height, image.width)
      batch['scales'][i] = scale
      batch['example_valid'][i] = True
    return batch

  def detections(self, pil_images: Sequence[Image.Image]) -> tuple[dict, dict]:
    """The inference step on one batch: (detections with the batch's leading axis as NumPy, the
    batch's host fields image_ids (0), original_sizes, scales, example_valid)."""
    batch = self.canvas_batch(pil_images)
    out = self.infer_canvas(batch['images'], batch['image_sizes'])
    meta = {k: batch[k] for k in ('image_ids', 'original_sizes', 'scales', 'example_valid')}
    return jax.tree_util.tree_map(np.asarray, jax.device_get(dict(out))), meta

  def _predict_batch(self, pil_images, score_threshold: float, with_masks: bool):
    out, meta = self.detections(pil_images)
    records = []
    for i in range(len(pil_images)):
      h, w = (int(v) for v in meta['original_sizes'][i])
      keep = np.asarray(out['valid'][i], bool) & (out['scores'][i] >= score_threshold)
      boxes = coco.original_boxes(out['boxes'][i], float(meta['scales'][i]), h, w)
      classes = np.asarray(out['classes'][i])[keep]
      ids = np.array([self.class_to_category.get(int(c), int(c)) for c in classes], np.int64)
      record = {'boxes': boxes[keep].astype(np.float32),
                'scores': np.asarray(out['scores'][i])[keep].astype(np.float32),
                'category_ids': ids,
                'category_names': [self.category_names.get(int(c)) for c in ids],
                'image_size': (h, w)}
      if with_masks:
        all_boxes = np.where(keep[:, None], boxes, 0.0).astype(np.float32)  # one compiled shape
        pasted = coco.paste_binary_masks(out['masks'][i], all_boxes, h, w)
        record['masks'] = np.ascontiguousarray(pasted.transpose(2, 0, 1)[keep]).astype(bool)
      records.append(record)
    return records


class Predictor(CanvasPredictor):
  """A model with its variables and category table, for images of any size.

  Args:
    config: the run's config (the model, ``data.image_size``, pixel mean and std).
    variables: {'params', 'batch_stats'} of that model.
    metadata: optional category table: ``categories`` [{id, name}] and
      ``class_index_to_category_id`` (a dataset's metadata or a workdir's categories.json).
    batch_size: images per compiled call (batches are padded to it).
    inference_products: replaces config.model.inference_products ('bfloat16': the CPU's fast
      path, see configs/coco_r50.py); None keeps the config's.
  """

  def __init__(self, config, variables: Mapping[str, Any], *,
               metadata: Mapping[str, Any] | None = None, batch_size: int = 1,
               inference_products: str | None = None):
    if inference_products is not None:  # config.model.inference_products, e.g. from a command
      config = ml_collections.ConfigDict(config.to_dict())
      config.model.inference_products = inference_products
      config_lib.validate_config(config)
    super().__init__(
        config.data.image_size, batch_size,
        (coco.class_to_category_map(metadata) if metadata else
         {k: k for k in range(int(config.model.num_classes))}),
        {int(c['id']): str(c.get('name', c['id'])) for c in (metadata or {}).get('categories', [])})
    self.config = config
    self.model = experiment.build_model(config, inference=True)
    self.variables = jax.device_put(dict(variables))
    # (variables, {'images', 'image_sizes'}) -> detections; `maskrcnn_jax.export` exports it.
    self.infer_step = step_lib.make_infer_step(
        self.model, tuple(config.data.pixel_mean), tuple(config.data.pixel_std),
        modeling.DTYPES[config.model.precision])
    self._infer = jax.jit(self.infer_step)

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, **kwargs) -> 'Predictor':
    """The model of a training workdir at `step` (default: the latest checkpoint)."""
    config = recorded_config(workdir)
    model = experiment.build_model(config)
    abstract = jax.eval_shape(lambda k: modeling.init_variables(
        model, k, tuple(config.data.image_size)), jax.random.PRNGKey(0))
    step, variables = ckpt.restore_variables(workdir, abstract, step)
    logging.info('predictor: %s step %d', workdir, step)
    kwargs.setdefault('metadata', _workdir_categories(workdir, config))
    predictor = cls(config, variables, **kwargs)
    predictor.step = step
    return predictor

  @classmethod
  def from_torchvision(cls, path: str, config, **kwargs) -> 'Predictor':
    """torchvision Mask R-CNN weights (.pth / .npz / .safetensors; `maskrcnn_jax.weights`) in
    the architecture of `config` (e.g. configs/torchvision_r50.py)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.init.torchvision_maskrcnn = str(path)
    config.init.checkpoint = ''  # the weights come from `path` alone
    model = experiment.build_model(config)
    variables = experiment.build_initial_variables(config, model, jax.random.PRNGKey(0))
    return cls(config, variables, **kwargs)

  def infer_canvas(self, images: np.ndarray, image_sizes: np.ndarray) -> Mapping[str, Any]:
    return self._infer(self.variables, {'images': images, 'image_sizes': image_sizes})


def _chunks(items: list, size: int) -> Iterable[list]:
  for start in range(0, len(items), size):
    yield items[start:start + size]
