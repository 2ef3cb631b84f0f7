"""Feature pyramid network (Lin et al. 2017) on ResNet stage outputs, as torchvision and the
reference build it.

``lateral_pN``: 1x1 conv (with bias) of C_N to ``channels``; top-down: the coarser merged map is
upsampled by nearest neighbour to the finer one's size and added; ``output_pN``: 3x3 conv (pad 1,
with bias) of each merged map. Levels above 5 are max-pools with kernel 1 and stride 2 of the
level below (torchvision's ``LastLevelMaxPool``: every other pixel; the reference's P6 is the
same), so they add no parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import conv, upsample_nearest

Dtype = Any


class FPN(nn.Module):
  """Feature pyramid.

  Attributes:
    min_level: finest output level (2 = P2, stride 4).
    max_level: coarsest output level (6 = P6, stride 64).
    channels: output channels of every level (256).
    dtype: compute dtype; parameters are float32.
    conv_kernel_grad: 'xla' or 'matmul' (:mod:`maskrcnn_jax.ops.conv`).
    products: 'float32' or 'bfloat16' (:class:`maskrcnn_jax.modeling.layers.Conv`).
  """
  min_level: int = 2
  max_level: int = 6
  channels: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_kernel_grad: str = 'xla'
  products: str = 'float32'

  @nn.compact
  def __call__(self, features: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """features: {'c2': (B, H2, W2, C2), ..., 'c5'} -> {'p2': (B, H2, W2, channels), ...,
    f'p{max_level}'}, level ``l`` of size ``ceil(H / 2**l)``."""
    # torchvision's default init of the FPN convs: kaiming_uniform(a=1), zero bias.
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
    top = min(self.max_level, 5)
    merged = {}
    previous = None
    for level in range(top, self.min_level - 1, -1):
      lateral = conv(self.channels, 1, use_bias=True, dtype=self.dtype, kernel_init=init,
                     kernel_grad=self.conv_kernel_grad, products=self.products,
                     name=f'lateral_p{level}')(features[f'c{level}'])
      if previous is not None:
        lateral = lateral + upsample_nearest(previous, lateral.shape[1:3])
      merged[level] = previous = lateral
    outputs = {}
    for level in range(self.min_level, top + 1):
      outputs[f'p{level}'] = conv(self.channels, 3, use_bias=True, dtype=self.dtype,
                                  kernel_init=init, kernel_grad=self.conv_kernel_grad,
                                  products=self.products, name=f'output_p{level}')(merged[level])
    for level in range(top + 1, self.max_level + 1):
      outputs[f'p{level}'] = outputs[f'p{level - 1}'][:, ::2, ::2]
    return outputs
