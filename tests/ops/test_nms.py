"""Tests of maskrcnn_jax.ops.nms: greedy NMS, per-class NMS and multi-level RPN proposals.

The references are written here, independently of the library: a plain NumPy greedy NMS loop with
torchvision's float32 IoU (``inter / ((area_i + area_j) - inter)``, compared with the threshold as a
double) and stable descending score order, and a NumPy re-implementation of the proposal pipeline.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import nms as nms_ops
from maskrcnn_jax.ops import proposals as proposal_ops


# ------------------------------------------------------------------------------------------------
# NumPy references
# ------------------------------------------------------------------------------------------------

def np_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one xyxy box against (M, 4) boxes in float32, torchvision's operation order."""
  box = box.astype(np.float32)
  boxes = boxes.astype(np.float32)
  area = (box[2] - box[0]) * (box[3] - box[1])
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  w = np.maximum(np.float32(0), np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]))
  h = np.maximum(np.float32(0), np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]))
  inter = w * h
  with np.errstate(invalid='ignore', divide='ignore'):
    return inter / ((area + areas) - inter)


def np_nms(boxes, scores, threshold: float, valid=None, classes=None) -> np.ndarray:
  """Greedy NMS: indices kept, in stable descending score order (ties: lower index first)."""
  scores = np.asarray(scores, np.float32)
  ok = scores > -np.inf
  if valid is not None:
    ok &= np.asarray(valid, bool)
  candidates = [i for i in np.argsort(-scores, kind='stable') if ok[i]]
  kept: list[int] = []
  for i in candidates:
    if kept:
      iou = np_iou(boxes[i], boxes[kept]).astype(np.float64)
      over = iou > threshold  # float32 IoU against the double threshold, as torchvision
      if classes is not None:
        over &= np.asarray(classes)[kept] == classes[i]
      if over.any():
        continue
    kept.append(int(i))
  return np.asarray(kept, np.int64)


def random_boxes(rng: np.random.Generator, n: int, spread: float = 100.0,
                 quantize: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Clustered random xyxy boxes and scores; ``quantize`` makes ties in IoU and scores common."""
  centres = rng.uniform(0, spread, (n, 2))
  sizes = rng.uniform(0.0, 40.0, (n, 2))
  boxes = np.concatenate([centres, centres + sizes], axis=1).astype(np.float32)
  scores = rng.random(n).astype(np.float32)
  if quantize:
    boxes = (np.round(boxes / 4.0) * 4.0).astype(np.float32)
    scores = (np.round(scores * 10.0) / 10.0).astype(np.float32)
  return boxes, scores


def kept_indices(result) -> np.ndarray:
  indices, valid = (np.asarray(r) for r in result)
  return indices[valid]


@functools.lru_cache(maxsize=None)
def jitted_nms(threshold: float, max_output_size: int, tile_size: int = nms_ops.DEFAULT_TILE_SIZE):
  return jax.jit(lambda b, s, v: nms_ops.nms(b, s, threshold, max_output_size, v,
                                              tile_size=tile_size))


# ------------------------------------------------------------------------------------------------
# nms
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('tile_size', [64, 512])
@pytest.mark.parametrize('quantize', [False, True])
def test_nms_matches_numpy_reference(tile_size, quantize):
  rng = np.random.default_rng(1 + quantize)
  fn = jitted_nms(0.5, 320, tile_size)
  for trial in range(4):
    boxes, scores = random_boxes(rng, 300, spread=(60.0, 200.0)[trial % 2], quantize=quantize)
    valid = rng.random(300) < 0.9
    ours = kept_indices(fn(boxes, scores, valid))
    np.testing.assert_array_equal(ours, np_nms(boxes, scores, 0.5, valid))


def test_nms_properties():
  rng = np.random.default_rng(3)
  boxes, scores = random_boxes(rng, 300)
  threshold = 0.5
  kept = kept_indices(jitted_nms(threshold, 320, 64)(boxes, scores, np.ones(300, bool)))
  # Kept in descending score order.
  assert np.all(np.diff(scores[kept]) <= 0)
  # No two kept boxes overlap above the threshold.
  for a, i in enumerate(kept):
    assert not np.any(np_iou(boxes[i], boxes[kept[a + 1:]]) > threshold)
  # Every suppressed box overlaps a kept box that comes earlier in score order.
  rank = {int(i): r for r, i in enumerate(np.argsort(-scores, kind='stable'))}
  for j in sorted(set(range(300)) - set(kept.tolist())):
    earlier = [i for i in kept if rank[int(i)] < rank[j]]
    assert np.any(np_iou(boxes[j], boxes[earlier]) > threshold), j


def test_nms_long_suppression_chain_across_tiles():
  # Each box overlaps only its neighbours (IoU 0.25 > 0.2) and scores fall along the chain, so the
  # greedy answer (every other box) needs one fixed-point sweep per link: a worst case.
  n = 100
  x = np.arange(n, dtype=np.float32) * 6.0
  boxes = np.stack([x, np.zeros(n), x + 10.0, np.full(n, 10.0)], axis=1).astype(np.float32)
  scores = np.linspace(1.0, 0.1, n).astype(np.float32)
  for tile_size in (64, 512):
    kept = kept_indices(jitted_nms(0.2, 64, tile_size)(boxes, scores, np.ones(n, bool)))
    np.testing.assert_array_equal(kept, np.arange(0, n, 2))
    np.testing.assert_array_equal(kept, np_nms(boxes, scores, 0.2))


def test_nms_all_boxes_identical():
  boxes = np.tile(np.array([[10.0, 10.0, 50.0, 40.0]], np.float32), (40, 1))
  scores = np.random.default_rng(4).random(40).astype(np.float32)
  fn = jitted_nms(0.7, 8, 512)
  indices, valid = (np.asarray(r) for r in fn(boxes, scores, np.ones(40, bool)))
  np.testing.assert_array_equal(indices[valid], [np.argmax(scores)])
  assert valid.tolist() == [True] + [False] * 7
  # Equal scores too: the lowest index wins the tie (stable sort, as torchvision).
  kept = kept_indices(fn(boxes, np.full(40, 0.5, np.float32), np.ones(40, bool)))
  np.testing.assert_array_equal(kept, [0])


def test_nms_zero_area_boxes_never_suppress_or_get_suppressed():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 9], [5, 5, 5, 9], [3, 3, 3, 3],
                    [0, 0, 0, 10]], np.float32)
  scores = np.array([0.9, 0.8, 0.95, 0.7, 0.6, 0.85], np.float32)
  kept = kept_indices(jitted_nms(0.5, 6, 512)(boxes, scores, np.ones(6, bool)))
  # Box 1 is suppressed by box 0; every zero-area box survives (IoU 0, or NaN for 0/0).
  np.testing.assert_array_equal(kept, [2, 0, 5, 3, 4])
  np.testing.assert_array_equal(kept, np_nms(boxes, scores, 0.5))


def test_nms_fewer_candidates_than_outputs_and_truncation():
  rng = np.random.default_rng(5)
  boxes, scores = random_boxes(rng, 30, spread=300.0)
  reference = np_nms(boxes, scores, 0.5)
  indices, valid = (np.asarray(r) for r in jitted_nms(0.5, 50, 512)(boxes, scores,
                                                                     np.ones(30, bool)))
  assert indices.shape == (50,) and valid.shape == (50,)
  assert indices.dtype == np.int32 and valid.dtype == np.bool_
  assert valid.sum() == len(reference) and not valid[len(reference):].any()
  np.testing.assert_array_equal(indices[valid], reference)
  assert np.all(indices[~valid] == 0)
  # max_output_size smaller than the number kept: the first ones, in score order.
  kept = kept_indices(jitted_nms(0.5, 5, 512)(boxes, scores, np.ones(30, bool)))
  np.testing.assert_array_equal(kept, reference[:5])


def test_nms_padding_is_never_kept_and_never_suppresses():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
  fn = jitted_nms(0.5, 4, 512)
  # Invalid box 0 (the best score) would suppress box 1.
  kept = kept_indices(fn(boxes, np.array([0.9, 0.8, 0.1, 0.5], np.float32),
                         np.array([False, True, True, True])))
  np.testing.assert_array_equal(kept, [1, 3])
  # -inf and NaN scores mark padding as well.
  kept = kept_indices(fn(boxes, np.array([-np.inf, 0.8, np.nan, 0.5], np.float32),
                         np.ones(4, bool)))
  np.testing.assert_array_equal(kept, [1, 3])
  # The valid argument is optional.
  kept = kept_indices(jax.jit(lambda b, s: nms_ops.nms(b, s, 0.5, 4))(
      boxes, np.array([0.9, 0.8, 0.1, 0.5], np.float32)))
  np.testing.assert_array_equal(kept, [0, 3])


def test_nms_threshold_compared_as_torchvision():
  # IoU = 30 / 100 = 0.3 exactly; in float32 it is 0.30000001 > 0.3 (double), so torchvision
  # suppresses the second box. A float32 comparison with float32(0.3) would keep it.
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 3]], np.float32)
  kept = kept_indices(jitted_nms(0.3, 2, 512)(boxes, np.array([1.0, 0.5], np.float32),
                                              np.ones(2, bool)))
  np.testing.assert_array_equal(kept, [0])
  np.testing.assert_array_equal(kept, np_nms(boxes, np.array([1.0, 0.5]), 0.3))


def test_nms_signed_zero_scores_tie():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
  kept = kept_indices(jitted_nms(0.5, 2, 512)(boxes, np.array([-0.0, 0.0], np.float32),
                                              np.ones(2, bool)))
  np.testing.assert_array_equal(kept, [0])  # -0.0 == +0.0: a tie, the lower index first


def test_nms_vmap_equals_per_image():
  rng = np.random.default_rng(6)
  data = [random_boxes(rng, 100, spread=80.0) for _ in range(3)]
  boxes = np.stack([b for b, _ in data])
  scores = np.stack([s for _, s in data])
  batched = jax.jit(jax.vmap(lambda b, s: nms_ops.nms(b, s, 0.6, 60, tile_size=64)))
  indices, valid = (np.asarray(r) for r in batched(boxes, scores))
  for i in range(3):
    np.testing.assert_array_equal(indices[i][valid[i]], np_nms(boxes[i], scores[i], 0.6)[:60])


# ------------------------------------------------------------------------------------------------
# batched_nms
# ------------------------------------------------------------------------------------------------

def test_batched_nms_matches_per_class_reference():
  rng = np.random.default_rng(7)
  fn = jax.jit(lambda b, s, c, v: nms_ops.batched_nms(b, s, c, 0.5, 300, v, tile_size=64))
  for quantize in (False, True):
    boxes, scores = random_boxes(rng, 250, spread=60.0, quantize=quantize)
    classes = rng.integers(0, 5, 250).astype(np.int32)
    valid = rng.random(250) < 0.95
    ours = kept_indices(fn(boxes, scores, classes, valid))
    np.testing.assert_array_equal(ours, np_nms(boxes, scores, 0.5, valid, classes))


def test_batched_nms_identical_boxes_of_different_classes_are_kept():
  boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (4, 1))
  kept = kept_indices(jax.jit(lambda b, s, c: nms_ops.batched_nms(b, s, c, 0.5, 4))(
      boxes, np.array([0.5, 0.9, 0.7, 0.8], np.float32), np.array([0, 1, 0, 1], np.int32)))
  np.testing.assert_array_equal(kept, [1, 2])


# ------------------------------------------------------------------------------------------------
# multilevel_proposals
# ------------------------------------------------------------------------------------------------

def np_anchors(grid: int, stride: float, sizes=(12.0, 20.0, 32.0)) -> np.ndarray:
  """(grid * grid * 3, 4) xyxy anchors centred on the cells, location-major."""
  out = []
  for y in range(grid):
    for x in range(grid):
      cy, cx = (y + 0.5) * stride, (x + 0.5) * stride
      for s in sizes:
        out.append([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])
  return np.asarray(out, np.float32)


def np_decode(deltas: np.ndarray, anchors: np.ndarray, clamp: float) -> np.ndarray:
  """R-CNN box decoding with weights (1, 1, 1, 1), in float64."""
  deltas = deltas.astype(np.float64)
  anchors = anchors.astype(np.float64)
  w = anchors[:, 2] - anchors[:, 0]
  h = anchors[:, 3] - anchors[:, 1]
  cx = anchors[:, 0] + 0.5 * w + deltas[:, 0] * w
  cy = anchors[:, 1] + 0.5 * h + deltas[:, 1] * h
  pw = np.exp(np.minimum(deltas[:, 2], clamp)) * w
  ph = np.exp(np.minimum(deltas[:, 3], clamp)) * h
  return np.stack([cx - 0.5 * pw, cy - 0.5 * ph, cx + 0.5 * pw, cy + 0.5 * ph], axis=1)


def np_level_candidates(scores, deltas, anchors, size, pre, min_size):
  """Per level: top-k, decode, clip, size filter. Returns (boxes, scores, keep mask) lists."""
  out = []
  for name in sorted(scores):
    order = np.argsort(-scores[name], kind='stable')[:pre]
    boxes = np_decode(deltas[name][order], anchors[name][order], np.log(1000.0 / 16.0))
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, size[1])
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, size[0])
    ok = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    out.append((boxes.astype(np.float32), scores[name][order], ok))
  return out


def np_proposals(scores, deltas, anchors, size, pre, post, threshold, min_size):
  """The reference pipeline for one image: per-level NMS, merge, overall top ``post``."""
  merged_boxes, merged_scores = [], []
  for boxes, level_scores, ok in np_level_candidates(scores, deltas, anchors, size, pre,
                                                     min_size):
    keep = np_nms(boxes, level_scores, threshold, ok)[:post]
    merged_boxes.append(boxes[keep])
    merged_scores.append(level_scores[keep])
  boxes = np.concatenate(merged_boxes)
  level_scores = np.concatenate(merged_scores)
  order = np.argsort(-level_scores, kind='stable')[:post]
  return boxes[order], level_scores[order]


def np_proposals_torchvision_style(scores, deltas, anchors, size, pre, post, threshold, min_size):
  """torchvision's filter_proposals: batched NMS over all levels with the level as the class."""
  candidates = np_level_candidates(scores, deltas, anchors, size, pre, min_size)
  boxes = np.concatenate([c[0] for c in candidates])
  level_scores = np.concatenate([c[1] for c in candidates])
  ok = np.concatenate([c[2] for c in candidates])
  levels = np.concatenate([np.full(len(c[0]), i) for i, c in enumerate(candidates)])
  keep = np_nms(boxes, level_scores, threshold, ok, levels)[:post]
  return boxes[keep], level_scores[keep]


@pytest.mark.parametrize('min_size', [0.0, 4.0])
def test_multilevel_proposals_match_numpy_pipeline(min_size):
  rng = np.random.default_rng(8)
  anchors = {'p2': np_anchors(8, 4.0), 'p3': np_anchors(4, 8.0)}
  scores = {k: rng.normal(0, 2, (2, len(a))).astype(np.float32) for k, a in anchors.items()}
  deltas = {k: rng.normal(0, 0.3, (2, len(a), 4)).astype(np.float32)
            for k, a in anchors.items()}
  # Image 0 fills the 32x32 canvas; image 1's valid region is 20 x 28, so anchors in the padding
  # clip to empty boxes (kept with min_size 0, as the reference; dropped with min_size 4).
  image_sizes = np.array([[32, 32], [20, 28]], np.int32)
  fn = jax.jit(lambda s, d, a, sz: proposal_ops.multilevel_proposals(
      s, d, a, sz, pre_nms_topk=50, post_nms_topk=20, nms_threshold=0.7, min_size=min_size))
  boxes, out_scores, valid = (np.asarray(r) for r in fn(scores, deltas, anchors, image_sizes))
  assert boxes.shape == (2, 20, 4) and out_scores.shape == (2, 20) and valid.shape == (2, 20)
  for b in range(2):
    per_image = lambda d: {k: v[b] for k, v in d.items()}
    args = (per_image(scores), per_image(deltas), anchors, image_sizes[b], 50, 20, 0.7, min_size)
    ref_boxes, ref_scores = np_proposals(*args)
    tv_boxes, tv_scores = np_proposals_torchvision_style(*args)
    # The documented equivalence with torchvision's filter_proposals.
    np.testing.assert_array_equal(ref_scores, tv_scores)
    np.testing.assert_allclose(ref_boxes, tv_boxes)
    n = len(ref_scores)
    assert valid[b].sum() == n and valid[b][:n].all()
    np.testing.assert_array_equal(out_scores[b][:n], ref_scores)
    np.testing.assert_allclose(boxes[b][:n], ref_boxes, atol=1e-4)
    assert np.all(out_scores[b][n:] == -np.inf) and np.all(boxes[b][n:] == 0)
  if min_size == 0.0:
    # Image 1 has empty (fully clipped) proposals among the kept ones.
    widths = boxes[1, :, 2] - boxes[1, :, 0]
    heights = boxes[1, :, 3] - boxes[1, :, 1]
    assert np.any(valid[1] & ((widths == 0) | (heights == 0)))
  else:
    assert np.all((boxes[valid][:, 2:] - boxes[valid][:, :2]) >= min_size)


def test_multilevel_proposals_fewer_candidates_than_outputs():
  rng = np.random.default_rng(9)
  anchors = {'p3': np_anchors(2, 8.0), 'p4': np_anchors(1, 16.0)}  # 12 + 3 anchors
  scores = {k: rng.normal(0, 1, (1, len(a))).astype(np.float32) for k, a in anchors.items()}
  deltas = {k: np.zeros((1, len(a), 4), np.float32) for k, a in anchors.items()}
  fn = jax.jit(lambda s, d: proposal_ops.multilevel_proposals(
      s, d, anchors, np.array([[16, 16]], np.int32), pre_nms_topk=100, post_nms_topk=40,
      nms_threshold=0.7))
  boxes, out_scores, valid = (np.asarray(r) for r in fn(scores, deltas))
  assert boxes.shape == (1, 40, 4)
  ref_boxes, ref_scores = np_proposals({k: v[0] for k, v in scores.items()},
                                       {k: v[0] for k, v in deltas.items()}, anchors,
                                       np.array([16, 16]), 100, 40, 0.7, 0.0)
  assert valid[0].sum() == len(ref_scores) < 40
  np.testing.assert_array_equal(out_scores[0][valid[0]], ref_scores)
  np.testing.assert_allclose(boxes[0][valid[0]], ref_boxes, atol=1e-4)


def test_multilevel_proposals_stop_gradients():
  anchors = {'p2': np_anchors(2, 4.0)}
  scores = {'p2': jnp.zeros((1, 12))}
  deltas = {'p2': jnp.zeros((1, 12, 4))}

  def total(s, d):
    boxes, out_scores, valid = proposal_ops.multilevel_proposals(
        {'p2': s}, {'p2': d}, anchors, np.array([[8, 8]], np.int32), 12, 5, 0.7)
    return jnp.sum(jnp.where(valid[..., None], boxes, 0.0)) + jnp.sum(
        jnp.where(valid, out_scores, 0.0))

  grads = jax.jit(jax.grad(total, argnums=(0, 1)))(scores['p2'], deltas['p2'])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)
