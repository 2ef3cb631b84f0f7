"""Tests of ops/boxes.py against NumPy references, published box-coder codes and properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import boxes as box_ops


def _random_boxes(rng, n, size=100.0, min_size=0.5):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(min_size, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _iou_loop(b1, b2):
  out = np.zeros((len(b1), len(b2)), np.float64)
  for i, a in enumerate(b1):
    for j, b in enumerate(b2):
      iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
      ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
      inter = iw * ih
      union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def test_conversions_round_trip():
  rng = np.random.default_rng(0)
  b = _random_boxes(rng, 20)
  np.testing.assert_allclose(box_ops.xywh_to_xyxy(box_ops.xyxy_to_xywh(b)), b, atol=1e-5)
  np.testing.assert_allclose(box_ops.yxyx_to_xyxy(box_ops.xyxy_to_yxyx(b)), b)
  norm = box_ops.xyxy_to_normalized_yxyx(b, 120.0, 150.0)
  np.testing.assert_allclose(norm[:, 0], b[:, 1] / 120.0, rtol=1e-6)
  np.testing.assert_allclose(norm[:, 1], b[:, 0] / 150.0, rtol=1e-6)
  np.testing.assert_allclose(box_ops.normalized_yxyx_to_xyxy(norm, 120.0, 150.0), b, atol=1e-4)
  np.testing.assert_allclose(box_ops.xywh_to_xyxy([[1.0, 2.0, 3.0, 4.0]]), [[1, 2, 4, 6]])


def test_area_and_clip():
  b = np.array([[0, 0, 10, 5], [5, 5, 5, 9], [3, 3, 1, 1], [-5, -5, 200, 20]], np.float32)
  np.testing.assert_allclose(box_ops.box_area(b), [50, 0, 0, 205 * 25])
  clipped = box_ops.clip_boxes(b, 15, 100)
  np.testing.assert_allclose(clipped[3], [0, 0, 100, 15])
  # Per-image sizes broadcast over (B, N, 4).
  batch = np.stack([b, b])
  sizes = np.array([[15, 100], [8, 4]], np.int32)
  clipped = box_ops.clip_boxes(batch, sizes[:, None, 0], sizes[:, None, 1])
  np.testing.assert_allclose(clipped[1, 3], [0, 0, 4, 8])


def test_box_iou_matches_loop_and_edge_cases():
  rng = np.random.default_rng(1)
  b1, b2 = _random_boxes(rng, 17), _random_boxes(rng, 11)
  b1[3] = b2[4]  # identical pair -> 1
  b1[5] = [0, 0, 0, 0]  # zero area
  b2[6] = [0, 0, 0, 0]  # zero area vs zero area at the same point -> 0, not NaN
  got = np.asarray(box_ops.box_iou(b1, b2))
  np.testing.assert_allclose(got, _iou_loop(b1, b2), atol=1e-6)
  assert got[3, 4] == pytest.approx(1.0)
  assert np.isfinite(got).all()
  assert got[5, 6] == 0.0


def test_box_iou_padding_masks_and_batching():
  rng = np.random.default_rng(2)
  b1, b2 = _random_boxes(rng, 6), _random_boxes(rng, 5)
  v2 = np.array([True, False, True, True, False])
  got = np.asarray(box_ops.box_iou(b1, b2, valid2=v2))
  ref = _iou_loop(b1, b2)
  ref[:, ~v2] = -1.0
  np.testing.assert_allclose(got, ref, atol=1e-6)
  batched = jax.jit(jax.vmap(box_ops.box_iou))(np.stack([b1, b1[::-1]]), np.stack([b2, b2]))
  np.testing.assert_allclose(batched[1], _iou_loop(b1[::-1], b2), atol=1e-6)


def test_box_ioa():
  b1 = np.array([[0, 0, 10, 10]], np.float32)
  b2 = np.array([[5, 5, 25, 25], [0, 0, 0, 0]], np.float32)
  np.testing.assert_allclose(box_ops.box_ioa(b1, b2), [[25 / 400, 0.0]])


# Published golden codes from TensorFlow Object Detection's faster_rcnn_box_coder_test
# (boxes and anchors in [ymin, xmin, ymax, xmax], codes in [ty, tx, th, tw]).
_TF_BOXES_YXYX = [[10.0, 10.0, 20.0, 15.0], [0.2, 0.1, 0.5, 0.4]]
_TF_ANCHORS_YXYX = [[15.0, 12.0, 30.0, 18.0], [0.1, 0.0, 0.7, 0.9]]
_TF_CODES = [[-0.5, -0.416666, -0.405465, -0.182321],
             [-0.083333, -0.222222, -0.693147, -1.098612]]
_TF_CODES_SCALED = [[-1.0, -1.25, -1.62186, -0.911608],
                    [-0.166667, -0.666667, -2.772588, -5.493062]]  # scale factors (2, 3, 4, 5)


@pytest.mark.parametrize('scale,expected', [((1, 1, 1, 1), _TF_CODES),
                                            ((2, 3, 4, 5), _TF_CODES_SCALED)])
def test_encode_matches_published_tf_codes(scale, expected):
  boxes = box_ops.yxyx_to_xyxy(np.array(_TF_BOXES_YXYX, np.float32))
  anchors = box_ops.yxyx_to_xyxy(np.array(_TF_ANCHORS_YXYX, np.float32))
  sy, sx, sh, sw = scale  # TF orders (y, x, h, w); ours (x, y, w, h)
  codes = np.asarray(box_ops.encode_boxes(boxes, anchors, (sx, sy, sw, sh)))
  expected = np.asarray(expected)[:, [1, 0, 3, 2]]
  np.testing.assert_allclose(codes, expected, atol=1e-5)
  np.testing.assert_allclose(box_ops.decode_boxes(codes, anchors, (sx, sy, sw, sh)), boxes,
                             atol=1e-5)


@pytest.mark.parametrize('weights', [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_of_encode_is_identity(weights):
  rng = np.random.default_rng(3)
  # Sizes within a factor 20 of each other: inside the scale clamp (62.5), where decoding inverts.
  anchors, boxes = _random_boxes(rng, 50, min_size=2.5), _random_boxes(rng, 50, min_size=2.5)
  deltas = box_ops.encode_boxes(boxes, anchors, weights)
  np.testing.assert_allclose(box_ops.decode_boxes(deltas, anchors, weights), boxes, atol=1e-3)


def test_decode_clamps_scale():
  anchors = np.array([[0, 0, 16, 16]], np.float32)
  deltas = np.array([[0, 0, 100.0, -100.0]], np.float32)
  out = np.asarray(box_ops.decode_boxes(deltas, anchors))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[0, 2] - out[0, 0], 16 * 1000 / 16, rtol=1e-4)
  assert math.isclose(box_ops.BBOX_XFORM_CLIP, math.log(1000 / 16))


def test_encode_is_finite_for_degenerate_padding():
  zeros = np.zeros((3, 4), np.float32)
  assert np.isfinite(np.asarray(box_ops.encode_boxes(zeros, zeros))).all()
  grad = jax.grad(lambda a: jnp.sum(box_ops.encode_boxes(zeros + 1.0, a)))(zeros + 2.0)
  assert np.isfinite(np.asarray(grad)).all()
