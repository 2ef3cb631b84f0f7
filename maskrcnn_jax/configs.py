"""Configs: loading (``configs/*.py``) and validating a whole config at start-up.

`validate_config` checks every value the run relies on and raises `ConfigError` naming the dotted
key at fault (e.g. ``data.image_size``), so that a bad override fails in a second rather than deep
inside a compiled step. The typed settings the code reads are in :mod:`maskrcnn_jax.settings`.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from maskrcnn_jax.settings import (EVAL_ENGINES, LOSS_NORMALIZATIONS, POSITIVE, ConfigError,
                                   InputSettings, ModelSettings, OptimizerSettings, boolean,
                                   choice, integer, number, read_key, require, sequence, string)

__all__ = ['ConfigError', 'flatten', 'import_config_module', 'load_config', 'validate_config']


def flatten(tree, prefix: str = '') -> dict:
  """{'model.backbone.depth': 50, ...}: the leaves of a nested mapping (a config's ``to_dict()``
  or a recorded config.json) by dotted key."""
  flat = {}
  for key, value in tree.items():
    if hasattr(value, 'items'):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def load_config(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """Imports a config file (``configs/*.py``), calls its ``get_config(arg)`` and validates it."""
  module = import_config_module(path)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} has no get_config() function')
  config = module.get_config(arg) if arg is not None else module.get_config()
  validate_config(config)
  return config


def import_config_module(path: str | pathlib.Path):
  """The config file at ``path`` as a module: how an overlay imports its base config without
  editing ``sys.path``:
  ``base = import_config_module(pathlib.Path(__file__).parent / 'coco_r50.py')``."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f'config file not found: {path}')
  spec = importlib.util.spec_from_file_location(f'_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ------------------------------------------------------------------------------ whole config
def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the first invalid key of a full (model + data + train) config.

  The mode is checked by the mode table of :mod:`maskrcnn_jax.train.loop`."""
  read_key(config, 'mode', string)
  read_key(config, 'seed', integer())
  model = ModelSettings.from_config(read_key(config, 'model', lambda v: v))

  multiple = 2 ** model.max_level
  size = read_key(config, 'data.image_size', sequence(length=2))
  require(all(isinstance(v, int) and v > 0 and v % multiple == 0 for v in size),
          'data.image_size', size,
          f'height and width must be positive multiples of 2**model.max_level = {multiple}')
  InputSettings.from_config(config.data)
  for key, check in (('data.tfds_name', string), ('data.tfds_data_dir', string),
                     ('data.train_split', string), ('data.eval_split', string),
                     ('data.pixel_mean', sequence(number(), length=3)),
                     ('data.pixel_std', sequence(POSITIVE, length=3))):
    read_key(config, key, check)

  OptimizerSettings.from_config(config.train)
  for key, check in (('train.per_device_batch_size', integer(1)),
                     ('train.loss_scale_initial', number(1.0)),
                     ('train.loss_scale_growth_interval', integer(1)),
                     ('train.checkpoint_every_steps', integer(1)),
                     ('train.max_checkpoints_to_keep', integer(1)),
                     ('train.log_every_steps', integer(1)),
                     ('train.allow_config_changes', boolean),
                     ('train.loss_normalization', choice(*LOSS_NORMALIZATIONS)),
                     ('eval.per_device_batch_size', integer(1)),
                     ('eval.num_samples', integer(-1)), ('eval.every_steps', integer(1)),
                     ('eval.checkpoint_step', integer(-1)),
                     ('eval.engine', choice(*EVAL_ENGINES))):
    read_key(config, key, check)
  total = read_key(config, 'train.total_steps', integer(1))
  warmup = config.train.warmup_steps
  require(warmup < total, 'train.warmup_steps', warmup, f'must be < train.total_steps = {total}')

  checkpoint = read_key(config, 'init.checkpoint', string)
  for key in ('init.torchvision_maskrcnn', 'init.torchvision_backbone'):
    if checkpoint and read_key(config, key, string):
      raise ConfigError(f'config keys {key!r} and \'init.checkpoint\' are both set: give only '
                        f'one (the checkpoint holds the whole model)')
  for key in ('init.torchvision_backbone', 'init.torchvision_maskrcnn'):
    path = read_key(config, key, string)
    if path:
      require(pathlib.Path(path).expanduser().is_file(), key, path, 'no such file')
  read_key(config, 'init.torchvision_backbone_prefix', string)
  if checkpoint:
    require(pathlib.Path(checkpoint).expanduser().is_dir(), 'init.checkpoint', checkpoint,
            'no such directory (a workdir of ours or a <workdir>/checkpoints/<step> directory)')
