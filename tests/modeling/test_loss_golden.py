"""The composed training forward against a committed golden (tools/make_loss_golden.py).

configs/tiny.py on the first coco_sample training batch with fixed seeds: the six loss terms and
the two counters. The golden was made by the recipe before the architecture refactor and is
reproduced bit for bit on the machine that made it (rewritten once, for the reference's mask
predictor init: see the script); the tolerance allows for another CPU's
float rounding only. A change of the sampling order, of ground truth as proposals, of the mask
slots or of a normalisation moves a counter or a term by far more.
"""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / 'tests' / 'modeling' / 'goldens' / 'tiny_losses.json'


def _tool():
  spec = importlib.util.spec_from_file_location('make_loss_golden',
                                                ROOT / 'tools' / 'make_loss_golden.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tiny_losses_match_the_golden(sample_data_dir):
  golden = json.loads(GOLDEN.read_text())['values']
  values = _tool().compute_losses(sample_data_dir)
  assert values['image_ids'] == golden['image_ids']
  assert values['num_positive_anchors'] == golden['num_positive_anchors']
  assert values['num_foreground_rois'] == golden['num_foreground_rois']
  for key in ('rpn_score_loss', 'rpn_box_loss', 'fast_rcnn_class_loss', 'fast_rcnn_box_loss',
              'mask_loss', 'total_loss'):
    assert values[key] == pytest.approx(golden[key], rel=2e-5, abs=1e-6), key
