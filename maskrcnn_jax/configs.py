"""Loading and validating ml_collections configs.

`validate_config` checks every value the rest of the code relies on and raises `ConfigError`
naming the dotted key at fault (e.g. ``data.image_size``), so that a bad override fails at start-up
rather than deep inside a compiled step.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any, Sequence

import ml_collections

PRECISIONS = ('float32', 'bfloat16', 'float16')
RESNET_DEPTHS = (18, 34, 50, 101)
MODES = ('train', 'eval', 'train_and_eval', 'benchmark_train', 'benchmark_inference')
ANCHOR_CONVENTIONS = ('reference', 'torchvision')


class ConfigError(ValueError):
  """A config value is missing or out of range; the message names the dotted key."""


def load_config(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """Imports a config file (``configs/*.py``), calls its ``get_config(arg)`` and validates it."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f'config file not found: {path}')
  spec = importlib.util.spec_from_file_location(f'_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} has no get_config() function')
  config = module.get_config(arg) if arg is not None else module.get_config()
  validate_config(config)
  return config


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split('.'):
    if part not in node:
      raise ConfigError(f'config key {key!r} is missing')
    node = node[part]
  return node


def _check(condition: bool, key: str, value: Any, requirement: str) -> None:
  if not condition:
    raise ConfigError(f'config key {key!r} = {value!r}: {requirement}')


def _int(config, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
  value = _get(config, key)
  _check(isinstance(value, int) and not isinstance(value, bool), key, value, 'must be an integer')
  if minimum is not None:
    _check(value >= minimum, key, value, f'must be >= {minimum}')
  if maximum is not None:
    _check(value <= maximum, key, value, f'must be <= {maximum}')
  return value


def _float(config, key: str, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float:
  value = _get(config, key)
  _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value,
         'must be a number')
  if low is not None:
    ok = value > low if low_open else value >= low
    _check(ok, key, value, f'must be {">" if low_open else ">="} {low}')
  if high is not None:
    _check(value <= high, key, value, f'must be <= {high}')
  return float(value)


def _choice(config, key: str, choices: Sequence[Any]) -> Any:
  value = _get(config, key)
  _check(value in choices, key, value, f'must be one of {list(choices)}')
  return value


def _sequence(config, key: str, length: int | None = None) -> tuple:
  value = _get(config, key)
  _check(isinstance(value, (tuple, list)), key, value, 'must be a tuple or list')
  if length is not None:
    _check(len(value) == length, key, value, f'must have {length} entries')
  return tuple(value)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the first invalid key of a full (model + data + train) config."""
  _choice(config, 'mode', MODES)
  _int(config, 'seed')
  validate_model_config(config.model)

  max_level = config.model.max_level
  size = _sequence(config, 'data.image_size', 2)
  multiple = 2 ** max_level
  for value in size:
    _check(isinstance(value, int) and value > 0 and value % multiple == 0, 'data.image_size',
           size, f'height and width must be positive multiples of 2**model.max_level = {multiple}')
  _int(config, 'data.max_instances', 1)
  _int(config, 'data.gt_mask_size', 4)
  for key in ('data.num_workers', 'data.prefetch_batches'):
    if key.split('.')[1] in config.data:  # optional: configs predating the input pipeline
      _int(config, key, 0)
  for key in ('data.pixel_mean', 'data.pixel_std'):
    _sequence(config, key, 3)
  _check(all(s > 0 for s in config.data.pixel_std), 'data.pixel_std', config.data.pixel_std,
         'must be positive')

  _int(config, 'train.per_device_batch_size', 1)
  _float(config, 'train.learning_rate', 0.0, low_open=True)
  total = _int(config, 'train.total_steps', 1)
  warmup = _int(config, 'train.warmup_steps', 0)
  _check(warmup < total, 'train.warmup_steps', warmup, f'must be < train.total_steps = {total}')
  _float(config, 'train.warmup_learning_rate', 0.0)
  steps = _sequence(config, 'train.learning_rate_steps')
  factors = _sequence(config, 'train.learning_rate_decay_factors', len(steps))
  _check(all(isinstance(s, int) and s > 0 for s in steps) and list(steps) == sorted(set(steps)),
         'train.learning_rate_steps', steps, 'must be strictly increasing positive integers')
  _check(all(f > 0 for f in factors), 'train.learning_rate_decay_factors', factors,
         'must be positive')
  _float(config, 'train.momentum', 0.0, 1.0)
  _float(config, 'train.l2_weight_decay', 0.0)
  _float(config, 'train.bias_grad_multiplier', 0.0)
  _float(config, 'train.gradient_clip_norm')
  _int(config, 'train.gradient_accumulation_steps', 1)
  _float(config, 'train.loss_scale_initial', 1.0)
  _int(config, 'train.loss_scale_growth_interval', 1)
  _int(config, 'train.checkpoint_every_steps', 1)
  _int(config, 'train.max_checkpoints_to_keep', 1)
  _int(config, 'train.log_every_steps', 1)

  _int(config, 'eval.per_device_batch_size', 1)
  _int(config, 'eval.num_samples', -1)
  _int(config, 'eval.every_steps', 1)
  _int(config, 'eval.checkpoint_step', -1)

  for key in ('init.torchvision_backbone', 'init.torchvision_maskrcnn'):
    path = _get(config, key)
    _check(isinstance(path, str), key, path, 'must be a file path or empty')
    if path:
      _check(pathlib.Path(path).expanduser().is_file(), key, path, 'no such file')
  _check(isinstance(_get(config, 'init.torchvision_backbone_prefix'), str),
         'init.torchvision_backbone_prefix', config.init.torchvision_backbone_prefix,
         'must be a string')


def validate_model_config(model: ml_collections.ConfigDict) -> None:
  """Validates ``config.model`` alone (keys are reported with the ``model.`` prefix)."""
  cfg = ml_collections.ConfigDict({'model': model})
  _int(cfg, 'model.num_classes', 2)
  _choice(cfg, 'model.precision', PRECISIONS)
  _choice(cfg, 'model.backbone.depth', RESNET_DEPTHS)
  _int(cfg, 'model.backbone.freeze_at', 0, 5)
  _choice(cfg, 'model.backbone.finetune_bn', (True, False))
  _float(cfg, 'model.backbone.bn_epsilon', 0.0, low_open=True)
  _float(cfg, 'model.backbone.bn_momentum', 0.0, 1.0)
  _choice(cfg, 'model.backbone.stop_frozen_gradients', (True, False))
  min_level = _int(cfg, 'model.min_level', 2, 5)
  max_level = _int(cfg, 'model.max_level', 5, 7)
  _check(min_level < max_level, 'model.min_level', min_level, 'must be < model.max_level')
  _int(cfg, 'model.fpn_channels', 1)

  convention = _choice(cfg, 'model.anchors.convention', ANCHOR_CONVENTIONS)
  ratios = _sequence(cfg, 'model.anchors.aspect_ratios')
  _check(len(ratios) > 0, 'model.anchors.aspect_ratios', ratios, 'must not be empty')
  if convention == 'reference':
    _int(cfg, 'model.anchors.num_scales', 1)
    _float(cfg, 'model.anchors.anchor_scale', 0.0, low_open=True)
    _check(all(isinstance(r, (tuple, list)) and len(r) == 2 and min(r) > 0 for r in ratios),
           'model.anchors.aspect_ratios', ratios,
           "must be positive (x_scale, y_scale) pairs with convention 'reference'")
  else:
    sizes = _sequence(cfg, 'model.anchors.sizes', max_level - min_level + 1)
    _check(all(s > 0 for s in sizes), 'model.anchors.sizes', sizes, 'must be positive')
    _check(all(isinstance(r, (int, float)) and r > 0 for r in ratios),
           'model.anchors.aspect_ratios', ratios,
           "must be positive h/w ratios with convention 'torchvision'")
  _float(cfg, 'model.anchors.offset', 0.0, 1.0)

  for key in ('positive_overlap', 'negative_overlap', 'fg_fraction', 'train_nms_threshold',
              'test_nms_threshold'):
    _float(cfg, f'model.rpn.{key}', 0.0, 1.0)
  _check(model.rpn.negative_overlap <= model.rpn.positive_overlap, 'model.rpn.negative_overlap',
         model.rpn.negative_overlap, 'must be <= model.rpn.positive_overlap')
  for key in ('batch_size_per_image', 'train_pre_nms_topk', 'train_post_nms_topk',
              'test_pre_nms_topk', 'test_post_nms_topk'):
    _int(cfg, f'model.rpn.{key}', 1)
  _float(cfg, 'model.rpn.min_size', 0.0)
  _sequence(cfg, 'model.rpn.box_weights', 4)
  _float(cfg, 'model.rpn.huber_delta', 0.0, low_open=True)

  _int(cfg, 'model.roi.batch_size_per_image', 1)
  for key in ('fg_fraction', 'fg_threshold', 'bg_threshold_hi', 'bg_threshold_lo'):
    _float(cfg, f'model.roi.{key}', 0.0, 1.0)
  _check(model.roi.bg_threshold_lo <= model.roi.bg_threshold_hi, 'model.roi.bg_threshold_lo',
         model.roi.bg_threshold_lo, 'must be <= model.roi.bg_threshold_hi')
  _sequence(cfg, 'model.roi.box_weights', 4)
  _int(cfg, 'model.roi.pooler_size', 1)
  _int(cfg, 'model.roi.sampling_ratio', 1)
  _float(cfg, 'model.roi.canonical_size', 0.0, low_open=True)
  _int(cfg, 'model.roi.canonical_level', min_level, max_level)
  _int(cfg, 'model.roi.mlp_head_dim', 1)
  _float(cfg, 'model.roi.huber_delta', 0.0, low_open=True)

  _int(cfg, 'model.mask.pooler_size', 1)
  _int(cfg, 'model.mask.resolution', 1)
  _check(model.mask.resolution == 2 * model.mask.pooler_size, 'model.mask.resolution',
         model.mask.resolution, 'must be 2 * model.mask.pooler_size (one 2x2 deconvolution)')
  _int(cfg, 'model.mask.num_convs', 0)
  _int(cfg, 'model.mask.conv_dim', 1)
  _int(cfg, 'model.mask.gt_margin', 0)

  _int(cfg, 'model.test.detections_per_image', 1)
  _float(cfg, 'model.test.nms_threshold', 0.0, 1.0)
  _float(cfg, 'model.test.score_threshold', 0.0, 1.0)
  _int(cfg, 'model.test.pre_nms_topk', 1)
  _float(cfg, 'model.test.min_box_size', 0.0)
