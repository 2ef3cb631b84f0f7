"""Deterministic, non-trivial synthetic weights for torchvision-named state dicts (NumPy only).

Used by the whole-model parity test: ``tools/make_model_goldens.py`` loads these weights into
torchvision's ``maskrcnn_resnet50_fpn`` and saves its outputs; the test regenerates the very same
state dict without torch from the committed manifest of names and shapes
(``tests/modeling/goldens/torchvision_maskrcnn_r50_manifest.json``) and imports it.

Every tensor is drawn from its own generator seeded by ``(seed, crc32(name))``, so a tensor does
not depend on the order or the presence of the others. Distributions (chosen so that activations
stay O(1) through the 16 residual blocks and the heads produce varied scores):

* conv / linear weights: He-normal, ``std = gain * sqrt(2 / fan_in)``;
* batch norm: weight ~ U(0.5, 1.5), bias ~ N(0, 0.1), running_mean ~ N(0, 0.1),
  running_var ~ U(0.5, 2); the last batch norm of each residual branch is scaled by
  ``RESIDUAL_BN_GAIN`` so that the residual sums do not grow without bound;
* conv / linear biases ~ N(0, 0.1);
* per-tensor gains in ``GAINS`` tune the heads' outputs (objectness and class logits spread
  enough that the box-head scores vary and a few hundred (RoI, class) pairs pass 0.05).
"""

from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import numpy as np

# Multiplies the weight of each bottleneck's last batch norm (bn3): keeps the stage outputs O(1) with random statistics.
RESIDUAL_BN_GAIN = 0.3
# name substring -> gain on the He-normal std of that weight.
# Measured with tools/make_model_goldens.py on the golden image: RPN logits std ~3 (max well
# below 16, where float32 sigmoids tie and torchvision's order by probability would differ from
# an order by logit), box-head logits std ~2 (top scores 0.3-0.7, ~3900 (RoI, class) pairs above
# 0.05), mask probabilities spread over (0, 1).
GAINS = {
    'rpn.head.cls_logits.weight': 0.2,
    'rpn.head.bbox_pred.weight': 0.1,
    'roi_heads.box_predictor.cls_score.weight': 0.15,
    'roi_heads.box_predictor.bbox_pred.weight': 0.1,
    'roi_heads.mask_predictor.mask_fcn_logits.weight': 0.3,
}


def _generator(name: str, seed: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


def _is_bn(name: str) -> bool:
  leaf = name.rsplit('.', 1)[-1]
  if leaf in ('running_mean', 'running_var', 'num_batches_tracked'):
    return True
  module = name.rsplit('.', 1)[0]
  last = module.rsplit('.', 1)[-1]
  # ResNet batch norms: bn1..bn3 and downsample.1.
  return last.startswith('bn') or module.endswith('downsample.1')


def _is_residual_last_bn(name: str) -> bool:
  """bn3 of a bottleneck (ResNet-50/101, the models these weights are made for)."""
  return name.rsplit('.', 1)[0].endswith('.bn3')


def synthetic_tensor(name: str, shape: Sequence[int], seed: int = 0) -> np.ndarray:
  """The synthetic value of one torchvision tensor (float32; int64 for ``num_batches_tracked``)."""
  shape = tuple(int(s) for s in shape)
  rng = _generator(name, seed)
  leaf = name.rsplit('.', 1)[-1]
  if leaf == 'num_batches_tracked':
    return np.zeros(shape, np.int64)
  if _is_bn(name):
    if leaf == 'weight':
      value = rng.uniform(0.5, 1.5, shape)
      if _is_residual_last_bn(name):
        value = value * RESIDUAL_BN_GAIN
    elif leaf == 'running_var':
      value = rng.uniform(0.5, 2.0, shape)
    else:  # bias, running_mean
      value = rng.normal(0.0, 0.1, shape)
    return value.astype(np.float32)
  if leaf == 'bias':
    return rng.normal(0.0, 0.1, shape).astype(np.float32)
  # Weights. ConvTranspose2d (in, out, kh, kw) without overlap: each output sees `in` inputs.
  if 'conv5_mask' in name:
    fan_in = shape[0]
  else:
    fan_in = int(np.prod(shape[1:]))
  gain = GAINS.get(name, 1.0)
  return rng.normal(0.0, gain * np.sqrt(2.0 / fan_in), shape).astype(np.float32)


def synthetic_torchvision_state_dict(names_and_shapes: Iterable[tuple[str, Sequence[int]]],
                                     seed: int = 0) -> dict[str, np.ndarray]:
  """``{name: tensor}`` for ``(name, shape)`` pairs of a torchvision state dict (any order)."""
  return {name: synthetic_tensor(name, shape, seed) for name, shape in names_and_shapes}
