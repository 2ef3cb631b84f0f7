"""Flax modules of Mask R-CNN and the one function that builds the model from its config.

Public API:
  build_model(model_config, inference=False) -> MaskRCNN   (the only reader of ``config.model``)
  init_variables(model, key, image_size) -> {'params', 'batch_stats'}
  normalize_images(images_uint8, image_sizes, mean, std) -> normalised float images
  frozen_param_mask(params, freeze_at)    (optimizer mask of the frozen backbone stages)
  DTYPES                                  (config.model.precision -> compute dtype)
  resolve_kernel_grad(choice)             (config.model.conv_kernel_grad -> 'xla' | 'matmul')
  resolve_mask_train_slots(choice)        (config.model.mask.train_slots -> 'fixed' | 'bucketed')
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from maskrcnn_jax.cpuinfo import first_value
from maskrcnn_jax.settings import ModelSettings
from maskrcnn_jax.modeling.model import (COUNTER_KEYS, LOSS_KEYS, MaskRCNN, anchor_shapes,
                                         init_variables, normalize_images)
from maskrcnn_jax.modeling.resnet import ResNet, frozen_param_mask

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

__all__ = ['COUNTER_KEYS', 'DTYPES', 'LOSS_KEYS', 'MaskRCNN', 'ResNet', 'anchor_shapes',
           'build_model', 'frozen_param_mask', 'init_variables', 'normalize_images',
           'resolve_kernel_grad', 'resolve_mask_train_slots']


def build_model(model_config, inference: bool = False) -> MaskRCNN:
  """The Mask R-CNN module of ``config.model`` (see configs/coco_r50.py); `ConfigError` names
  the key at fault.

  ``inference``: the module the inference step runs, with ``model.inference_products``
  (otherwise ``model.train_products``); the parameters are the same either way (the products
  change no parameter).
  """
  s = ModelSettings.from_config(model_config)
  key = 'inference_products' if inference else 'train_products'
  products = getattr(s, key)
  if products == 'bfloat16':
    _warn_without_bfloat16_instructions(f'model.{key}')
  return MaskRCNN(
      num_classes=s.num_classes,
      backbone_cls=functools.partial(ResNet, **dataclasses.asdict(s.backbone)),
      min_level=s.min_level, max_level=s.max_level, fpn_channels=s.fpn_channels,
      anchors=s.anchors, rpn=s.rpn, roi=s.roi,
      mask=dataclasses.replace(s.mask, train_slots=resolve_mask_train_slots(s.mask.train_slots)),
      test=s.test,
      dtype=DTYPES[s.precision], conv_kernel_grad=resolve_kernel_grad(s.conv_kernel_grad),
      products=products)


# CPU flags (Linux /proc/cpuinfo) of the instructions that multiply bfloat16 at twice the float32
# rate: x86 AVX-512 BF16 and AMX, Arm's BF16 extension.
BFLOAT16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16', 'bf16')


def cpu_flags(cpuinfo: str = '/proc/cpuinfo') -> frozenset[str] | None:
  """The first CPU's feature flags ('flags' on x86, 'Features' on Arm); None where unknown."""
  value = first_value(('flags', 'Features'), cpuinfo)
  return None if value is None else frozenset(value.split())


@functools.lru_cache(maxsize=None)
def _warn_without_bfloat16_instructions(key: str) -> None:
  """A warning (once per process and config key) when bfloat16 products will run on a CPU
  without bfloat16 instructions: XLA then widens the operands, 1.5-1.8x slower than float32
  (AMD Zen 3, docs/performance.md)."""
  if jax.default_backend() != 'cpu':
    return
  flags = cpu_flags()
  if flags is not None and not flags & set(BFLOAT16_CPU_FLAGS):
    logging.warning("%s = 'bfloat16' on a CPU without bfloat16 instructions (none of %s): "
                    'slower than float32 here', key, '/'.join(BFLOAT16_CPU_FLAGS))


def resolve_kernel_grad(choice: str) -> str:
  """``config.model.conv_kernel_grad``: 'auto' is 'matmul' on the CPU backend (XLA:CPU's own
  kernel gradients are 4-9x slower than its forward convolutions, docs/performance.md) and
  'xla' on GPUs and TPUs (cuDNN's backward-filter kernels)."""
  if choice == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'xla'
  return choice


def resolve_mask_train_slots(choice: str) -> str:
  """``config.model.mask.train_slots``: 'auto' is 'bucketed' on the CPU backend (the mask head
  costs by the RoI, and most images have far fewer than 128 foreground RoIs) and 'fixed' on GPUs
  and TPUs (there a conditional's branch index is read by the host: a sync every step)."""
  if choice == 'auto':
    return 'bucketed' if jax.default_backend() == 'cpu' else 'fixed'
  return choice
