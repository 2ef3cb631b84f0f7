"""bfloat16 matrix products and 3x3 convolutions built from them, against float32, on the CPU.

Why: these CPUs' AMX units multiply bfloat16 matrices several times faster than AVX-512 does in
float32, and XLA:CPU reaches that speed only for a dot with bfloat16 operands and float32
accumulation (``preferred_element_type``), not for its bfloat16 convolution. This measures whether
a 3x3 convolution written as such products would take the AMX speed (docs/performance.md).

Convolutions (NHWC, 256 -> 256 channels, 3x3, stride 1, padding 1) on the zero-padded input
flattened to (N * (H + 2) * (W + 2), C) rows, where tap (i, j) is the row offset i * (W + 2) + j:

* ``xla_f32`` / ``xla_bf16``: ``lax.conv_general_dilated`` (bf16 operands, float32 accumulation);
* ``taps``: 9 products of row-shifted slices with the tap's kernel, summed in float32;
* ``im2col``: the 9 shifted slices concatenated along channels, one product with K = 9 * C;
* ``outputs``: one product with all 9 taps' kernels side by side (N = 9 * C_out), then the 9
  row-shifted column blocks of its output summed.

Prints ms (min of --repeats) and GFLOP/s per variant, and each one's largest difference from
float32 relative to the largest output. Run: ``.venv/bin/python bench/bf16_products.py``.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskrcnn_jax import huge_pages

BF16 = jnp.bfloat16
F32 = jnp.float32


def _conv(x, k, dtype):
  return lax.conv_general_dilated(x.astype(dtype), k.astype(dtype), (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  preferred_element_type=F32)


def _rows(x):
  """Padded input as bf16 rows, with room for the largest tap offset; rows per image grid, Wp."""
  n, h, w, c = x.shape
  padded = jnp.pad(x.astype(BF16), ((0, 0), (1, 1), (1, 1), (0, 0)))
  m = n * (h + 2) * (w + 2)
  return jnp.pad(padded.reshape(m, c), ((0, 2 * (w + 2) + 2), (0, 0))), m, w + 2


def _crop(y, x):
  n, h, w, _ = x.shape
  return y.reshape(n, h + 2, w + 2, -1)[:, :h, :w]


def _offsets(wp):
  return [(i, j, i * wp + j) for i in range(3) for j in range(3)]


def taps(x, k):
  rows, m, wp = _rows(x)
  kb = k.astype(BF16)
  out = sum(jnp.dot(rows[o:o + m], kb[i, j], preferred_element_type=F32)
            for i, j, o in _offsets(wp))
  return _crop(out, x)


def im2col(x, k):
  rows, m, wp = _rows(x)
  patches = jnp.concatenate([rows[o:o + m] for _, _, o in _offsets(wp)], axis=1)
  kb = k.astype(BF16).reshape(-1, k.shape[-1])
  return _crop(jnp.dot(patches, kb, preferred_element_type=F32), x)


def outputs(x, k):
  rows, m, wp = _rows(x)
  c, co = k.shape[2], k.shape[3]
  side_by_side = k.astype(BF16).transpose(2, 0, 1, 3).reshape(c, 9 * co)
  y = jnp.dot(rows, side_by_side, preferred_element_type=F32)
  out = sum(y[o:o + m, (3 * i + j) * co:(3 * i + j + 1) * co] for i, j, o in _offsets(wp))
  return _crop(out, x)


CONVS = {'xla_f32': lambda x, k: _conv(x, k, F32), 'xla_bf16': lambda x, k: _conv(x, k, BF16),
         'taps': taps, 'im2col': im2col, 'outputs': outputs}
CONV_SHAPES = ((128, 14, 14, 256), (1, 128, 128, 256), (1, 208, 336, 256))
DOT_SHAPES = ((4096, 2304, 256), (16384, 256, 256), (25088, 256, 256), (25088, 2304, 256),
              (1000, 12544, 1024))


def _time(fn, args, repeats):
  fn = jax.jit(fn)
  result = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times) * 1e3, result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  for m, kk, n in DOT_SHAPES:
    a = jnp.asarray(rng.standard_normal((m, kk)), F32)
    b = jnp.asarray(rng.standard_normal((kk, n)), F32)
    gflop = 2 * m * kk * n / 1e9
    variants = {'f32': (lambda p, q: p @ q, (a, b)),
                'bf16->f32': (lambda p, q: jnp.dot(p, q, preferred_element_type=F32),
                              (a.astype(BF16), b.astype(BF16))),
                'bf16->bf16': (lambda p, q: p @ q, (a.astype(BF16), b.astype(BF16)))}
    for name, (fn, operands) in variants.items():
      ms, _ = _time(fn, operands, args.repeats)
      print(f'dot {m}x{kk}x{n} {name:10s} {ms:8.1f} ms {gflop / ms * 1e3:6.0f} GFLOP/s', flush=True)
  for shape in CONV_SHAPES:
    x = jnp.asarray(rng.standard_normal(shape), F32)
    k = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 256)) * 0.02, F32)
    gflop = 2 * np.prod(shape) * 9 * 256 / 1e9
    reference = None
    for name, fn in CONVS.items():
      ms, y = _time(fn, (x, k), args.repeats)
      reference = y if reference is None else reference
      err = float(jnp.max(jnp.abs(y - reference)) / jnp.max(jnp.abs(reference)))
      print(f'conv3x3 {"x".join(map(str, shape))} {name:8s} {ms:8.1f} ms '
            f'{gflop / ms * 1e3:6.0f} GFLOP/s  rel. diff {err:.1e}', flush=True)


if __name__ == '__main__':
  huge_pages.restart_with_huge_pages()
  main()
