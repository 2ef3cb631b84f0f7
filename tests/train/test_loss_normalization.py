"""train.loss_normalization: 'global' makes the update independent of how the batch is split.

The 1 x 4 versus 4 x 1 comparison of the real model runs in a subprocess (the fake device count
must be set before JAX initialises): `loss_normalization_check.py`.
"""

import pathlib

import pytest

import helpers
from maskrcnn_jax import configs
from maskrcnn_jax.train import step as step_lib

HERE = pathlib.Path(__file__).resolve().parent
CONFIG_DIR = HERE.parents[1] / 'configs'


def test_global_normalization_gives_the_same_update_on_one_and_four_devices():
  helpers.run_on_fake_devices('loss_normalization_check.py', timeout=600)


def test_the_key_is_validated_and_defaults_to_the_reference():
  config = configs.load_config(CONFIG_DIR / 'coco_r50.py')
  assert config.train.loss_normalization == 'per_device'
  config.train.loss_normalization = 'sum'
  with pytest.raises(configs.ConfigError, match=r"'train.loss_normalization' = 'sum': must be one"):
    configs.validate_config(config)
  with pytest.raises(ValueError, match='loss_normalization'):
    step_lib.make_train_step(None, None, None, None, (0.0,) * 3, (1.0,) * 3, None, False,
                             loss_normalization='sum')
