"""Exact greedy non-maximum suppression with static shapes (RPN proposal selection built on it:
:mod:`maskrcnn_jax.ops.proposals`).

Boxes are ``xyxy`` in absolute pixels (see :mod:`maskrcnn_jax.ops.boxes`). Every function here is
jit-able and vmap-able; results have fixed sizes plus a validity mask.

Greedy NMS (torchvision ``nms``): visit the candidates in descending score order, keep one unless
an already kept box overlaps it with IoU strictly greater than the threshold. The visit order
breaks score ties by the lower input index first, as torchvision's CPU kernel (a stable descending
sort). Scores equal to -0.0 and +0.0 are treated as ties too (IEEE equality, as torch compares).

GPU-friendly formulation. A loop over the boxes one at a time costs one kernel launch per box, and
a ``lax.while_loop`` with a data-dependent trip count syncs its predicate to the host on every
iteration on XLA GPU (DESIGN.md). Instead, with the candidates sorted by score:

1. Split them into tiles of ``tile_size`` consecutive boxes (a Python loop: straight-line code,
   ``ceil(N / tile_size)`` tiles).
2. For tile ``t``, one matrix op computes ``over = IoU(tile boxes, all boxes up to the tile's end) >
   threshold`` (rounded exactly as torchvision, :func:`_overlaps`). A box of the tile survives the
   earlier tiles iff no already kept earlier box overlaps it:
   ``cand = valid & ~any(over[:, :start] & kept_before)``, one float32 mat-vec.
3. Inside the tile the greedy dependency ``keep_i = cand_i & ~any_{j<i}(keep_j & over_ij)`` is a
   triangular boolean system. It is solved by the Jacobi fixed-point iteration
   ``k <- cand & ~any(over_lower & k)`` from ``k = cand``, run until nothing changes. Entry ``i``
   depends only on entries ``j < i``, so after ``d + 1`` sweeps every entry whose longest chain of
   overlapping earlier candidates has length ``d`` is final: the loop ends after at most
   ``tile_size + 1`` sweeps, and a fixed point of a strictly lower-triangular system is unique, so
   the result is exactly the greedy one (not an approximation such as Fast NMS / Matrix NMS). On
   proposal workloads it ends after a handful of sweeps (bench/ops.py prints the counts); this is
   also the scheme of the reference's TPU/TF2 ``non_max_suppression_padded``.

This computes about half of the ``N x N`` IoU matrix (tile rows against earlier columns only).
Per-class NMS (:func:`batched_nms`) masks ``over`` to pairs of the same class instead of shifting
boxes by a per-class offset (torchvision's coordinate trick): the mask is exact, where the shifted
coordinates round differently from the original ones.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from maskrcnn_jax.ops import numerics

# Tile length of the blocked greedy resolution. Larger tiles mean fewer fixed-point loops (fewer
# host syncs on GPU) for more work per sweep. On the 2-core CPU 256 and 512 were within 10% of
# each other for the reference's 2000-candidate levels (1024: 1.5x, 2048: 2.5x slower); 512 halves
# the loops of 256 and is the reference's TPU tile size. Not yet measured on a GPU.
DEFAULT_TILE_SIZE = 512


def _float32_threshold(iou_threshold):
  """The float32 threshold ``t32`` with ``iou > t32  <=>  iou > iou_threshold`` for float32 IoUs.

  torchvision compares its float32 IoU with the threshold as a C++ double, so an IoU that rounds
  to exactly float32(0.3) = 0.30000001 counts as above 0.3 (boxes on an integer grid hit such
  ties). Rounding a Python threshold down to float32 keeps that comparison exact; a traced or
  float32 threshold is used as given.
  """
  if isinstance(iou_threshold, (int, float, np.floating, np.integer)):
    value = float(iou_threshold)
    t32 = np.float32(value)
    if float(t32) > value:
      t32 = np.nextafter(t32, np.float32(-np.inf))
    return t32
  return jnp.asarray(iou_threshold, jnp.float32)



def _overlaps(rows: jnp.ndarray, cols: jnp.ndarray, threshold) -> jnp.ndarray:
  """``IoU(rows[i], cols[j]) > threshold``, rounded exactly as torchvision's CPU kernel.

  Args:
    rows: (T, 4) float32 xyxy; cols: (M, 4) float32 xyxy; threshold: float32 scalar.

  Returns:
    (T, M) bool.

  Not :func:`maskrcnn_jax.ops.boxes.box_iou`: there XLA contracts the area products into the
  additions (FMA), and 0.8% of IoUs of random boxes came out 1-4 ulps away from torchvision's,
  enough to flip a decision whose IoU sits at the threshold. Here every product is rounded
  before it is added, in torchvision's order ``inter / ((area_i + area_j) - inter)``; areas are
  not clamped (an inverted box has a negative area, as in torchvision), and a pair with zero
  union gives NaN, which is never above the threshold (torchvision: the same).
  """
  def area(b):
    return numerics.rounded((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))

  x1 = jnp.maximum(rows[:, None, 0], cols[None, :, 0])
  y1 = jnp.maximum(rows[:, None, 1], cols[None, :, 1])
  x2 = jnp.minimum(rows[:, None, 2], cols[None, :, 2])
  y2 = jnp.minimum(rows[:, None, 3], cols[None, :, 3])
  inter = numerics.rounded(jnp.maximum(x2 - x1, 0.0) * jnp.maximum(y2 - y1, 0.0))
  union = (area(rows)[:, None] + area(cols)[None, :]) - inter
  return inter / union > threshold


def _resolve_tile(cand: jnp.ndarray, over_lower: jnp.ndarray) -> jnp.ndarray:
  """Exact greedy keep mask of one tile given its candidates and its intra-tile overlaps.

  Args:
    cand: (T,) bool, candidates not suppressed by boxes kept in earlier tiles, in score order.
    over_lower: (T, T) bool, ``over_lower[i, j]`` = box ``j`` precedes ``i`` (``j < i``) and their
      IoU (and class, for per-class NMS) would let ``j`` suppress ``i``.

  Returns:
    (T,) bool, the greedy keep mask (the unique fixed point of ``k = cand & ~any(over_lower & k)``).
  """

  # A float32 mat-vec is much faster than a boolean any-reduction on XLA CPU and maps to the
  # tensor cores' neighbours on GPU; counts of at most T ones are exact in float32.
  over_f = over_lower.astype(jnp.float32)

  def sweep(keep):
    return cand & ~(over_f @ keep.astype(jnp.float32) > 0.0)

  def not_converged(state):
    previous, current = state
    return jnp.any(previous != current)

  def body(state):
    _, current = state
    return current, sweep(current)

  _, keep = lax.while_loop(not_converged, body, (cand, sweep(cand)))
  return keep


def greedy_keep_sorted(boxes: jnp.ndarray, valid: jnp.ndarray, iou_threshold,
                       classes: jnp.ndarray | None = None,
                       tile_size: int = DEFAULT_TILE_SIZE) -> jnp.ndarray:
  """Greedy NMS keep mask of candidates already sorted by descending score.

  Args:
    boxes: (N, 4) float32 xyxy, sorted by descending score.
    valid: (N,) bool; invalid candidates are never kept (and so never suppress anything).
    iou_threshold: scalar; ``j`` suppresses ``i`` when IoU(i, j) > iou_threshold.
    classes: optional (N,) int; if given only boxes of the same class suppress each other.
    tile_size: static tile length (see the module docstring).

  Returns:
    (N,) bool keep mask in the same (sorted) order.
  """
  n = boxes.shape[0]
  iou_threshold = _float32_threshold(iou_threshold)
  kept_tiles = []
  for start in range(0, n, tile_size):
    end = min(start + tile_size, n)
    # Only columns before the tile's end matter: later boxes cannot suppress earlier ones.
    over = _overlaps(boxes[start:end], boxes[:end], iou_threshold)
    if classes is not None:
      over &= classes[start:end, None] == classes[None, :end]
    cand = valid[start:end]
    if start > 0:
      kept_before = jnp.concatenate(kept_tiles)
      cand &= ~(over[:, :start].astype(jnp.float32) @ kept_before.astype(jnp.float32) > 0.0)
    rows = jnp.arange(end - start)
    over_lower = over[:, start:end] & (rows[None, :] < rows[:, None])
    kept_tiles.append(_resolve_tile(cand, over_lower))
  return jnp.concatenate(kept_tiles)


def _sort_order(scores: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """Indices sorting valid candidates by descending score, ties by lower index; invalid last.

  scores: (N,) float32, valid: (N,) bool -> (N,) int32 permutation.
  """
  # lax.sort orders floats totally (-0.0 before +0.0); torch compares them equal, so fold -0.0.
  scores = jnp.where(scores == 0.0, 0.0, scores)
  key = jnp.where(valid, -scores, jnp.inf)
  iota = jnp.arange(scores.shape[0], dtype=jnp.int32)
  # Stable ascending sort of -score == stable descending sort of score.
  _, order = lax.sort_key_val(key, iota, is_stable=True)
  return order


def compact(keep: jnp.ndarray, order: jnp.ndarray, max_output_size: int):
  """First ``max_output_size`` kept entries of ``order``.

  keep: (N,) bool, order: (N,) int32 -> (indices (K,) int32, valid (K,) bool), unused slots 0.
  """
  rank = jnp.cumsum(keep.astype(jnp.int32)) - 1
  slot = jnp.where(keep & (rank < max_output_size), rank, max_output_size)
  indices = jnp.zeros((max_output_size,), jnp.int32).at[slot].set(order, mode='drop')
  count = jnp.sum(keep.astype(jnp.int32))
  valid = jnp.arange(max_output_size) < count
  return indices, valid


def _nms_impl(boxes, scores, iou_threshold, max_output_size, valid, classes, tile_size):
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  n = scores.shape[0]
  if boxes.shape != (n, 4):
    raise ValueError(f'boxes must be (N, 4) for scores of shape ({n},), got {boxes.shape}.')
  # -inf and NaN scores mark padding (masked top-k fills with -inf): never kept.
  ok = scores > -jnp.inf
  if valid is not None:
    ok &= jnp.asarray(valid, bool)
  order = _sort_order(scores, ok)
  sorted_classes = None if classes is None else jnp.asarray(classes)[order]
  keep = greedy_keep_sorted(boxes[order], ok[order], iou_threshold, sorted_classes, tile_size)
  return compact(keep, order, max_output_size)


def nms(boxes, scores, iou_threshold, max_output_size: int, valid=None, *,
        tile_size: int = DEFAULT_TILE_SIZE):
  """Exact greedy NMS with a fixed-size output (torchvision ``nms(...)[:max_output_size]``).

  Args:
    boxes: (N, 4) float32 xyxy, absolute pixels. IoUs are rounded exactly as torchvision's CPU
      kernel (see :func:`_overlaps`): zero-area boxes neither suppress nor get suppressed, and
      inverted boxes (x2 < x1) get torchvision's negative area.
    scores: (N,) float. ``-inf`` and NaN scores mark padding: such candidates are never kept.
    iou_threshold: scalar; a kept box suppresses another when their float32 IoU is strictly
      greater than it. A Python float is compared exactly as torchvision does (float32 IoU against
      the double threshold); a traced value is used as float32.
    max_output_size: static int K, the number of output slots (may exceed N).
    valid: optional (N,) bool; False marks padding, never kept and never suppressing.
    tile_size: static tile length of the blocked resolution (any value gives the same result).

  Returns:
    indices: (K,) int32 indices into ``boxes`` of the kept boxes in descending score order (score
      ties: lower index first); slots past the number kept hold 0.
    valid: (K,) bool, True for the slots that hold a kept box.
  """
  return _nms_impl(boxes, scores, iou_threshold, max_output_size, valid, None, tile_size)


def batched_nms(boxes, scores, classes, iou_threshold, max_output_size: int, valid=None, *,
                tile_size: int = DEFAULT_TILE_SIZE):
  """Per-class exact greedy NMS (torchvision ``batched_nms(...)[:max_output_size]``).

  Boxes of different classes never suppress each other; the kept boxes of all classes come out
  merged in descending score order (ties: lower index first).

  Args:
    boxes: (N, 4) float32 xyxy, absolute pixels.
    scores: (N,) float; ``-inf`` / NaN mark padding.
    classes: (N,) int class (or level) of each box.
    iou_threshold: scalar IoU threshold (strictly greater suppresses).
    max_output_size: static int K.
    valid: optional (N,) bool padding mask.
    tile_size: static tile length.

  Returns:
    (indices (K,) int32, valid (K,) bool) as :func:`nms`.
  """
  return _nms_impl(boxes, scores, iou_threshold, max_output_size, valid, jnp.asarray(classes),
                   tile_size)
