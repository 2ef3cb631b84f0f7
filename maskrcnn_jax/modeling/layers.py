"""Small building blocks shared by the backbone and the heads: frozen batch norm, padded convs.

Conventions: NHWC activations, ``param_dtype`` float32, ``dtype`` the compute dtype. Convolution
padding is always explicit and symmetric (torchvision's ``padding=k // 2``), never flax's
``'SAME'``, which pads stride-2 convolutions asymmetrically (more at the bottom/right) and would
shift every feature map by half a pixel relative to torchvision's.

Batch-norm variables. A *frozen* batch norm (the reference's default: inference mode, affine not
trained) keeps all four of its tensors -- ``scale``, ``bias``, ``mean``, ``var`` -- in the
``batch_stats`` collection, like torchvision's ``FrozenBatchNorm2d`` keeps them as buffers: they
are constants of the model, are never seen by the optimizer, and the parameter count equals
torchvision's. A *trainable* batch norm (``finetune_bn``) is ``flax.linen.BatchNorm``: ``scale``
and ``bias`` in ``params``, ``mean`` and ``var`` in ``batch_stats``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.ops.conv import conv2d, conv2d_products, dot_products
from maskrcnn_jax.settings import PRODUCTS

# The smallest input depth whose convolution `Conv` computes as bfloat16 products: the stem's
# 3 channels would give products with K = 3, far from the bfloat16 units' speed.
MIN_PRODUCT_CHANNELS = 16

Dtype = Any


class FrozenBatchNorm(nn.Module):
  """Batch norm in inference mode with constant statistics and affine (torchvision semantics).

  ``y = (x - mean) * scale / sqrt(var + epsilon) + bias``, computed as one per-channel multiply
  and add whose coefficients are formed in float32 (as ``FrozenBatchNorm2d``), then cast to the
  compute dtype.

  Attributes:
    epsilon: added to the variance (torchvision's ``FrozenBatchNorm2d``: 1e-5).
    dtype: compute dtype of the output.
    param_dtype: storage dtype of the four constants (float32).
  """
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (..., C) -> (..., C) in ``dtype``."""
    c = x.shape[-1]
    init = lambda fill: (lambda: jnp.full((c,), fill, self.param_dtype))
    scale = self.variable('batch_stats', 'scale', init(1.0)).value
    bias = self.variable('batch_stats', 'bias', init(0.0)).value
    mean = self.variable('batch_stats', 'mean', init(0.0)).value
    var = self.variable('batch_stats', 'var', init(1.0)).value
    mul = scale.astype(jnp.float32) * (var.astype(jnp.float32) + self.epsilon) ** -0.5
    add = bias.astype(jnp.float32) - mean.astype(jnp.float32) * mul
    return x.astype(self.dtype) * mul.astype(self.dtype) + add.astype(self.dtype)


def batch_norm(name: str, frozen: bool, train: bool, epsilon: float, dtype: Dtype,
               momentum: float = 0.997) -> nn.Module:
  """A frozen or a trainable batch norm with the given explicit name.

  Trainable batch norm uses batch statistics when ``train`` is True (``batch_stats`` must then be
  mutable) and per-device statistics (no cross-device reduction, as the reference); ``momentum``
  is the running-average decay (the reference's ``_BATCH_NORM_DECAY`` 0.997).
  """
  if frozen:
    return FrozenBatchNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, name=name)
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


# He normal with fan-out (Caffe2's MSRAFill, torchvision's kaiming_normal_(mode='fan_out')):
# std sqrt(2 / (kh * kw * out_channels)), untruncated.
MSRA_FILL = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class Conv(nn.Module):
  """A 2-D convolution with explicit padding, the parameters of ``flax.linen.Conv`` (``kernel``
  (kh, kw, C_in, features), then ``bias`` (features,), in that order of creation) and a choice of
  kernel-gradient algorithm (:func:`maskrcnn_jax.ops.conv.conv2d`).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: the same stride along H and W.
    padding: ((top, bottom), (left, right)).
    use_bias: add a bias (zero init).
    dtype: compute dtype; inputs and parameters are cast to it.
    kernel_grad: 'xla' or 'matmul' (see :mod:`maskrcnn_jax.ops.conv`).
    products: 'float32' (the convolution in ``dtype``) or 'bfloat16': operands rounded to
      bfloat16, products accumulated in float32, one matrix product per kernel tap, the
      gradients likewise (:func:`maskrcnn_jax.ops.conv.conv2d_products`, the CPU's fast path:
      ``config.model.inference_products`` and ``config.model.train_products``). Inputs with
      fewer than ``MIN_PRODUCT_CHANNELS`` channels (the stem) keep the convolution.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = MSRA_FILL
  kernel_grad: str = 'xla'
  products: str = 'float32'

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, C_in) -> (B, Ho, Wo, features) in ``dtype``."""
    kernel = self.param('kernel', self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1], self.features), self.param_dtype)
    if _bfloat16_products(self.products) and x.shape[-1] >= MIN_PRODUCT_CHANNELS:
      y = conv2d_products(x, kernel, self.strides, self.padding).astype(self.dtype)
    else:
      y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding,
                 self.kernel_grad)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def conv(features: int, kernel: int, stride: int = 1, use_bias: bool = False,
         dtype: Dtype = jnp.float32, name: str | None = None,
         kernel_init=MSRA_FILL, kernel_grad: str = 'xla', products: str = 'float32') -> Conv:
  """A k x k convolution with torchvision's symmetric padding ``k // 2`` on every side.

  Kernel (k, k, C_in, features) float32; default init He-normal (fan-out), as torchvision's
  ResNet; ``kernel_grad`` the kernel-gradient algorithm (:mod:`maskrcnn_jax.ops.conv`),
  ``products`` the forward's products (`Conv`).
  """
  pad = kernel // 2
  return Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
              use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
              kernel_grad=kernel_grad, products=products, name=name)


def _bfloat16_products(products: str) -> bool:
  if products not in PRODUCTS:
    raise ValueError(f'products must be one of {PRODUCTS}, got {products!r}')
  return products == 'bfloat16'


def dot(x: jnp.ndarray, y: jnp.ndarray, products: str, dtype: Dtype) -> jnp.ndarray:
  """The matrix product x @ y (x: (..., K), y: (K, N)) in ``dtype``, or with 'bfloat16'
  ``products`` of bfloat16 operands accumulated in float32 (see `Conv`), cast to ``dtype``."""
  if _bfloat16_products(products):
    return dot_products(x, y, jnp.bfloat16).astype(dtype)
  return jnp.dot(x.astype(dtype), y.astype(dtype))


class Dense(nn.Module):
  """``flax.linen.Dense`` (the same ``kernel`` (C_in, features) and ``bias`` parameters) whose
  product can be bfloat16 operands with float32 accumulation (``products``, see `Conv`)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  products: str = 'float32'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    return dot(x, kernel, self.products, self.dtype) + bias.astype(self.dtype)


class Deconv2x2(nn.Module):
  """Transposed convolution with kernel 2 and stride 2 (no overlap): each input cell becomes a
  2x2 output block, ``out[2i + di, 2j + dj] = x[i, j] @ kernel[di, dj] + bias``.

  Written as one matrix product rather than ``nn.ConvTranspose`` because without overlap it is a
  plain matmul, and its kernel layout (di, dj, C_in, C_out) is torchvision's ``ConvTranspose2d``
  weight (C_in, C_out, di, dj) transposed, with no spatial flip to get wrong.

  Attributes:
    features: output channels.
    products: 'float32' or 'bfloat16' (see `Conv`).
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = MSRA_FILL
  products: str = 'float32'

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, C) -> (B, 2H, 2W, features)."""
    b, h, w, c = x.shape
    kernel = self.param('kernel', self.kernel_init, (2, 2, c, self.features), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    # One (B*H*W, C) x (C, 2*2*features) product, then whole feature rows moved into place:
    # the same sums as einsum('bhwc,ijco->bhiwjo'), for which XLA:CPU chose the transposed
    # product and an element-wise transpose of the output (0.67 s of a 832x1344 CPU step).
    flat = kernel.transpose(2, 0, 1, 3).reshape(c, 4 * self.features)
    y = dot(x.reshape(b * h * w, c), flat, self.products, self.dtype)
    y = y.reshape(b, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(b, 2 * h, 2 * w, self.features)
    return y + bias.astype(self.dtype)


def upsample_nearest(x, size: Sequence[int]):
  """Nearest-neighbour resize of (B, h, w, C) to (B, H, W, C) with torch's index rule
  ``src = floor(dst * h / H)`` (``F.interpolate(mode='nearest', size=...)``): a plain 2x repeat
  when H = 2h, and the same pixels as torchvision's FPN for odd sizes."""
  h, w = x.shape[1:3]
  out_h, out_w = size
  rows = (jnp.arange(out_h) * h) // out_h
  cols = (jnp.arange(out_w) * w) // out_w
  return x[:, rows][:, :, cols]
