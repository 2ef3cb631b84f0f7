"""Writes tests/modeling/goldens/tiny_losses.json: the training forward's six loss terms and two
counters for configs/tiny.py on the first coco_sample training batch, under fixed seeds.

The golden guards the composed recipe (anchor labelling, proposal selection, RoI sampling with
ground truth appended, foreground-first mask slots, the per-level RPN normalisation, the loss
weights): a change in any step moves a term or a counter. It was first written by the code
before the architecture refactor (commit 1ae38e2, the recipe inside ``MaskRCNN.losses``) and
reproduced bit for bit after it. It was rewritten once, when the mask predictor's init became the
reference's MSRA fill (``model.mask.predictor_init_std = 0``): with the former normal(0.001)
(``predictor_init_std = 0.001``) this script still gives the previous values exactly, so that
change moved nothing else. It was rewritten a second time when the RPN's low-quality matches
became the reference's (one forced anchor per ground truth, ``model.rpn.low_quality_ties =
False``): ``--override model.rpn.low_quality_ties=True`` gives the previous golden bit for bit,
and only the two RPN terms and the positive-anchor count (35 -> 11) moved. Run from the
repository root:

  .venv/bin/python tools/make_loss_golden.py [--data_dir DIR] [--override KEY=VALUE]

``--data_dir``: a TFDS data_dir with coco_sample prepared (default: prepared into a temporary
directory). The test (tests/modeling/test_loss_golden.py) imports `compute_losses` from here.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import pathlib
import tempfile

import jax
import numpy as np

from maskrcnn_jax.configs import load_config
from maskrcnn_jax.data import pipeline, prepare
from maskrcnn_jax.data.spec import GroundTruth
from maskrcnn_jax.modeling import COUNTER_KEYS, LOSS_KEYS, build_model, init_variables
from maskrcnn_jax.modeling import normalize_images
from maskrcnn_jax.train import experiment

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / 'tests' / 'modeling' / 'goldens' / 'tiny_losses.json'
INIT_SEED, SAMPLING_SEED = 0, 1


def compute_losses(data_dir: str, overrides: dict | None = None) -> dict[str, float | int]:
  """The loss dict of configs/tiny.py on batch 0 (2 images) of coco_sample's training order;
  `overrides`: {dotted config key: value} applied first (e.g. to reproduce an earlier golden)."""
  config = load_config(ROOT / 'configs' / 'tiny.py')
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  config.data.tfds_data_dir = data_dir
  source = pipeline.Source('coco_instances', 'validation', data_dir)
  batch = next(experiment.build_train_iterator(config, 2, source=source, process_index=0,
                                               process_count=1, num_workers=1))
  model = build_model(config.model)
  variables = init_variables(model, jax.random.PRNGKey(INIT_SEED), tuple(config.data.image_size))
  images = normalize_images(batch['images'], batch['image_sizes'], config.data.pixel_mean,
                            config.data.pixel_std)
  out = jax.jit(lambda v, x, s, g, k: model.apply(v, x, s, g, train=True, rngs={'sampling': k}))(
      variables, images, batch['image_sizes'], GroundTruth.from_batch(batch),
      jax.random.PRNGKey(SAMPLING_SEED))
  out = jax.device_get(out)
  result = {k: float(out[k]) for k in LOSS_KEYS}
  result.update({k: int(out[k]) for k in COUNTER_KEYS})
  result['image_ids'] = [int(i) for i in np.asarray(batch['image_ids'])]
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--override', action='append', default=[], metavar='KEY=PYTHON_VALUE',
                      help='print the values with a config override (nothing is written), e.g. '
                      'model.rpn.low_quality_ties=True')
  args = parser.parse_args()
  overrides = {}
  for item in args.override:
    key, value = item.split('=', 1)
    overrides[key] = ast.literal_eval(value)
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir
    if data_dir is None:
      data_dir = tmp
      prepare.prepare(data_dir, manual_dir=str(ROOT / 'tests' / 'data' / 'coco_sample'),
                      show_progress=False)
    values = compute_losses(data_dir, overrides)
  if overrides:
    print(json.dumps(values, indent=1))
    return
  record = {'values': values, 'config': 'configs/tiny.py', 'init_seed': INIT_SEED,
            'sampling_seed': SAMPLING_SEED, 'jax_version': jax.__version__,
            'backend': jax.default_backend(),
            'date': datetime.date.today().isoformat()}
  GOLDEN.write_text(json.dumps(record, indent=1) + '\n')
  print(json.dumps(values, indent=1))


if __name__ == '__main__':
  main()
