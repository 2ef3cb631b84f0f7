"""Exact greedy non-maximum suppression with static shapes, and RPN proposal selection.

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

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskrcnn_jax.ops import numerics
from maskrcnn_jax.ops.boxes import BBOX_XFORM_CLIP, clip_boxes, decode_boxes

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


def _greedy_keep_sorted(boxes: jnp.ndarray, valid: jnp.ndarray, iou_threshold,
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


def _compact(keep: jnp.ndarray, order: jnp.ndarray, max_output_size: int):
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
  keep = _greedy_keep_sorted(boxes[order], ok[order], iou_threshold, sorted_classes, tile_size)
  return _compact(keep, order, max_output_size)


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


def multilevel_proposals(scores: Mapping[str, jnp.ndarray], deltas: Mapping[str, jnp.ndarray],
                         anchors: Mapping[str, jnp.ndarray], image_sizes, pre_nms_topk: int,
                         post_nms_topk: int, nms_threshold: float, min_size: float = 0.0,
                         box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                         scale_clamp: float = BBOX_XFORM_CLIP, *,
                         tile_size: int = DEFAULT_TILE_SIZE):
  """RPN proposals: per-level top-k, decode, clip, size filter, NMS; then the overall top-k.

  The reference's proposal selection (``multilevel_propose_rois``), level by level in sorted key
  order ('p2' < 'p3' < ...):

  1. keep the ``k_l = min(pre_nms_topk, N_l)`` highest objectness logits (``lax.top_k``; ties:
     lower anchor index first);
  2. decode their deltas against their anchors (:func:`decode_boxes` with ``box_weights`` and
     ``scale_clamp``) and clip to the image's valid region ``[0, w] x [0, h]``;
  3. drop boxes with width or height ``< min_size``. With the reference's ``min_size = 0`` nothing
     is dropped, not even empty boxes (a box wholly outside the valid region clips to zero width);
     such boxes have IoU 0 with everything, so they are never suppressed and rank by score like
     the rest. torchvision's ``remove_small_boxes`` is the same test (its default 1e-3 drops the
     empty ones);
  4. greedy NMS (IoU > ``nms_threshold``) keeping at most ``min(post_nms_topk, k_l)`` per level
     (a level cannot contribute more than ``post_nms_topk`` to the merged result);
  5. merge the levels and keep the ``post_nms_topk`` highest logits (ties: lower level, then higher
     rank within its level).

  This equals torchvision's ``RegionProposalNetwork.filter_proposals`` with ``score_thresh = 0``
  (``batched_nms`` with the level as the class, then the first ``post_nms_top_n``), which sorts by
  ``sigmoid(logit)``: the two orders differ only between logits whose float32 sigmoids tie (above
  about 17, where sigmoid rounds to 1), which torchvision then orders by position.

  The levels are padded to the largest ``k_l`` and their NMS runs as one vmapped call, so on GPU
  all levels share one set of fixed-point loops. ``lax.top_k`` is a partial-sort custom call on
  CPU (a two-stage top-k measured 7x slower there, so it is not used); on GPU XLA may lower a
  large k to a full sort of the level -- still fast for 2 x 210k anchors, but worth measuring on
  the device. Gradients are stopped: proposals are constants for the heads (as the reference).

  Args:
    scores: level -> (B, N_l) float objectness logits.
    deltas: level -> (B, N_l, 4) float box deltas (dx, dy, dw, dh).
    anchors: level -> (N_l, 4) float32 xyxy anchors, absolute canvas pixels.
    image_sizes: (B, 2) int (height, width) of each image's valid (unpadded) region.
    pre_nms_topk: static per-level candidate count (the reference: 2000 train, 1000 test).
    post_nms_topk: static output count (the reference: 1000).
    nms_threshold: IoU threshold (the reference: 0.7).
    min_size: minimum box width and height after clipping (the reference: 0).
    box_weights: (wx, wy, ww, wh) of the box coder (the reference's RPN: all 1).
    scale_clamp: upper clamp on dw, dh before exp.
    tile_size: static NMS tile length.

  Returns:
    boxes: (B, post_nms_topk, 4) float32 xyxy proposals in descending score order (0 in unused
      slots).
    scores: (B, post_nms_topk) float32 logits (-inf in unused slots).
    valid: (B, post_nms_topk) bool.
  """
  levels = sorted(scores.keys())
  if set(levels) != set(deltas.keys()) or set(levels) != set(anchors.keys()):
    raise ValueError('scores, deltas and anchors must have the same levels, got '
                     f'{sorted(scores)}, {sorted(deltas)}, {sorted(anchors)}.')
  image_sizes = jnp.asarray(image_sizes)
  height = image_sizes[:, 0, None].astype(jnp.float32)
  width = image_sizes[:, 1, None].astype(jnp.float32)

  per_level_k = [min(pre_nms_topk, scores[lvl].shape[1]) for lvl in levels]
  k_max = max(per_level_k)
  level_boxes, level_scores, level_valid = [], [], []
  for lvl, k in zip(levels, per_level_k):
    logits = lax.stop_gradient(jnp.asarray(scores[lvl], jnp.float32))
    level_deltas = lax.stop_gradient(jnp.asarray(deltas[lvl], jnp.float32))
    level_anchors = jnp.asarray(anchors[lvl], jnp.float32)
    top_scores, top_idx = lax.top_k(logits, k)  # (B, k), sorted, ties -> lower index
    top_deltas = jnp.take_along_axis(level_deltas, top_idx[..., None], axis=1)
    boxes = decode_boxes(top_deltas, level_anchors[top_idx], box_weights, scale_clamp)
    boxes = clip_boxes(boxes, height, width)
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    ok = (w >= min_size) & (h >= min_size) & (top_scores > -jnp.inf)
    pad = k_max - k
    level_boxes.append(jnp.pad(boxes, ((0, 0), (0, pad), (0, 0))))
    level_scores.append(jnp.pad(top_scores, ((0, 0), (0, pad)), constant_values=-jnp.inf))
    level_valid.append(jnp.pad(ok, ((0, 0), (0, pad))))

  boxes = jnp.stack(level_boxes, axis=1)  # (B, L, k_max, 4)
  top_scores = jnp.stack(level_scores, axis=1)  # (B, L, k_max)
  ok = jnp.stack(level_valid, axis=1)
  per_level_out = min(post_nms_topk, k_max)

  def level_nms(b, v):
    # top_k already sorted the candidates (descending, ties by index): no second sort.
    keep = _greedy_keep_sorted(b, v, nms_threshold, None, tile_size)
    order = jnp.arange(b.shape[0], dtype=jnp.int32)
    return _compact(keep, order, per_level_out)

  idx, kept = jax.vmap(jax.vmap(level_nms))(boxes, ok)  # (B, L, per_level_out)
  # A level with k_l < per_level_out has no candidates in the padded slots: kept is False there.
  nms_boxes = jnp.take_along_axis(boxes, idx[..., None], axis=2)
  nms_scores = jnp.where(kept, jnp.take_along_axis(top_scores, idx, axis=2), -jnp.inf)

  num_levels = len(levels)
  flat_scores = nms_scores.reshape(nms_scores.shape[0], num_levels * per_level_out)
  flat_boxes = nms_boxes.reshape(nms_boxes.shape[0], num_levels * per_level_out, 4)
  flat_kept = kept.reshape(flat_scores.shape)
  out_k = post_nms_topk
  if flat_scores.shape[1] < out_k:  # fewer candidates than requested: pad with empty slots
    extra = out_k - flat_scores.shape[1]
    flat_scores = jnp.pad(flat_scores, ((0, 0), (0, extra)), constant_values=-jnp.inf)
    flat_boxes = jnp.pad(flat_boxes, ((0, 0), (0, extra), (0, 0)))
    flat_kept = jnp.pad(flat_kept, ((0, 0), (0, extra)))
  # Level-major, rank-minor layout + top_k's lower-index-first tie rule = the documented ties.
  out_scores, out_idx = lax.top_k(flat_scores, out_k)
  out_valid = jnp.take_along_axis(flat_kept, out_idx, axis=1)
  out_boxes = jnp.take_along_axis(flat_boxes, out_idx[..., None], axis=1)
  out_boxes = jnp.where(out_valid[..., None], out_boxes, 0.0)
  out_scores = jnp.where(out_valid, out_scores, -jnp.inf)
  return out_boxes, out_scores, out_valid
