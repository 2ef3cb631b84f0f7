"""Detection post-processing: box-head outputs of one image -> its final detections.

torchvision's ``postprocess_detections`` (and the reference's ``generate_detections``) with
static shapes: fixed ``max_detections`` slots plus a validity mask, boxes xyxy in absolute pixels
of the padded canvas.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from maskrcnn_jax.ops.boxes import clip_boxes, decode_boxes
from maskrcnn_jax.ops.nms import batched_nms


def detections_from_boxes(proposals, proposal_valid, class_logits, box_deltas, image_size, *,
                          box_weights: Sequence[float], score_threshold: float,
                          min_box_size: float, pre_nms_topk: int, nms_threshold: float,
                          max_detections: int):
  """Box-head outputs of one image -> its final detections (torchvision's
  ``postprocess_detections`` with static shapes).

  Class-specific decoding, clipping to the image, softmax scores, dropping the background
  class, score threshold (strictly greater) and minimum box size; then the ``pre_nms_topk``
  best (proposal, class) candidates go through per-class NMS and the first ``max_detections``
  kept are returned. The candidate cap only changes the result when fewer than
  ``max_detections`` survive NMS among the capped candidates while more candidates exist.

  Args:
    proposals: (P, 4) float32 xyxy.
    proposal_valid: (P,) bool.
    class_logits: (P, K) float32.
    box_deltas: (P, K, 4) float32 class-specific deltas.
    image_size: (2,) int (height, width) of the valid region.

  Returns:
    boxes (D, 4) float32 xyxy, scores (D,), classes (D,) int32, valid (D,) bool; 0 in unused
    slots, in descending score order.
  """
  num_classes = class_logits.shape[-1]
  boxes = decode_boxes(box_deltas, proposals[:, None, :], box_weights)
  boxes = clip_boxes(boxes, image_size[0], image_size[1])
  scores = jax.nn.softmax(class_logits, axis=-1)
  boxes = boxes[:, 1:].reshape(-1, 4)
  scores = scores[:, 1:].reshape(-1)
  classes = jnp.tile(jnp.arange(1, num_classes, dtype=jnp.int32), proposals.shape[0])
  ok = jnp.repeat(proposal_valid, num_classes - 1) & (scores > score_threshold)
  ok &= (((boxes[:, 2] - boxes[:, 0]) >= min_box_size)
         & ((boxes[:, 3] - boxes[:, 1]) >= min_box_size))
  k = min(pre_nms_topk, scores.shape[0])
  top_scores, top_idx = lax.top_k(jnp.where(ok, scores, -jnp.inf), k)
  cand_boxes, cand_classes, cand_ok = boxes[top_idx], classes[top_idx], ok[top_idx]
  keep, keep_valid = batched_nms(cand_boxes, top_scores, cand_classes, nms_threshold,
                                 max_detections, valid=cand_ok)
  out_boxes = jnp.where(keep_valid[:, None], cand_boxes[keep], 0.0)
  out_scores = jnp.where(keep_valid, top_scores[keep], 0.0)
  out_classes = jnp.where(keep_valid, cand_classes[keep], 0)
  return out_boxes, out_scores, out_classes, keep_valid
