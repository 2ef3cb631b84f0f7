"""Tests for maskrcnn_jax.ops.matching against a NumPy loop that spells out the matching rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import matching

# One compiled function per setting keeps the many small cases fast.
match = jax.jit(matching.match, static_argnums=(1, 2, 3),
                static_argnames=('bg_threshold_lo', 'low_quality_ties'))


def reference_match(iou, pos, neg, low_quality, gt_valid=None, crowd=None, bg_lo=0.0,
                    ties=True):
  """Row-by-row loop implementing the documented rules (independent of the vectorised code)."""
  iou = np.asarray(iou, np.float32)
  n, m = iou.shape
  gt_valid = np.ones(m, bool) if gt_valid is None else np.asarray(gt_valid, bool)
  crowd_m = np.zeros(m, bool) if crowd is None else np.asarray(crowd, bool)
  target = [bool(gt_valid[j] and not crowd_m[j]) for j in range(m)]
  pos, neg, bg_lo = np.float32(pos), np.float32(neg), np.float32(bg_lo)
  labels = np.zeros(n, np.int32)
  matched = np.zeros(n, np.int32)
  for i in range(n):
    best, best_j = np.float32(-np.inf), 0
    for j in range(m):
      v = iou[i, j] if target[j] else np.float32(-1.0)
      if v > best:
        best, best_j = v, j
    matched[i] = best_j
    if best >= pos:
      labels[i] = 1
    elif best < neg:
      labels[i] = 0
    else:
      labels[i] = -1
    if labels[i] == 0 and max(best, np.float32(0.0)) < bg_lo:
      labels[i] = -1
    if crowd is not None and labels[i] == 0:
      crowd_best = max([iou[i, j] for j in range(m) if gt_valid[j] and crowd_m[j]] or [-1.0])
      if crowd_best >= neg:
        labels[i] = -1
  if low_quality:
    claims = [[] for _ in range(n)]
    for j in range(m):
      if not target[j]:
        continue
      col_best = max(iou[i, j] for i in range(n))
      if col_best <= 0:
        continue
      for i in range(n):
        if iou[i, j] == col_best:
          claims[i].append(j)
          if not ties:  # the reference's tf.argmax: the first best row only
            break
    for i in range(n):
      if claims[i]:
        best_j = claims[i][0]
        for j in claims[i][1:]:
          if iou[i, j] > iou[i, best_j]:
            best_j = j
        matched[i] = best_j
        labels[i] = 1
  return matched, labels


def _random_case(rng, n, m):
  # Quantised IoU values create ties on purpose (low-quality ties, threshold equalities).
  iou = rng.choice(np.linspace(0.0, 1.0, 11), size=(n, m)).astype(np.float32)
  iou *= rng.random((n, m)) < 0.6  # many zeros, as for real anchors
  gt_valid = rng.random(m) < 0.7
  crowd = (rng.random(m) < 0.25) & gt_valid
  iou = np.where(gt_valid[None, :], iou, -1.0).astype(np.float32)
  return iou, gt_valid, crowd


@pytest.mark.parametrize('seed', range(6))
def test_random_against_reference(seed):
  rng = np.random.default_rng(seed)
  iou, gt_valid, crowd = _random_case(rng, 40, 7)
  settings = [
      dict(pos=0.7, neg=0.3, low_quality=True),
      dict(pos=0.7, neg=0.3, low_quality=True, ties=False),
      dict(pos=0.7, neg=0.3, low_quality=False),
      dict(pos=0.5, neg=0.5, low_quality=False),
      dict(pos=0.5, neg=0.5, low_quality=False, bg_lo=0.1),
  ]
  for s in settings:
    for use_crowd in (False, True):
      cr = crowd if use_crowd else None
      want_idx, want_lab = reference_match(iou, s['pos'], s['neg'], s['low_quality'], gt_valid,
                                           cr, s.get('bg_lo', 0.0), s.get('ties', True))
      got_idx, got_lab = match(iou, s['pos'], s['neg'], s['low_quality'], gt_valid=gt_valid,
                               crowd=cr, bg_threshold_lo=s.get('bg_lo', 0.0),
                               low_quality_ties=s.get('ties', True))
      np.testing.assert_array_equal(np.asarray(got_lab), want_lab, err_msg=str(s))
      positive = want_lab == 1
      np.testing.assert_array_equal(np.asarray(got_idx)[positive], want_idx[positive])
      np.testing.assert_array_equal(np.asarray(got_idx), want_idx)


def test_padded_gt_never_matches_even_with_high_iou():
  # Column 1 is padding but (wrongly) carries a high IoU: gt_valid alone must exclude it.
  iou = np.array([[0.1, 0.9], [0.8, 0.95], [0.0, 0.6]], np.float32)
  idx, lab = match(iou, 0.7, 0.3, True, gt_valid=np.array([True, False]))
  idx, lab = np.asarray(idx), np.asarray(lab)
  assert np.all(idx[lab == 1] == 0)
  np.testing.assert_array_equal(lab, [0, 1, 0])


def test_crowd_never_positive_and_ignores_overlapping_negatives():
  # gt 0 ordinary, gt 1 crowd.
  iou = np.array([
      [0.9, 0.95],  # positive through gt 0 despite the crowd overlap
      [0.1, 0.8],   # would be negative: overlaps the crowd -> ignored
      [0.1, 0.2],   # negative, little crowd overlap
      [0.0, 0.3],   # crowd IoU == negative threshold -> ignored (>= rule)
  ], np.float32)
  crowd = np.array([False, True])
  idx, lab = match(iou, 0.7, 0.3, True, crowd=crowd)
  idx, lab = np.asarray(idx), np.asarray(lab)
  np.testing.assert_array_equal(lab, [1, -1, 0, -1])
  assert np.all(idx[lab == 1] == 0)
  # A crowd-only image yields no positive at all, even with low-quality matching.
  _, lab = match(iou[:, 1:], 0.7, 0.3, True, crowd=np.array([True]))
  assert not np.any(np.asarray(lab) == 1)


def test_low_quality_matches_ties_and_forced_column():
  iou = np.array([
      [0.40, 0.0, 0.0],  # gt 0's best (below 0.7) -> positive via low quality
      [0.40, 0.0, 0.0],  # tie -> also positive
      [0.35, 0.2, 0.0],  # argmax is gt 0, but it is gt 1's best row -> matched to gt 1
      [0.10, 0.1, 0.0],  # negative
      [0.00, 0.0, 0.0],  # gt 2's best IoU is 0 -> creates no match
  ], np.float32)
  idx, lab = match(iou, 0.7, 0.3, True)
  np.testing.assert_array_equal(np.asarray(lab), [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(idx)[:3], [0, 0, 1])
  _, lab = match(iou, 0.7, 0.3, False)
  np.testing.assert_array_equal(np.asarray(lab), [-1, -1, -1, 0, 0])
  # The reference's rule: gt 0 claims only its first best row; the tie (row 1) stays ignored.
  idx, lab = match(iou, 0.7, 0.3, True, low_quality_ties=False)
  np.testing.assert_array_equal(np.asarray(lab), [1, -1, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(idx)[[0, 2]], [0, 1])


def test_tiny_box_ties_with_every_anchor_containing_it():
  """A 4x4 box inside a grid of 32x32 anchors (stride 4): every anchor containing it has IoU
  16/1024 exactly; with ties all of them are positive, the reference's rule keeps one."""
  centres = np.arange(2.0, 64.0, 4.0)
  cx, cy = np.meshgrid(centres, centres)
  anchors = np.stack([cx - 16, cy - 16, cx + 16, cy + 16], -1).reshape(-1, 4).astype(np.float32)
  gt = np.array([[30.0, 30.0, 34.0, 34.0]], np.float32)
  iou = np.asarray(box_ops.box_iou(jnp.asarray(anchors), jnp.asarray(gt)))
  containing = np.all((anchors[:, :2] <= 30.0) & (anchors[:, 2:] >= 34.0), axis=1)
  _, lab = match(iou, 0.7, 0.3, True)
  np.testing.assert_array_equal(np.asarray(lab) == 1, containing)
  assert containing.sum() == 64  # centres 18..46 in x and in y
  _, lab = match(iou, 0.7, 0.3, True, low_quality_ties=False)
  assert int(np.sum(np.asarray(lab) == 1)) == 1
  assert np.asarray(lab)[np.argmax(containing)] == 1  # the first containing anchor


@pytest.mark.parametrize('low_quality', [False, True])
def test_all_padding_gt_gives_all_negatives(low_quality):
  gt = jnp.zeros((5, 4))
  anchors = jnp.array([[0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 0, 0.]])
  iou = box_ops.box_iou(anchors, gt, valid2=jnp.zeros((5,), bool))
  for kw in (dict(gt_valid=jnp.zeros((5,), bool)), dict()):
    idx, lab = match(iou, 0.7, 0.3, low_quality, **kw)
    np.testing.assert_array_equal(np.asarray(lab), 0)
    np.testing.assert_array_equal(np.asarray(idx), 0)
  # The RoI-head setting too (bg_lo = 0 keeps them negative).
  _, lab = match(iou, 0.5, 0.5, False, bg_threshold_lo=0.0)
  np.testing.assert_array_equal(np.asarray(lab), 0)


def test_empty_gt_axis():
  idx, lab = match(jnp.zeros((4, 0)), 0.7, 0.3, True)
  assert idx.shape == lab.shape == (4,)
  np.testing.assert_array_equal(np.asarray(lab), 0)


def test_all_anchors_identical():
  anchors = jnp.tile(jnp.array([[10.0, 10.0, 50.0, 50.0]]), (6, 1))
  gt = jnp.array([[0.0, 0.0, 40.0, 40.0], [30.0, 30.0, 90.0, 90.0], [0, 0, 0, 0]])
  valid = jnp.array([True, True, False])
  iou = box_ops.box_iou(anchors, gt, valid2=valid)
  idx, lab = match(iou, 0.7, 0.3, True, gt_valid=valid)
  # Every anchor ties for both gts' best: all positive, matched to the one overlapping most.
  np.testing.assert_array_equal(np.asarray(lab), 1)
  want = int(np.argmax(np.asarray(iou)[0, :2]))
  np.testing.assert_array_equal(np.asarray(idx), want)
  _, lab = match(iou, 0.7, 0.3, False, gt_valid=valid)
  np.testing.assert_array_equal(np.asarray(lab), -1)  # IoUs 0.39 and 0.1 are in between


def test_roi_head_thresholds():
  iou = np.array([[0.5], [0.4999], [0.05], [0.0], [0.75]], np.float32)
  _, lab = match(iou, 0.5, 0.5, False)
  np.testing.assert_array_equal(np.asarray(lab), [1, 0, 0, 0, 1])
  _, lab = match(iou, 0.5, 0.5, False, bg_threshold_lo=0.1)
  np.testing.assert_array_equal(np.asarray(lab), [1, 0, -1, -1, 1])


def test_jit_and_vmap_equal_per_image():
  rng = np.random.default_rng(7)
  cases = [_random_case(rng, 30, 5) for _ in range(3)]
  iou = np.stack([c[0] for c in cases])
  valid = np.stack([c[1] for c in cases])
  crowd = np.stack([c[2] for c in cases])
  fn = lambda i, v, c: matching.match(i, 0.7, 0.3, True, gt_valid=v, crowd=c)
  b_idx, b_lab = jax.jit(jax.vmap(fn))(iou, valid, crowd)
  for b in range(3):
    idx, lab = fn(iou[b], valid[b], crowd[b])
    np.testing.assert_array_equal(np.asarray(b_idx[b]), np.asarray(idx))
    np.testing.assert_array_equal(np.asarray(b_lab[b]), np.asarray(lab))
    assert b_idx.dtype == jnp.int32 and b_lab.dtype == jnp.int32
