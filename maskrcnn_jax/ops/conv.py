"""2-D convolution (NHWC activations, HWIO kernels) with a choice of kernel-gradient algorithm.

Why. XLA:CPU computes a convolution's kernel gradient ("backprop filter") as another convolution
whose window is the whole output map, over transposed copies of both operands: measured 4-9x
slower than the forward convolution of the same FLOPs, and 49.6% of the CPU training step of
`configs/coco_r50.py` (docs/performance.md). On GPUs cuDNN has real backward-filter kernels, so
this only matters on the CPU.

``kernel_grad='matmul'`` keeps the forward convolution, computes the input gradient as forward
convolutions of the flipped kernel with its channels swapped (`input_gradient`: one for stride 1,
one per output phase for a strided convolution) and the kernel gradient as one matrix product
per kernel tap, each over contiguous rows of a 2-D array (the layout XLA:CPU's matrix multiply is
fastest on; no im2col patch tensor, no transposed copy):

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

Why the input gradient is written out for stride 1 too: XLA's transpose of a convolution is a
convolution with an 'OI'-ordered kernel. At the top level of a program XLA:CPU's layout pass
copies that kernel into the forward order and hands the convolution to its fast (YNNPACK)
kernels, but not inside a conditional's branch (the bucketed mask head,
`MaskRCNN._mask_head_loss_sum`): there it ran on the generic convolution loop at about 16
GFLOP/s against 150-200 for a forward convolution, and the head's forward + backward in a branch
took 2.2x its time outside (docs/performance.md). A forward convolution of the swapped kernel is
fast in both places.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint

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
  dx = input_gradient(g, kernel, x.shape, stride, padding)
  return dx, kernel_gradient(x, g, kernel.shape[:2], stride, padding).astype(kernel.dtype)


_conv_matmul_grad.defvjp(_forward, _backward)


def conv2d_products(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: Padding,
                    dtype=jnp.bfloat16, block_rows: int = 512,
                    gradient_block_rows: int = 1024) -> jnp.ndarray:
  """The convolution of `conv2d` as one matrix product per kernel tap, operands in `dtype`,
  accumulated and returned in float32 (``config.model.inference_products`` and
  ``config.model.train_products``, see below).

  Why: XLA:CPU runs a matrix product of bfloat16 operands with float32 accumulation
  (``preferred_element_type``) on the CPU's bfloat16 units (AMX, AVX512-BF16), about 2x (AMD
  Zen 4) to 3x (Intel AMX) its float32 speed, but its own bfloat16 convolution no faster than
  float32 (docs/performance.md, bench/bf16_products.py).

  How: the padded input is split into its ``stride x stride`` phases, each flattened to
  (N * Hq * Wq, C_in) rows; tap (i, j) reads phase (i % s, j % s) at the row offset
  ``(i // s) * Wq + j // s``, so output row r of the (N, Hq, Wq) grid is the sum over taps of
  ``rows[r + offset] @ kernel[i, j]``; the (Ho, Wo) corner of that grid is the convolution (a
  shifted row that runs past an image row lands on a grid position that is cropped). The work
  is Hq * Wq / (Ho * Wo) times the exact one (1.31 for the mask head's 14 x 14 RoIs, 1.02 for
  P2 of a 832x1344 canvas). A 1x1 kernel is a single product. Larger kernels run a loop over
  blocks of ``block_rows`` output rows, each block's tap products summed while they are in
  cache: summing whole-map products instead moves every tap's float32 output through memory
  (1.5-1.6x slower at P2 of 832x1344, 2026-12-03, AMD EPYC).

  Gradients (a custom VJP) are products in `dtype` too, accumulated in float32: the input
  gradient as `input_gradient`'s forward convolutions of the flipped kernel, each computed by
  this function, the kernel gradient as `kernel_gradient` of the rounded input and output
  gradient in blocks of ``gradient_block_rows`` rows (its ``block_rows``: the products in the
  standard layout that the bfloat16 kernels take). Products of bfloat16 numbers are exact in
  float32, so both equal float32 gradients of the rounded operands (x, kernel and the output
  gradient) up to float32 summation (tests/ops/test_conv.py). The residuals are the rounded x
  and kernel (half of float32's memory); the gradients come back in x's and the kernel's dtypes.
  """
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _products(x, kernel, int(stride), padding, jnp.dtype(dtype), int(block_rows),
                   int(gradient_block_rows))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _products(x, kernel, stride, padding, dtype, block_rows, gradient_block_rows):
  return _products_forward(x, kernel, stride, padding, dtype, block_rows)


def _products_fwd(x, kernel, stride, padding, dtype, block_rows, gradient_block_rows):
  xq, kq = x.astype(dtype), kernel.astype(dtype)
  # Zero-size arrays carry the primal dtypes to the backward.
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype))
  return _products_forward(xq, kq, stride, padding, dtype, block_rows), (xq, kq, dtypes)


def _products_bwd(stride, padding, dtype, block_rows, gradient_block_rows, residuals, g):
  xq, kq, (x_dtype, k_dtype) = residuals
  gq = g.astype(dtype)
  dx = input_gradient(gq, kq, xq.shape, stride, padding,
                      products=functools.partial(_products_forward, dtype=dtype,
                                                 block_rows=block_rows))
  dw = kernel_gradient(xq, gq, kq.shape[:2], stride, padding, block_rows=gradient_block_rows)
  return dx.astype(x_dtype.dtype), dw.astype(k_dtype.dtype)


_products.defvjp(_products_fwd, _products_bwd)


def dot_products(x: jnp.ndarray, y: jnp.ndarray, dtype=jnp.bfloat16) -> jnp.ndarray:
  """x (..., K) @ y (K, N) with operands rounded to `dtype` and products accumulated in float32
  (float32 result), gradients likewise: dx = g @ y^T and dy = x^T @ g of the rounded operands
  and output gradient, returned in x's and y's dtypes (autodiff would transpose the product in
  float32: `conv2d_products`' reasons)."""
  return _dot_products(x, y, jnp.dtype(dtype))


def _contract_last(a, b, b_axis: int):
  return lax.dot_general(a, b, (((a.ndim - 1,), (b_axis,)), ((), ())),
                         preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot_products(x, y, dtype):
  return _contract_last(x.astype(dtype), y.astype(dtype), 0)


def _dot_products_fwd(x, y, dtype):
  xq, yq = x.astype(dtype), y.astype(dtype)
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), y.dtype))
  return _contract_last(xq, yq, 0), (xq, yq, dtypes)


def _dot_products_bwd(dtype, residuals, g):
  xq, yq, (x_dtype, y_dtype) = residuals
  gq = g.astype(dtype)
  dx = _contract_last(gq, yq, 1)
  dy = _rows_contracted(xq.reshape(-1, xq.shape[-1]), gq.reshape(-1, gq.shape[-1]))
  return dx.astype(x_dtype.dtype), dy.astype(y_dtype.dtype)


_dot_products.defvjp(_dot_products_fwd, _dot_products_bwd)


def _transposed(a: jnp.ndarray) -> jnp.ndarray:
  """a (M, N) transposed into a row-major (N, M) array (a real copy).

  Why: XLA:CPU runs a bfloat16 matrix product on its bfloat16 units (AMX, AVX512-BF16) only in
  the standard form, lhs (M, K) and rhs (K, N), both row-major; a product that contracts the
  rows of both operands (x^T g, every kernel gradient) has its operands converted to float32
  first (8x slower on an Intel Xeon with AMX, docs/performance.md). A plain transpose does not
  help: XLA folds it into the product's dimension numbers or gives the operand a column-major
  layout. The layout constraint makes the transposed copy real (run eagerly it needs a
  jax.Array, hence the asarray).
  """
  return with_layout_constraint(jnp.asarray(a.T), Layout(major_to_minor=(0, 1)))


def _rows_contracted(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """a^T b, float32 (K, N), for a (M, K) and b (M, N): a transposed (`_transposed`), then one
  standard-form product. Nothing transposes the product's result: XLA may then give the
  product a column-major result, which its bfloat16 kernels cannot write (the fallback fails
  at run time: 'Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32', jax
  0.10.2), and holding the result row-major with a layout constraint made XLA return the
  program's outputs in another layout, which JAX read as row-major: wrong gradients
  (tests/ops/test_conv.py). Transposing b and then the result instead also measured up to 1.8x
  slower (the float32 result is the larger copy)."""
  return lax.dot(_transposed(a), b, preferred_element_type=jnp.float32)


def _products_forward(x, kernel, stride, padding, dtype, block_rows):
  """`conv2d_products`'s forward (its docstring): float32 (N, Ho, Wo, C_out)."""
  kh, kw, _, c_out = kernel.shape
  s = stride
  n = x.shape[0]
  (pt, pb), (pl, pr) = padding
  ho = (x.shape[1] + pt + pb - kh) // s + 1
  wo = (x.shape[2] + pl + pr - kw) // s + 1
  hq, wq = ho + (kh - 1) // s, wo + (kw - 1) // s
  phases = _phase_rows(x.astype(dtype), (kh, kw), s, padding, hq, wq)
  rows = n * hq * wq
  kernel = kernel.astype(dtype)
  if kh == kw == 1:
    y = lax.dot(phases[0, 0], kernel[0, 0], preferred_element_type=jnp.float32)
    return y.reshape(n, hq, wq, c_out)[:, :ho, :wo]
  taps = _tap_offsets((kh, kw), s, wq)
  max_offset = taps[-1][2]
  block, num_blocks, windows_at = _row_blocks(phases, rows, block_rows, max_offset)

  def block_products(index, out):
    start = index * block
    windows = windows_at(start)
    y = None
    for i, j, offset in taps:
      tap = lax.dot(lax.slice_in_dim(windows[i % s, j % s], offset, offset + block),
                    kernel[i, j], preferred_element_type=jnp.float32)
      y = tap if y is None else y + tap
    return lax.dynamic_update_slice_in_dim(out, y, start, 0)

  y = lax.fori_loop(0, num_blocks, block_products,
                    jnp.zeros((num_blocks * block, c_out), jnp.float32))
  return y[:rows].reshape(n, hq, wq, c_out)[:, :ho, :wo]


def kernel_gradient(x: jnp.ndarray, g: jnp.ndarray, kernel_size: Sequence[int], stride: int,
                    padding: Padding, block_rows: int | None = None) -> jnp.ndarray:
  """d(sum(g * conv(x, W))) / dW as (kh, kw, C_in, C_out) float32, by matrix products (see the
  module docstring).

  x: (N, H, W, C_in) the convolution's input; g: (N, Ho, Wo, C_out) its output gradient.
  block_rows: None: one product per tap over the whole map, contracting the rows of both
    operands (float32's fastest form on XLA:CPU). An int: the bfloat16 form
    (`conv2d_products`), every product in the standard form (`_transposed`): a 1x1 kernel is
    one product over the whole map; larger kernels loop over blocks of ``block_rows`` rows of
    g, each block's window of x transposed into a row-major (C_in, rows) copy whose column
    slices multiply g's block for every tap, the taps' (C_in, C_out) sums carried in float32.
    Blocks keep the window and g's block in cache: 1024 rows measured 2.9x the converted
    whole-map products at P2 of 832x1344 on an Intel Xeon with AMX (docs/performance.md).
  """
  kh, kw = kernel_size
  s = stride
  _, ho, wo, c_out = g.shape
  c_in = x.shape[-1]
  # The phase grid: tap (i, j) reads rows h + i // s and columns w + j // s of its phase.
  hq, wq = ho + (kh - 1) // s, wo + (kw - 1) // s
  phases = _phase_rows(x, (kh, kw), s, padding, hq, wq)
  g = jnp.pad(g, ((0, 0), (0, hq - ho), (0, wq - wo), (0, 0))).reshape(-1, c_out)
  offsets = _tap_offsets((kh, kw), s, wq)
  max_offset = offsets[-1][2]
  rows = g.shape[0] - max_offset
  g = g[:rows]
  if block_rows is None:
    taps = [lax.dot_general(lax.slice_in_dim(phases[i % s, j % s], offset, offset + rows), g,
                            (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            for i, j, offset in offsets]
    return jnp.stack(taps).reshape(kh, kw, c_in, c_out)
  if len(offsets) == 1:
    return _rows_contracted(phases[0, 0][:rows], g).reshape(1, 1, c_in, c_out)
  block, num_blocks, windows_at = _row_blocks(phases, rows, block_rows, max_offset)
  # Zero rows of g past the end add nothing.
  g = jnp.pad(g, ((0, num_blocks * block - rows), (0, 0)))

  def block_products(index, sums):
    start = index * block
    g_block = lax.dynamic_slice_in_dim(g, start, block)
    windows = {key: _transposed(window) for key, window in windows_at(start).items()}
    return tuple(
        total + lax.dot(lax.slice_in_dim(windows[i % s, j % s], offset, offset + block, axis=1),
                        g_block, preferred_element_type=jnp.float32)
        for total, (i, j, offset) in zip(sums, offsets))

  sums = lax.fori_loop(0, num_blocks, block_products,
                       tuple(jnp.zeros((c_in, c_out), jnp.float32) for _ in offsets))
  return jnp.stack(sums).reshape(kh, kw, c_in, c_out)


def _row_blocks(phases, rows: int, block_rows: int, max_offset: int):
  """Blocks of ``block_rows`` output rows over ``rows`` (the last one partial) for the blocked
  tap products of `_products_forward` and `kernel_gradient`: (block, num_blocks,
  windows_at), where ``windows_at(start)`` gives every phase's rows [start, start + block +
  max_offset), the phases zero-padded so that the last block's window exists."""
  block = min(block_rows, rows)
  num_blocks = -(-rows // block)
  length = num_blocks * block + max_offset
  padded = {key: jnp.pad(phase, ((0, length - phase.shape[0]), (0, 0)))
            for key, phase in phases.items()}

  def windows_at(start):
    return {key: lax.dynamic_slice_in_dim(phase, start, block + max_offset)
            for key, phase in padded.items()}

  return block, num_blocks, windows_at


def _phase_rows(x, kernel_size: Sequence[int], s: int, padding: Padding, hq: int, wq: int):
  """The zero-padded x (N, H, W, C) cropped or padded to the (s * hq, s * wq) phase grid and
  split into its s x s phases (only those a kernel tap reads), each flattened to
  (N * hq * wq, C) rows: {(a, b): x_padded[:, a::s, b::s] as rows}."""
  kh, kw = kernel_size
  n, c = x.shape[0], x.shape[-1]
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  grid = _fit(_fit(x, 1, s * hq), 2, s * wq).reshape(n, hq, s, wq, s, c)
  return {(a, b): grid[:, :, a, :, b].reshape(-1, c)
          for a in range(min(s, kh)) for b in range(min(s, kw))}


def _tap_offsets(kernel_size: Sequence[int], s: int, wq: int) -> list[tuple[int, int, int]]:
  """(i, j, row offset) per kernel tap in row-major order: tap (i, j) reads phase
  (i % s, j % s) at rows shifted by (i // s) * wq + j // s; the last offset is the largest."""
  kh, kw = kernel_size
  return [(i, j, (i // s) * wq + j // s) for i in range(kh) for j in range(kw)]


def input_gradient(g: jnp.ndarray, kernel: jnp.ndarray, x_shape: Sequence[int], stride: int,
                   padding: Padding, products=None) -> jnp.ndarray:
  """d(sum(g * conv(x, kernel))) / dx as stride-1 forward convolutions, one per output phase
  (one in all for stride 1; for stride s XLA's transpose convolves the zero-dilated gradient:
  s * s times the work).

  Input row n meets kernel row t at output row (n + pad - t) / s, so the rows with
  (n + pad) % s == r see only taps r, r + s, ...: their gradient is a stride-1 convolution of g
  with that sub-kernel, flipped, inputs and outputs swapped. Each phase's result is placed on
  every s-th row and column of dx (interior padding) and the phases summed.

  g: (N, Ho, Wo, C_out); kernel: (kh, kw, C_in, C_out); x_shape: (N, H, W, C_in).
  products: None (XLA's convolutions, in g's dtype) or ``products(g, kernel, stride, padding)``
  computing each phase's 'VALID' stride-1 convolution (`conv2d_products`' forward: float32).
  """
  s = stride
  zero = jnp.zeros((), g.dtype)
  rows = [_phase(x_shape[1], kernel.shape[0], s, padding[0][0], g.shape[1], r) for r in range(s)]
  cols = [_phase(x_shape[2], kernel.shape[1], s, padding[1][0], g.shape[2], r) for r in range(s)]
  dx = None
  for rh, (taps_h, lo_h, hi_h, first_h, count_h) in enumerate(rows):
    for rw, (taps_w, lo_w, hi_w, first_w, count_w) in enumerate(cols):
      if not (taps_h and taps_w and count_h > 0 and count_w > 0):
        continue  # no tap reaches these rows or columns (a 1x1 kernel's odd phases)
      sub = jnp.flip(kernel[rh::s, rw::s], (0, 1)).swapaxes(2, 3)
      grad = lax.pad(g, zero, ((0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)))
      if products is None:
        phase = lax.conv_general_dilated(grad, sub, (1, 1), 'VALID',
                                         dimension_numbers=_DIMENSIONS)
      else:
        phase = products(grad, sub, 1, ((0, 0), (0, 0)))
      placed = lax.pad(phase, jnp.zeros((), phase.dtype), (
          (0, 0, 0), (first_h, x_shape[1] - first_h - s * (count_h - 1) - 1, s - 1),
          (first_w, x_shape[2] - first_w - s * (count_w - 1) - 1, s - 1), (0, 0, 0)))
      dx = placed if dx is None else dx + placed
  if dx is None:
    return jnp.zeros(x_shape, jnp.float32 if products else g.dtype)
  return dx


def _phase(size: int, k: int, s: int, pad: int, out_size: int, r: int):
  """Along one axis, the input rows n with (n + pad) % s == r: (taps, lo, hi, first, count).

  Row n = s * m + r - pad gets sum_j g[m - j] * kernel[r + s * j] over its ``taps`` j; rows m
  from m0 = ceil((pad - r) / s) for ``count`` rows (the first is input row ``first``); ``lo``,
  ``hi``: the padding (negative: cropping) of g that makes it a 'VALID' convolution.
  """
  taps = max(0, -(-(k - r) // s))
  m0 = max(0, -(-(pad - r) // s))
  count = (size - 1 + pad - r) // s - m0 + 1
  lo = taps - 1 - m0
  return taps, lo, count + taps - 1 - out_size - lo, s * m0 + r - pad, count


def _fit(x, axis: int, size: int):
  """x cropped or zero-padded at the end of ``axis`` to ``size``."""
  if x.shape[axis] >= size:
    return lax.slice_in_dim(x, 0, size, axis=axis)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)
