"""Box conventions, areas, clipping, pairwise IoU and the box coder.

Inside the model every box is ``xyxy`` in absolute pixels of the padded input canvas:
``(x1, y1, x2, y2)`` with width ``x2 - x1`` (no ``+1``, as torchvision and the reference's TF2
code). Conversions to the formats met at the data boundary live here:

* COCO ``xywh``: ``(x, y, width, height)`` in pixels of the original image.
* ``yxyx``: ``(y1, x1, y2, x2)``, the TF / reference order; "normalized" means divided by the
  image height and width (TFDS ``BBoxFeature``).

Every function is pure, jit-able and broadcasts over leading dimensions; arithmetic is float32.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

# Largest allowed log-ratio of a decoded width or height to its anchor's (Detectron, torchvision
# and the reference's `bbox_xform_clip`): exp(dw) is clamped at 1000/16.
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)


def _f32(x) -> jnp.ndarray:
  return jnp.asarray(x, jnp.float32)


def xywh_to_xyxy(boxes) -> jnp.ndarray:
  """COCO ``(x, y, w, h)`` -> ``(x1, y1, x2, y2)``. boxes: (..., 4)."""
  boxes = _f32(boxes)
  xy, wh = boxes[..., :2], boxes[..., 2:]
  return jnp.concatenate([xy, xy + wh], axis=-1)


def xyxy_to_xywh(boxes) -> jnp.ndarray:
  """``(x1, y1, x2, y2)`` -> COCO ``(x, y, w, h)``. boxes: (..., 4)."""
  boxes = _f32(boxes)
  return jnp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def xyxy_to_yxyx(boxes) -> jnp.ndarray:
  """Swaps the coordinate order ``xyxy`` <-> ``yxyx`` (the map is its own inverse)."""
  boxes = _f32(boxes)
  return boxes[..., jnp.array([1, 0, 3, 2])]


yxyx_to_xyxy = xyxy_to_yxyx


def normalized_yxyx_to_xyxy(boxes, height, width) -> jnp.ndarray:
  """TFDS normalized ``yxyx`` in [0, 1] -> absolute ``xyxy`` for an image of (height, width).

  height, width: scalars or arrays broadcastable to ``boxes[..., 0]``.
  """
  scale = jnp.stack([_f32(width), _f32(height), _f32(width), _f32(height)], axis=-1)
  return yxyx_to_xyxy(boxes) * scale


def xyxy_to_normalized_yxyx(boxes, height, width) -> jnp.ndarray:
  """Absolute ``xyxy`` -> normalized ``yxyx`` for an image of (height, width)."""
  scale = jnp.stack([_f32(width), _f32(height), _f32(width), _f32(height)], axis=-1)
  return xyxy_to_yxyx(_f32(boxes) / scale)


def box_area(boxes) -> jnp.ndarray:
  """Area of ``xyxy`` boxes, (..., 4) -> (...). Degenerate boxes (x2 < x1) have area 0."""
  boxes = _f32(boxes)
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def clip_boxes(boxes, height, width) -> jnp.ndarray:
  """Clips ``xyxy`` boxes to ``[0, width] x [0, height]``.

  boxes: (..., 4). height, width: scalars or arrays broadcastable to ``boxes[..., 0]`` (e.g.
  ``image_sizes[:, None, 0]`` for boxes (B, N, 4)).
  """
  boxes = _f32(boxes)
  w, h = _f32(width), _f32(height)
  x1 = jnp.clip(boxes[..., 0], 0.0, w)
  y1 = jnp.clip(boxes[..., 1], 0.0, h)
  x2 = jnp.clip(boxes[..., 2], 0.0, w)
  y2 = jnp.clip(boxes[..., 3], 0.0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def box_iou(boxes1, boxes2, valid1=None, valid2=None, invalid_value: float = -1.0) -> jnp.ndarray:
  """Pairwise intersection over union of ``xyxy`` boxes.

  Args:
    boxes1: (..., N, 4) float xyxy.
    boxes2: (..., M, 4) float xyxy.
    valid1: optional (..., N) bool; rows of invalid (padding) boxes get ``invalid_value``.
    valid2: optional (..., M) bool; columns of invalid boxes get ``invalid_value``.
    invalid_value: IoU reported against padding (-1 keeps padding below any threshold >= 0).

  Returns:
    (..., N, M) float32 IoU. A pair whose union is empty (two zero-area boxes) has IoU 0, where
    torchvision would return NaN.
  """
  boxes1, boxes2 = _f32(boxes1), _f32(boxes2)
  area1 = box_area(boxes1)[..., :, None]
  area2 = box_area(boxes2)[..., None, :]
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1 + area2 - inter
  iou = jnp.where(union > 0.0, inter / jnp.where(union > 0.0, union, 1.0), 0.0)
  if valid1 is not None:
    iou = jnp.where(jnp.asarray(valid1)[..., :, None], iou, invalid_value)
  if valid2 is not None:
    iou = jnp.where(jnp.asarray(valid2)[..., None, :], iou, invalid_value)
  return iou


def box_ioa(boxes1, boxes2) -> jnp.ndarray:
  """Pairwise intersection over the area of ``boxes2`` (used for crowd regions).

  boxes1: (..., N, 4), boxes2: (..., M, 4) xyxy -> (..., N, M); 0 where boxes2 has no area.
  """
  boxes1, boxes2 = _f32(boxes1), _f32(boxes2)
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  area2 = box_area(boxes2)[..., None, :]
  return jnp.where(area2 > 0.0, inter / jnp.where(area2 > 0.0, area2, 1.0), 0.0)


def _centers_and_sizes(boxes):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  cx = boxes[..., 0] + 0.5 * w
  cy = boxes[..., 1] + 0.5 * h
  return cx, cy, w, h


def encode_boxes(boxes, anchors, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jnp.ndarray:
  """Regression targets of ``boxes`` relative to ``anchors`` (R-CNN parameterisation).

  ``dx = wx * (cx - cx_a) / w_a``, ``dy = wy * (cy - cy_a) / h_a``, ``dw = ww * log(w / w_a)``,
  ``dh = wh * log(h / h_a)``. The reference uses weights (1, 1, 1, 1) for the RPN and
  (10, 10, 5, 5) for the box head.

  Args:
    boxes: (..., 4) float xyxy ground truth.
    anchors: (..., 4) float xyxy anchors or proposals, broadcastable with ``boxes``; must have
      positive width and height where the result is used (degenerate ones give finite garbage,
      to be masked by the caller).
    weights: (wx, wy, ww, wh).

  Returns:
    (..., 4) float32 deltas ``(dx, dy, dw, dh)``.
  """
  boxes, anchors = _f32(boxes), _f32(anchors)
  wx, wy, ww, wh = weights
  cx, cy, w, h = _centers_and_sizes(boxes)
  acx, acy, aw, ah = _centers_and_sizes(anchors)
  # Guards keep the result finite for padded / degenerate entries that the caller masks out.
  aw = jnp.maximum(aw, 1e-6)
  ah = jnp.maximum(ah, 1e-6)
  w = jnp.maximum(w, 1e-6)
  h = jnp.maximum(h, 1e-6)
  return jnp.stack([
      wx * (cx - acx) / aw,
      wy * (cy - acy) / ah,
      ww * jnp.log(w / aw),
      wh * jnp.log(h / ah),
  ], axis=-1)


def decode_boxes(deltas, anchors, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = BBOX_XFORM_CLIP) -> jnp.ndarray:
  """Inverse of :func:`encode_boxes`: applies ``deltas`` (..., 4) to ``anchors`` (..., 4) xyxy.

  ``dw`` and ``dh`` (after dividing by their weights) are clamped at ``scale_clamp`` so that
  ``exp`` cannot overflow. Returns (..., 4) float32 xyxy boxes.
  """
  deltas, anchors = _f32(deltas), _f32(anchors)
  wx, wy, ww, wh = weights
  acx, acy, aw, ah = _centers_and_sizes(anchors)
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
  cx = dx * aw + acx
  cy = dy * ah + acy
  w = jnp.exp(dw) * aw
  h = jnp.exp(dh) * ah
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
