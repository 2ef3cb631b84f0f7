"""2-D convolution (NHWC activations, HWIO kernels) with a choice of kernel-gradient algorithm.

Why. XLA:CPU computes a convolution's kernel gradient ("backprop filter") as another convolution
whose window is the whole output map, over transposed copies of both operands: measured 4-9x
slower than the forward convolution of the same FLOPs, and 49.6% of the CPU training step of
`configs/coco_r50.py` (docs/performance.md). On GPUs cuDNN has real backward-filter kernels, so
this only matters on the CPU.

``kernel_grad='matmul'`` keeps the forward convolution and XLA's input gradient and computes the
kernel gradient as one matrix product per kernel tap, each over contiguous rows of a 2-D array
(the layout XLA:CPU's matrix multiply is fastest on; no im2col patch tensor, no transposed copy):

* The padded input is split into its ``stride x stride`` phases (``x[:, a::s, b::s]``), each
  flattened to (N * Hq * Wq, C_in) rows, and the output gradient padded with zeros to the same
  (N, Hq, Wq) grid and flattened to (N * Hq * Wq, C_out).
* Tap (i, j) reads phase (i % s, j % s) at the output positions shifted by (i // s, j // s),
  which in the flattened rows is one offset ``(i // s) * Wq + j // s``: ``dW[i, j] =
  X[offset : offset + M]^T G[:M]``. A shifted row that runs past the end of an image row (or
  into the next image) meets a zero of the padded gradient, so it adds nothing.

The work is (Hq * Wq) / (Ho * Wo) times the exact one (1.31 for the mask head's 14 x 14 RoIs,
1.02 for P2 of a 832x1344 canvas); both algorithms compute the same sums in another order and
agree to float32 rounding (tests/ops/test_conv.py compares them with XLA's gradients for every
kernel, stride and padding the model uses).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from maskrcnn_jax.settings import KERNEL_GRADS

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')

Padding = Sequence[tuple[int, int]]


def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: Padding,
           kernel_grad: str = 'xla') -> jnp.ndarray:
  """``lax.conv_general_dilated`` of x (N, H, W, C_in) and kernel (kh, kw, C_in, C_out).

  Args:
    x, kernel: operands of one dtype (the compute dtype).
    stride: the same stride along H and W.
    padding: ((top, bottom), (left, right)) explicit zero padding.
    kernel_grad: 'xla' (XLA's own gradients) or 'matmul' (the kernel gradient as matrix
      products, see the module docstring; the CPU's choice).
  """
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if kernel_grad == 'xla':
    return _conv(x, kernel, stride, padding)
  if kernel_grad == 'matmul':
    return _conv_matmul_grad(x, kernel, stride, padding)
  raise ValueError(f'kernel_grad must be one of {KERNEL_GRADS}, got {kernel_grad!r}')


def _conv(x, kernel, stride, padding):
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  dimension_numbers=_DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grad(x, kernel, stride, padding):
  return _conv(x, kernel, stride, padding)


def _forward(x, kernel, stride, padding):
  return _conv(x, kernel, stride, padding), (x, kernel)


def _backward(stride, padding, residuals, g):
  x, kernel = residuals
  # XLA's input gradient: the convolution's transpose in x (no forward pass is traced again).
  dx, = jax.linear_transpose(lambda v: _conv(v, kernel, stride, padding), x)(g)
  return dx, kernel_gradient(x, g, kernel.shape[:2], stride, padding).astype(kernel.dtype)


_conv_matmul_grad.defvjp(_forward, _backward)


def kernel_gradient(x: jnp.ndarray, g: jnp.ndarray, kernel_size: Sequence[int], stride: int,
                    padding: Padding) -> jnp.ndarray:
  """d(sum(g * conv(x, W))) / dW as (kh, kw, C_in, C_out) float32, by matrix products (see the
  module docstring).

  x: (N, H, W, C_in) the convolution's input; g: (N, Ho, Wo, C_out) its output gradient.
  """
  kh, kw = kernel_size
  s = stride
  n, ho, wo, c_out = g.shape
  c_in = x.shape[-1]
  # The phase grid: tap (i, j) reads rows h + i // s and columns w + j // s of its phase.
  hq, wq = ho + (kh - 1) // s, wo + (kw - 1) // s
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  x = _fit(_fit(x, 1, s * hq), 2, s * wq)
  g = jnp.pad(g, ((0, 0), (0, hq - ho), (0, wq - wo), (0, 0))).reshape(-1, c_out)
  max_offset = ((kh - 1) // s) * wq + (kw - 1) // s
  rows = g.shape[0] - max_offset
  g = g[:rows]
  grid = x.reshape(n, hq, s, wq, s, c_in)
  phases = {(a, b): grid[:, :, a, :, b].reshape(-1, c_in)
            for a in range(min(s, kh)) for b in range(min(s, kw))}
  taps = []
  for i in range(kh):
    for j in range(kw):
      phase = phases[i % s, j % s]
      offset = (i // s) * wq + j // s
      taps.append(lax.dot_general(lax.slice_in_dim(phase, offset, offset + rows), g,
                                  (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, c_in, c_out)


def _fit(x, axis: int, size: int):
  """x cropped or zero-padded at the end of ``axis`` to ``size``."""
  if x.shape[axis] >= size:
    return lax.slice_in_dim(x, 0, size, axis=axis)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)
