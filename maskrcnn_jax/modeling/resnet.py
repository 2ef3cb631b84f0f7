"""ResNet backbones (torchvision layout: stride in the 3x3 convolution, "ResNet v1.5"), NHWC.

Variable names mirror torchvision's ``resnetXX`` so that weights map one to one
(:mod:`maskrcnn_jax.weights`): ``conv1``/``bn1`` (the stem), ``layer1`` .. ``layer4`` (res2 ..
res5), blocks ``block0``, ``block1``, ... holding ``conv1``/``bn1``, ``conv2``/``bn2``
(``conv3``/``bn3`` for bottlenecks) and ``downsample_conv``/``downsample_bn``.

Freezing. Stage 1 is the stem (``conv1``, ``bn1``), stage ``s`` in 2..5 is ``layer{s-1}``;
``freeze_at = k`` freezes stages 1..k (the reference: 2 = stem + res2). The freezing itself is an
optimizer mask built by :func:`frozen_param_mask` from these names. As a pure speed measure the
module can additionally stop the gradient at the output of the last frozen stage
(``stop_frozen_gradients``): nothing upstream of that point is trainable, so the gradients of every
trainable parameter are unchanged and the frozen stages' backward pass is skipped.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import batch_norm, conv

Dtype = Any

# depth -> (block kind, blocks per stage) as torchvision's resnet18 .. resnet101.
RESNET_SPECS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)


def stage_output_channels(depth: int) -> tuple[int, ...]:
  """Channels of C2..C5 for a ResNet depth: (64, 128, 256, 512) or 4x that for bottlenecks."""
  kind, _ = RESNET_SPECS[depth]
  expansion = 4 if kind == 'bottleneck' else 1
  return tuple(w * expansion for w in STAGE_WIDTHS)


def frozen_stage_names(freeze_at: int) -> tuple[str, ...]:
  """Top-level backbone module names frozen by ``freeze_at`` (0 = none .. 5 = all)."""
  names = ('conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4')
  # stage 1 = conv1 + bn1, stage s >= 2 = layer{s-1}
  return names[:freeze_at + 1] if freeze_at >= 1 else ()


def frozen_param_mask(params: Mapping[str, Any], freeze_at: int,
                      backbone_key: str = 'backbone') -> Any:
  """A pytree of bools over ``params``: True for parameters frozen by ``freeze_at``.

  Args:
    params: the ``params`` collection of a whole model (with the backbone under
      ``backbone_key``) or of a bare ResNet (pass ``backbone_key=None``).
    freeze_at: stages 1..freeze_at are frozen (1 = stem, 2 = stem + res2, ... 5 = everything).

  Returns:
    The same tree structure with bool leaves; use it with ``optax.masked`` /
    ``optax.multi_transform`` (e.g. ``optax.set_to_zero()`` on True leaves).
  """
  frozen = set(frozen_stage_names(freeze_at))

  def mark(tree, value):
    return jax.tree_util.tree_map(lambda _: value, tree)

  def backbone_mask(tree):
    return {k: mark(v, k in frozen) for k, v in tree.items()}

  if backbone_key is None:
    return backbone_mask(params)
  return {k: (backbone_mask(v) if k == backbone_key else mark(v, False))
          for k, v in params.items()}


def _conv_of(block: nn.Module):
  """`conv` with a block's compute dtype and convolution algorithms bound."""
  return functools.partial(conv, dtype=block.dtype, kernel_grad=block.conv_kernel_grad,
                           products=block.products)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual (ResNet-18/34). Input/output NHWC.

  Attributes:
    width: output channels.
    stride: stride of the first 3x3 convolution (and of the projection shortcut).
    frozen_bn, bn_epsilon: batch-norm kind and epsilon.
  """
  width: int
  stride: int = 1
  frozen_bn: bool = True
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.997
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_kernel_grad: str = 'xla'
  products: str = 'float32'

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: batch_norm(name, self.frozen_bn, train, self.bn_epsilon, self.dtype,
                                 self.bn_momentum)
    layer = _conv_of(self)
    y = nn.relu(bn('bn1')(layer(self.width, 3, self.stride, name='conv1')(x)))
    y = bn('bn2')(layer(self.width, 3, 1, name='conv2')(y))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.width:
      shortcut = layer(self.width, 1, self.stride, name='downsample_conv')(x)
      shortcut = bn('downsample_bn')(shortcut)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, torchvision v1.5), 1x1 expand x4, with a residual (ResNet-50/101).

  Attributes:
    width: channels of the inner convolutions; the output has ``4 * width``.
    stride: stride of the 3x3 convolution (and of the projection shortcut).
  """
  width: int
  stride: int = 1
  frozen_bn: bool = True
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.997
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_kernel_grad: str = 'xla'
  products: str = 'float32'

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: batch_norm(name, self.frozen_bn, train, self.bn_epsilon, self.dtype,
                                 self.bn_momentum)
    out = 4 * self.width
    layer = _conv_of(self)
    y = nn.relu(bn('bn1')(layer(self.width, 1, name='conv1')(x)))
    y = nn.relu(bn('bn2')(layer(self.width, 3, self.stride, name='conv2')(y)))
    y = bn('bn3')(layer(out, 1, name='conv3')(y))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out:
      shortcut = layer(out, 1, self.stride, name='downsample_conv')(x)
      shortcut = bn('downsample_bn')(shortcut)
    return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
  """One stage (torchvision ``layerN``): blocks ``block0`` .. ``block{n-1}``, the first strided.

  Attributes:
    block_cls: ``BasicBlock`` or ``Bottleneck``.
    num_blocks: number of blocks.
    width: the blocks' ``width``.
    stride: stride of the first block.
  """
  block_cls: Any
  num_blocks: int
  width: int
  stride: int = 1
  frozen_bn: bool = True
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.997
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_kernel_grad: str = 'xla'
  products: str = 'float32'

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (B, H, W, C_in) -> (B, H / stride, W / stride, C_out)."""
    for j in range(self.num_blocks):
      x = self.block_cls(width=self.width, stride=self.stride if j == 0 else 1,
                         frozen_bn=self.frozen_bn, bn_epsilon=self.bn_epsilon,
                         bn_momentum=self.bn_momentum, dtype=self.dtype,
                         conv_kernel_grad=self.conv_kernel_grad, products=self.products,
                         name=f'block{j}')(x, train)
    return x


class ResNet(nn.Module):
  """ResNet trunk returning the stage outputs C2..C5. The attributes are the keys of
  ``config.model.backbone`` (:class:`maskrcnn_jax.settings.BackboneSettings`); the defaults are
  torchvision's, for the module used on its own.

  Attributes:
    depth: 18, 34, 50 or 101.
    freeze_at: stages 1..freeze_at keep trainable batch norm in inference mode even when
      ``train`` (the reference: frozen stages never update their statistics); their parameters
      are frozen by the optimizer mask (:func:`frozen_param_mask`).
    finetune_bn: trainable batch norm (True) or frozen batch norm everywhere (False, the
      reference).
    bn_epsilon: batch-norm epsilon (torchvision: 1e-5, the reference: 1e-4).
    bn_momentum: running-average decay of trainable batch norm (the reference: 0.997).
    stop_frozen_gradients: also stop the gradient after stage ``freeze_at`` (see the module
      docstring: a speed measure that changes no trainable gradient).
    dtype: compute dtype; parameters are float32.
    conv_kernel_grad: the convolutions' kernel-gradient algorithm ('xla' or 'matmul',
      :mod:`maskrcnn_jax.ops.conv`).
    products: the convolutions' products, 'float32' or 'bfloat16' (forward and gradients,
      :class:`maskrcnn_jax.modeling.layers.Conv`).
  """
  depth: int = 50
  freeze_at: int = 0
  finetune_bn: bool = False
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.997
  stop_frozen_gradients: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_kernel_grad: str = 'xla'
  products: str = 'float32'

  @nn.compact
  def __call__(self, x, train: bool = False) -> dict[str, jnp.ndarray]:
    """x: (B, H, W, 3) normalised images -> {'c2': (B, H/4, W/4, C2), ..., 'c5': (B, H/32, ...)}.

    Sizes are ``ceil`` of the divisions (torchvision's floor((n + 2p - k) / s) + 1 with its
    paddings).
    """
    kind, blocks = RESNET_SPECS[self.depth]
    block_cls = Bottleneck if kind == 'bottleneck' else BasicBlock
    x = x.astype(self.dtype)
    x = _conv_of(self)(64, 7, 2, name='conv1')(x)
    frozen_bn = not self.finetune_bn
    stop_at = self.freeze_at if self.stop_frozen_gradients else 0
    x = batch_norm('bn1', frozen_bn, train and self.freeze_at < 1, self.bn_epsilon,
                   self.dtype, self.bn_momentum)(x)
    x = nn.relu(x)
    # 3x3 / 2 max-pool with padding 1 (padded with -inf, as torch).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    if stop_at == 1:
      x = jax.lax.stop_gradient(x)
    outputs = {}
    for i, (num_blocks, width) in enumerate(zip(blocks, STAGE_WIDTHS)):
      x = ResNetStage(block_cls=block_cls, num_blocks=num_blocks, width=width,
                      stride=2 if i > 0 else 1, frozen_bn=frozen_bn,
                      bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                      dtype=self.dtype, conv_kernel_grad=self.conv_kernel_grad,
                      products=self.products,
                      name=f'layer{i + 1}')(x, train and self.freeze_at < i + 2)
      if stop_at == i + 2:
        x = jax.lax.stop_gradient(x)
      outputs[f'c{i + 2}'] = x
    return outputs
