"""configs/tiny.py narrowed further for smoke runs of the benchmarks (a 64x64 canvas, FPN 16
channels, one mask conv): seconds per step on a CPU.

  python bench/benchmark_training.py --config=configs/tiny_smoke.py --config.benchmark.num_steps=3 ...
"""

import pathlib

from maskrcnn_jax.configs import import_config_module

tiny = import_config_module(pathlib.Path(__file__).resolve().parent / 'tiny.py')


def get_config(arg=None):
  config = tiny.get_config(arg)
  config.data.image_size = (64, 64)
  config.model.fpn_channels = 16
  config.model.roi.mlp_head_dim = 32
  config.model.mask.conv_dim = 16
  config.model.mask.num_convs = 1
  return config
