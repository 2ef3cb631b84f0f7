"""RPN proposal selection: per-level top-k, decode, clip, size filter, NMS, overall top-k.

Boxes are ``xyxy`` in absolute pixels of the padded canvas; results have fixed sizes plus a
validity mask (`Proposals`).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from maskrcnn_jax.ops import nms as nms_lib
from maskrcnn_jax.ops.boxes import BBOX_XFORM_CLIP, clip_boxes, decode_boxes


class Proposals(NamedTuple):
  """RPN proposals of a batch, best first: boxes (B, P, 4) float32 xyxy (0 in unused slots),
  scores (B, P) float32 logits (-inf in unused slots), valid (B, P) bool."""
  boxes: jnp.ndarray
  scores: jnp.ndarray
  valid: jnp.ndarray


def multilevel_proposals(scores: Mapping[str, jnp.ndarray], deltas: Mapping[str, jnp.ndarray],
                         anchors: Mapping[str, jnp.ndarray], image_sizes, pre_nms_topk: int,
                         post_nms_topk: int, nms_threshold: float, min_size: float = 0.0,
                         box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                         scale_clamp: float = BBOX_XFORM_CLIP, *,
                         tile_size: int = nms_lib.DEFAULT_TILE_SIZE):
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
    `Proposals`: boxes (B, post_nms_topk, 4) float32 xyxy in descending score order (0 in unused
    slots), scores (B, post_nms_topk) float32 logits (-inf in unused slots), valid
    (B, post_nms_topk) bool.
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
    keep = nms_lib.greedy_keep_sorted(b, v, nms_threshold, None, tile_size)
    order = jnp.arange(b.shape[0], dtype=jnp.int32)
    return nms_lib.compact(keep, order, per_level_out)

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
  return Proposals(boxes=out_boxes, scores=out_scores, valid=out_valid)
