"""The model-source flags shared by the commands that run a trained model (`predict`, `export`):
``--workdir [--step]`` (a training workdir) or ``--torchvision --config`` (torchvision weights in
a config's architecture). Importing this module loads no JAX; `load_predictor` does."""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags


def define_flags() -> None:
  """Defines --workdir, --step, --torchvision, --config and --inference_products."""
  flags.DEFINE_string('workdir', None, 'A training workdir (its recorded config and checkpoint).')
  flags.DEFINE_integer('step', None, 'Checkpoint step of --workdir (default: the latest).')
  flags.DEFINE_string('torchvision', None, 'torchvision Mask R-CNN weights '
                      '(.pth/.npz/.safetensors), with --config.')
  config_flags.DEFINE_config_file('config', None, 'Config of --torchvision (configs/*.py).',
                                  lock_config=True)
  flags.DEFINE_enum('inference_products', None, ['float32', 'bfloat16'],
                    "The model's products (config key model.inference_products; default: the "
                    "config's): 'bfloat16' is the CPU's fast path, bfloat16 operands with float32 "
                    'accumulation.')


def check_flags(values) -> None:
  """`app.UsageError` unless exactly one source is given (--torchvision with --config)."""
  if bool(values.workdir) == bool(values.torchvision):
    raise app.UsageError('give exactly one of --workdir and --torchvision (with --config)')
  if values.torchvision and values.config is None:
    raise app.UsageError('--torchvision needs --config (e.g. configs/torchvision_r50.py)')


def load_predictor(values, batch_size: int):
  """The `inference.Predictor` the flags name, with `batch_size` images per call."""
  from maskrcnn_jax import inference  # pylint: disable=import-outside-toplevel  # loads JAX
  kwargs = dict(batch_size=batch_size, inference_products=values.inference_products)
  if values.workdir:
    return inference.Predictor.from_workdir(values.workdir, values.step, **kwargs)
  return inference.Predictor.from_torchvision(values.torchvision, values.config, **kwargs)
