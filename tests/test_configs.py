"""Tests of the configs and their validation (maskrcnn_jax/configs.py)."""

import dataclasses
import pathlib

import pytest

from maskrcnn_jax import configs, settings

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def _reference():
  return configs.load_config(CONFIG_DIR / 'coco_r50.py')


def test_reference_config_carries_the_reference_defaults():
  c = _reference()
  assert c.data.image_size == (832, 1344)
  assert c.model.num_classes == 91
  assert (c.model.min_level, c.model.max_level, c.model.fpn_channels) == (2, 6, 256)
  assert c.model.anchors.anchor_scale == 8.0
  assert c.model.anchors.aspect_ratios == ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
  assert (c.model.rpn.positive_overlap, c.model.rpn.negative_overlap) == (0.7, 0.3)
  assert (c.model.rpn.batch_size_per_image, c.model.rpn.fg_fraction) == (256, 0.5)
  assert (c.model.rpn.train_pre_nms_topk, c.model.rpn.train_post_nms_topk) == (2000, 1000)
  assert (c.model.rpn.test_pre_nms_topk, c.model.rpn.test_post_nms_topk) == (1000, 1000)
  assert (c.model.roi.batch_size_per_image, c.model.roi.fg_fraction) == (512, 0.25)
  assert c.model.roi.box_weights == (10.0, 10.0, 5.0, 5.0)
  assert (c.model.roi.pooler_size, c.model.mask.pooler_size, c.model.mask.resolution) == (7, 14, 28)
  assert c.model.rpn.huber_delta == pytest.approx(1 / 9)
  # ArgMaxMatcher(force_match_for_each_row=True): one forced anchor per ground truth, no ties.
  assert c.model.rpn.allow_low_quality_matches and not c.model.rpn.low_quality_ties
  assert c.model.rpn.box_loss_normalizer == 'positives_per_level'
  assert c.model.roi.box_loss_normalizer == 'foreground'
  assert (c.model.test.detections_per_image, c.model.test.nms_threshold) == (100, 0.5)
  assert (c.train.learning_rate, c.train.warmup_steps, c.train.total_steps) == (2.5e-3, 1000,
                                                                                938240)
  assert c.train.learning_rate_steps == (480000, 640000)
  assert (c.train.momentum, c.train.l2_weight_decay) == (0.9, 1e-4)
  assert c.train.loss_scale_initial == 2 ** 12
  assert c.data.gt_mask_size == 112 and c.data.max_instances == 100


def test_tiny_config_is_valid():
  c = configs.load_config(CONFIG_DIR / 'tiny.py')
  assert c.data.image_size == (128, 128)


@pytest.mark.parametrize('key,value,message', [
    ('data.image_size', (800, 1344), 'multiples of 2\\*\\*model.max_level = 64'),
    ('model.precision', 'float64', 'model.precision'),
    ('model.backbone.depth', 42, 'model.backbone.depth'),
    ('model.rpn.negative_overlap', 0.8, 'model.rpn.negative_overlap'),
    ('train.warmup_steps', 10 ** 7, 'train.warmup_steps'),
    ('train.learning_rate_steps', (5, 3), 'train.learning_rate_steps'),
    ('model.mask.resolution', 27, 'model.mask.resolution'),
    ('model.anchors.aspect_ratios', (1.0, 2.0), 'model.anchors.aspect_ratios'),
])
def test_validation_names_the_key(key, value, message):
  c = _reference()
  node = c
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(configs.ConfigError, match=message):
    configs.validate_config(c)


def test_missing_key_and_missing_file():
  c = _reference()
  del c.model['rpn']
  with pytest.raises(configs.ConfigError, match="'model.rpn' is missing"):
    configs.validate_config(c)
  with pytest.raises(configs.ConfigError, match='not found'):
    configs.load_config(CONFIG_DIR / 'nope.py')


def test_unused_key_is_an_error():
  c = _reference()
  c.model.mask.gt_margin = 2  # the margin belongs to the batch contract (data.spec.MASK_PADDING)
  with pytest.raises(configs.ConfigError, match="model.mask.'gt_margin'.*not read"):
    configs.validate_config(c)


def test_settings_are_the_config_sections():
  """Every field of a model settings class is read from the key of its name, nothing else."""
  c = _reference()
  s = settings.ModelSettings.from_config(c.model)
  for name, cls in settings.SECTIONS.items():
    section = getattr(s, name)
    assert isinstance(section, cls)
    assert set(c.model[name].keys()) == {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
      value = c.model[name][f.name]
      assert getattr(section, f.name) == (tuple(value) if isinstance(value, list) else value)
  c.model.rpn.fg_fraction = 1.5
  with pytest.raises(configs.ConfigError, match="'model.rpn.fg_fraction' = 1.5: must be <= 1.0"):
    settings.ModelSettings.from_config(c.model)


def test_mode_table_names_the_mode_key():
  from maskrcnn_jax.train import loop  # pylint: disable=import-outside-toplevel  # JAX
  c = _reference()
  assert set(loop.MODES) == {'train', 'eval', 'train_and_eval', 'benchmark_train',
                             'benchmark_inference'}
  assert loop.check_mode(c) is loop.MODES['train_and_eval']
  c.mode = 'predict'
  with pytest.raises(configs.ConfigError, match="'mode' = 'predict': must be one of"):
    loop.check_mode(c)
