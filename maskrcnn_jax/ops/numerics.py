"""Float32 rounding controls for ops that must round exactly as torchvision's kernels.

XLA (CPU and GPU) contracts ``a * b + c`` inside a fusion into one fused multiply-add, which skips
the rounding of the product, and rewrites a division by a broadcast scalar into a multiplication
by its reciprocal (off by one ulp in about half the cases, e.g. ``x / 7``). Neither matters for
training, but both flip decisions that sit exactly at a threshold (NMS) and move RoIAlign sample
points by an ulp, so the ops compared bit-for-bit with torchvision use these two helpers.
"""

import jax.numpy as jnp


def rounded(x):
  """``x``, forced to be rounded to float32 before it feeds an addition (blocks FMA contraction).

  The select is an identity (NaN included) that LLVM cannot see through, so the multiply that
  produced ``x`` and the following add stay two correctly rounded operations.
  """
  return jnp.where(x == x, x, jnp.nan)


def divide(x, divisor):
  """``x / divisor`` for a scalar divisor, correctly rounded (no reciprocal rewrite).

  Dividing by a select that XLA cannot prove to be a broadcast keeps the IEEE division.
  """
  return x / jnp.where(x == x, jnp.float32(divisor), jnp.nan)
