"""Tests of ops/targets.py (RPN / RoI / mask training targets) against an independent NumPy reference.

The reference below re-implements the documented rules with plain Python loops (IoU by a double
loop, the labelling steps of ``matching.match``, the R-CNN box coder); it does not call the
package's ``box_iou`` or ``encode_boxes``. A hand-built scene makes every rule matter:

* gt 0 ``[10, 10, 50, 50]`` class 3: six anchors / proposals at IoU >= 0.9;
* gt 1 ``[60, 60, 90, 95]`` class 5: best anchor only 0.571 (a low-quality match);
* gt 2 ``[0, 60, 40, 100]`` crowd;
* gt 3 ``[45, 30, 60, 45]`` class 7: its best anchor (0.133) overlaps gt 0 more (0.514), so the
  low-quality match must move that anchor to gt 3;
* gt 4 ``[150, 150, 190, 190]`` and gt 5 (zeros): padding (valid False), with anchors right on
  gt 4 that would be perfect positives if padding leaked into the matching.

Sampling is random: sampled sets are checked for inclusion and counts over several keys, and for
equality with the reference when the batch is large enough to take every eligible row.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.data.spec import MASK_PADDING, GroundTruth
from maskrcnn_jax.ops import targets

KEYS = [jax.random.PRNGKey(k) for k in range(8)]
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
G = 8  # gt_mask_size of the test crops; stored side S = G + 2 * MASK_PADDING
S = G + 2 * MASK_PADDING

# ----------------------------------------------------------------------------------------------
# Scene.

GT_BOXES = np.array([
    [10, 10, 50, 50],      # 0: class 3
    [60, 60, 90, 95],      # 1: class 5
    [0, 60, 40, 100],      # 2: crowd
    [45, 30, 60, 45],      # 3: class 7
    [150, 150, 190, 190],  # 4: padding with a box that anchors sit on
    [0, 0, 0, 0],          # 5: zero padding
], np.float32)
GT_CLASSES = np.array([3, 5, 1, 7, 0, 0], np.int32)
GT_VALID = np.array([True, True, True, True, False, False])
GT_CROWD = np.array([False, False, True, False, False, False])
PADDED_GT = [4, 5]
CROWD_GT = [2]

_HAND_ANCHORS = [
    [12, 12, 50, 50],      # 0  gt0 0.9025 -> positive
    [10, 10, 49, 49],      # 1  gt0 0.9506 -> positive
    [11, 10, 50, 50],      # 2  gt0 0.975 (gt0's best) -> positive
    [10, 10, 50, 47],      # 3  gt0 0.925 -> positive
    [14, 10, 50, 50],      # 4  gt0 0.9 -> positive
    [9, 9, 50, 50],        # 5  gt0 0.9518 -> positive
    [10, 10, 50, 30],      # 6  gt0 0.5 -> ignored (band)
    [60, 60, 90, 80],      # 7  gt1 0.571, gt1's best -> low-quality positive, gt1
    [65, 70, 95, 100],     # 8  gt1 0.472 -> ignored (band)
    [20, 20, 55, 50],      # 9  gt0 0.514, gt3 0.133 = gt3's best -> low-quality positive, gt3
    [0, 60, 40, 100],      # 10 the crowd box itself -> ignored (crowd safety net)
    [0, 70, 30, 100],      # 11 crowd 0.5625 -> ignored (crowd safety net)
    [0, 90, 20, 100],      # 12 crowd 0.125 -> negative
    [150, 150, 190, 190],  # 13 on padded gt 4 -> negative
    [155, 155, 185, 185],  # 14 inside padded gt 4 -> negative
    [25, 60, 55, 90],      # 15 crowd 0.22, nothing else -> negative
]
# Background grid far from every valid box (x >= 100); some of it overlaps padded gt 4.
_GRID = [[x, y, x + 20, y + 20] for x in range(100, 200, 20) for y in range(0, 200, 20)]
ANCHORS = np.array(_HAND_ANCHORS + _GRID, np.float32)
RPN_POS_HAND = [0, 1, 2, 3, 4, 5, 7, 9]
RPN_IGNORE_HAND = [6, 8, 10, 11]
RPN_MATCH_HAND = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 7: 1, 9: 3}

PROPOSALS = np.array([
    [12, 12, 50, 50],                # 0  gt0 0.9025 -> fg gt0
    [20, 20, 55, 50],                # 1  gt0 0.514 -> fg gt0 (no low-quality matches here)
    [60, 60, 90, 80],                # 2  gt1 0.571 -> fg gt1
    [65, 70, 95, 100],               # 3  gt1 0.472 -> bg
    [0, 60, 40, 99],                 # 4  crowd 0.975 -> ignored (crowd net)
    [0, 70, 30, 100],                # 5  crowd 0.5625 -> ignored (crowd net)
    [0, 80, 30, 100],                # 6  crowd 0.375, no valid overlap -> bg (ignored if lo > 0)
    [30, 30, 70, 70],                # 7  gt0 0.143 -> bg
    [120, 0, 160, 40],               # 8  no overlap -> bg (ignored if lo > 0)
    [151, 150, 190, 190],            # 9  on padded gt 4 -> bg (ignored if lo > 0)
    [45, 30, 60, 46],                # 10 gt3 0.9375 -> fg gt3
    [10, 10, 50, 26],                # 11 gt0 0.4 -> bg
    [10.25, 10.75, 49.75, 50.25],    # 12 padding slot (would be a perfect fg)
    [123.25, 171.75, 133.5, 181.5],  # 13 padding slot (would be a bg)
], np.float32)
PROPOSAL_VALID = np.array([True] * 12 + [False] * 2)
PADDED_PROPOSALS = [12, 13]


def _gt_masks():
  masks = np.zeros((len(GT_BOXES), S, S), np.uint8)
  m = MASK_PADDING
  masks[0, m:m + G, m:m + G] = 255           # gt0: the whole box
  masks[1, m:m + G, m:m + G // 2] = 255      # gt1: the left half of its box
  masks[3, m:m + G, m:m + G] = 255
  return masks


def make_gt(valid=GT_VALID, crowd=GT_CROWD):
  return GroundTruth(boxes=jnp.asarray(GT_BOXES), classes=jnp.asarray(GT_CLASSES),
                     masks=jnp.asarray(_gt_masks()), valid=jnp.asarray(valid),
                     is_crowd=jnp.asarray(crowd))


# ----------------------------------------------------------------------------------------------
# Independent NumPy reference.


def np_iou(a, b):
  """IoU by a double loop; xyxy, width x2 - x1, 0 for an empty union."""
  out = np.zeros((len(a), len(b)), np.float64)
  for i, p in enumerate(np.asarray(a, np.float64)):
    for j, q in enumerate(np.asarray(b, np.float64)):
      iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
      ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
      inter = iw * ih
      area_p = max(0.0, p[2] - p[0]) * max(0.0, p[3] - p[1])
      area_q = max(0.0, q[2] - q[0]) * max(0.0, q[3] - q[1])
      union = area_p + area_q - inter
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def np_encode(gt_box, box, weights):
  """(dx, dy, dw, dh) of gt_box relative to box (R-CNN coder)."""
  wx, wy, ww, wh = weights
  g = np.asarray(gt_box, np.float64)
  b = np.asarray(box, np.float64)
  gw, gh = g[2] - g[0], g[3] - g[1]
  bw, bh = b[2] - b[0], b[3] - b[1]
  gcx, gcy = g[0] + 0.5 * gw, g[1] + 0.5 * gh
  bcx, bcy = b[0] + 0.5 * bw, b[1] + 0.5 * bh
  return np.array([wx * (gcx - bcx) / bw, wy * (gcy - bcy) / bh,
                   ww * np.log(gw / bw), wh * np.log(gh / bh)])


def np_match(rows, gt_boxes, gt_valid, gt_crowd, pos_thr, neg_thr, low_quality, bg_lo=0.0):
  """labels (1 / 0 / -1) and matched gt index per row, following matching.match's rules."""
  iou = np_iou(rows, gt_boxes)
  n, m = iou.shape
  target = [j for j in range(m) if gt_valid[j] and not gt_crowd[j]]
  crowd_cols = [j for j in range(m) if gt_valid[j] and gt_crowd[j]]
  labels = np.zeros(n, np.int64)
  matched = np.zeros(n, np.int64)
  for i in range(n):
    if target:
      best = max(iou[i, j] for j in target)
      matched[i] = next(j for j in target if iou[i, j] == best)
    else:
      best = -1.0
      matched[i] = 0
    if best >= pos_thr:
      labels[i] = 1
    elif best < neg_thr:
      labels[i] = 0
    else:
      labels[i] = -1
    if labels[i] == 0 and max(best, 0.0) < bg_lo:
      labels[i] = -1
    if labels[i] == 0 and crowd_cols and max(iou[i, j] for j in crowd_cols) >= neg_thr:
      labels[i] = -1
  if low_quality:
    forced = [[] for _ in range(n)]
    for j in target:
      best_j = max(iou[i, j] for i in range(n))
      if best_j > 0:
        for i in range(n):
          if iou[i, j] == best_j:
            forced[i].append(j)
    for i in range(n):
      if forced[i]:
        top = max(iou[i, j] for j in forced[i])
        matched[i] = next(j for j in forced[i] if iou[i, j] == top)
        labels[i] = 1
  return labels, matched


def np_rpn_reference(valid=GT_VALID, crowd=GT_CROWD, low_quality=True):
  return np_match(ANCHORS, GT_BOXES, valid, crowd, 0.7, 0.3, low_quality)


def np_roi_reference(fg=0.5, hi=0.5, lo=0.0, add_gt=True, valid=GT_VALID, crowd=GT_CROWD):
  """Candidates (proposals, then the gt boxes), their validity, labels and matches."""
  if add_gt:
    cands = np.concatenate([PROPOSALS, GT_BOXES], 0)
    cand_valid = np.concatenate([PROPOSAL_VALID, valid & ~crowd], 0)
  else:
    cands, cand_valid = PROPOSALS, PROPOSAL_VALID
  labels, matched = np_match(cands, GT_BOXES, valid, crowd, fg, hi, False, bg_lo=lo)
  return cands, cand_valid, labels, matched


# ----------------------------------------------------------------------------------------------
# Package calls (jitted once per static configuration).


@functools.lru_cache(maxsize=None)
def rpn_fn(batch, fraction, low_quality=True):
  return jax.jit(functools.partial(
      targets.rpn_targets, positive_overlap=0.7, negative_overlap=0.3,
      allow_low_quality_matches=low_quality, batch_size_per_image=batch, fg_fraction=fraction,
      box_weights=RPN_WEIGHTS))


@functools.lru_cache(maxsize=None)
def roi_fn(batch, fraction, fg=0.5, hi=0.5, lo=0.0, add_gt=True):
  return jax.jit(functools.partial(
      targets.roi_targets, fg_threshold=fg, bg_threshold_hi=hi, bg_threshold_lo=lo,
      batch_size_per_image=batch, fg_fraction=fraction, add_gt_as_proposals=add_gt,
      box_weights=ROI_WEIGHTS))


mask_fn = jax.jit(functools.partial(targets.mask_targets, resolution=4))


def run_rpn(key, batch, fraction, gt=None, low_quality=True):
  out = rpn_fn(batch, fraction, low_quality)(key, jnp.asarray(ANCHORS),
                                             make_gt() if gt is None else gt)
  return jax.tree_util.tree_map(np.asarray, out)


def run_roi(key, batch, fraction, gt=None, **kw):
  out = roi_fn(batch, fraction, **kw)(key, jnp.asarray(PROPOSALS), jnp.asarray(PROPOSAL_VALID),
                                      make_gt() if gt is None else gt)
  return jax.tree_util.tree_map(np.asarray, out)


def roi_rows(rois, cands_all):
  """Index into cands_all (every proposal slot then every gt slot) of each returned RoI."""
  idx = []
  for r in rois:
    hits = np.nonzero(np.all(cands_all == r[None, :], axis=1))[0]
    assert len(hits) == 1, f'RoI {r} is not exactly one candidate box: {hits}'
    idx.append(int(hits[0]))
  return np.array(idx, np.int64)


ALL_CANDIDATES = np.concatenate([PROPOSALS, GT_BOXES], 0)  # unique rows by construction


# ----------------------------------------------------------------------------------------------
# The reference itself, against hand-derived labels (guards the scene and the reference).


def test_reference_labels_of_the_scene_match_hand_derivation():
  labels, matched = np_rpn_reference()
  assert sorted(np.nonzero(labels == 1)[0].tolist()) == RPN_POS_HAND
  assert sorted(np.nonzero(labels == -1)[0].tolist()) == RPN_IGNORE_HAND
  assert np.sum(labels == 0) == len(ANCHORS) - len(RPN_POS_HAND) - len(RPN_IGNORE_HAND)
  assert {i: int(matched[i]) for i in RPN_POS_HAND} == RPN_MATCH_HAND
  _, _, roi_labels, roi_matched = np_roi_reference()
  assert np.nonzero(roi_labels[:12] == 1)[0].tolist() == [0, 1, 2, 10]
  assert np.nonzero(roi_labels[:12] == -1)[0].tolist() == [4, 5]
  assert roi_matched[[0, 1, 2, 10]].tolist() == [0, 0, 1, 3]
  assert len(ALL_CANDIDATES) == len(np.unique(ALL_CANDIDATES, axis=0))


# ----------------------------------------------------------------------------------------------
# RPN targets.


@pytest.mark.parametrize('batch,fraction', [
    (8, 0.5), (7, 0.5), (16, 0.25),
    (24, 0.5),  # fewer positives (8) than the cap (12): negatives fill the rest (16)
])
def test_rpn_sampled_rows_are_reference_rows_with_balanced_counts(batch, fraction):
  ref_labels, _ = np_rpn_reference()
  n_pos, n_neg = int(np.sum(ref_labels == 1)), int(np.sum(ref_labels == 0))
  want_pos = min(n_pos, int(np.floor(batch * fraction)))
  want_neg = min(n_neg, batch - want_pos)
  samples = set()
  for key in KEYS:
    out = run_rpn(key, batch, fraction)
    pos, neg = out.labels == 1, out.labels == 0
    assert set(np.unique(out.labels)) <= {-1, 0, 1}
    np.testing.assert_array_equal(out.positive, pos)
    assert np.all(ref_labels[pos] == 1), 'a sampled positive is not a reference positive'
    assert np.all(ref_labels[neg] == 0), 'a sampled negative is not a reference negative'
    assert pos.sum() == want_pos and neg.sum() == want_neg
    samples.add(tuple(np.nonzero(out.labels >= 0)[0]))
  assert len(samples) > 1, 'different keys should draw different samples'


def test_rpn_large_batch_takes_exactly_the_reference_sets_and_encodes_matches():
  ref_labels, ref_matched = np_rpn_reference()
  for key in KEYS[:3]:
    out = run_rpn(key, 256, 0.5)
    np.testing.assert_array_equal(out.labels, ref_labels)
    for i in np.nonzero(ref_labels == 1)[0]:
      want = np_encode(GT_BOXES[ref_matched[i]], ANCHORS[i], RPN_WEIGHTS)
      np.testing.assert_allclose(out.box_targets[i], want, rtol=1e-5, atol=1e-5,
                                 err_msg=f'anchor {i}')


def test_rpn_ignore_band_is_never_sampled():
  ref_labels, _ = np_rpn_reference()
  iou = np_iou(ANCHORS, GT_BOXES)[:, [0, 1, 3]]  # valid non-crowd columns
  best = iou.max(axis=1)
  band = np.nonzero((best >= 0.3) & (best < 0.7) & (ref_labels == -1))[0]
  assert band.tolist() == [6, 8]  # 7 and 9 are in the band too but are low-quality matches
  for batch, fraction in [(8, 0.5), (256, 0.5)]:
    for key in KEYS:
      out = run_rpn(key, batch, fraction)
      assert np.all(out.labels[band] == -1)
      assert np.all(out.labels[ref_labels == -1] == -1)


def test_rpn_low_quality_matches_are_positive_and_matched_to_their_gt():
  out = run_rpn(KEYS[0], 256, 0.5)
  # gt1's best anchor (7, IoU 0.571 < 0.7) and gt3's best anchor (9, IoU 0.133) are positive.
  assert out.labels[7] == 1 and out.labels[9] == 1
  np.testing.assert_allclose(out.box_targets[7], np_encode(GT_BOXES[1], ANCHORS[7], RPN_WEIGHTS),
                             rtol=1e-5, atol=1e-5)
  # Anchor 9 overlaps gt0 more (0.514) but is forced to gt3: its targets encode gt3, not gt0.
  np.testing.assert_allclose(out.box_targets[9], np_encode(GT_BOXES[3], ANCHORS[9], RPN_WEIGHTS),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(out.box_targets[9], np_encode(GT_BOXES[0], ANCHORS[9], RPN_WEIGHTS),
                         atol=1e-2)
  # Without low-quality matches both are ignored (best IoU 0.571, resp. 0.514: in the band).
  off = run_rpn(KEYS[0], 256, 0.5, low_quality=False)
  ref_off, _ = np_rpn_reference(low_quality=False)
  np.testing.assert_array_equal(off.labels, ref_off)
  assert off.labels[7] == -1 and off.labels[9] == -1


def test_rpn_crowd_is_never_positive_and_blocks_negatives():
  ref_labels, _ = np_rpn_reference()
  crowd_iou = np_iou(ANCHORS, GT_BOXES)[:, 2]
  near_crowd = np.nonzero(crowd_iou >= 0.3)[0]
  assert near_crowd.tolist() == [10, 11]
  for batch, fraction in [(8, 0.5), (256, 0.5)]:
    for key in KEYS:
      out = run_rpn(key, batch, fraction)
      assert np.all(out.labels[near_crowd] == -1), 'a row on a crowd box was sampled'
      assert np.all(ref_labels[out.positive] == 1)
  out = run_rpn(KEYS[0], 256, 0.5)
  assert out.labels[12] == 0  # crowd IoU 0.125 < 0.3: an ordinary negative
  # With every valid gt a crowd, nothing is positive (no low-quality match to a crowd box).
  all_crowd = GT_VALID.copy()
  out = run_rpn(KEYS[0], 256, 0.5, gt=make_gt(crowd=all_crowd))
  ref_all_crowd, _ = np_rpn_reference(crowd=all_crowd)
  assert not out.positive.any()
  np.testing.assert_array_equal(out.labels, ref_all_crowd)


def test_rpn_padded_gt_is_never_matched():
  out = run_rpn(KEYS[0], 256, 0.5)
  # Anchors 13 and 14 sit on padded gt 4: negative, not positive.
  assert out.labels[13] == 0 and out.labels[14] == 0
  for key in KEYS:
    out = run_rpn(key, 8, 0.5)
    for i in np.nonzero(out.positive)[0]:
      encodings = [np_encode(GT_BOXES[j], ANCHORS[i], RPN_WEIGHTS) for j in PADDED_GT[:1]]
      assert not any(np.allclose(out.box_targets[i], e, atol=1e-3) for e in encodings)
      # Every positive's targets encode one of the valid non-crowd gt boxes.
      assert any(np.allclose(out.box_targets[i], np_encode(GT_BOXES[j], ANCHORS[i], RPN_WEIGHTS),
                             rtol=1e-5, atol=1e-5) for j in (0, 1, 3))


# ----------------------------------------------------------------------------------------------
# RoI targets.


def _check_roi_layout(out):
  fg, valid = out.foreground, out.valid
  n_fg, n_valid = int(fg.sum()), int(valid.sum())
  assert np.all(fg[:n_fg]) and not np.any(fg[n_fg:]), 'foreground slots are not first'
  assert np.all(valid[:n_valid]) and not np.any(valid[n_valid:]), 'unfilled slots are not last'
  assert not np.any(fg & ~valid)
  return n_fg, n_valid


@pytest.mark.parametrize('batch,fraction', [
    (8, 0.25), (10, 0.25), (6, 0.5),
    (12, 0.75),  # fewer fg (7) than the cap (9): 5 bg fill the rest
])
def test_roi_sampled_rows_are_reference_rows_with_balanced_counts(batch, fraction):
  _, cand_valid, ref_labels, ref_matched = np_roi_reference()
  eligible_pos = (ref_labels == 1) & cand_valid
  eligible_neg = (ref_labels == 0) & cand_valid
  want_fg = min(int(eligible_pos.sum()), int(np.floor(batch * fraction)))
  want_bg = min(int(eligible_neg.sum()), batch - want_fg)
  for key in KEYS:
    out = run_roi(key, batch, fraction)
    assert out.rois.shape == (batch, 4)
    n_fg, n_valid = _check_roi_layout(out)
    assert n_fg == want_fg and n_valid - n_fg == want_bg
    rows = roi_rows(out.rois[out.valid], ALL_CANDIDATES)
    assert len(set(rows.tolist())) == len(rows), 'a candidate was sampled twice'
    assert np.all(cand_valid[rows])
    assert np.all(eligible_pos[rows[:n_fg]]), 'a foreground slot is not a reference foreground'
    assert np.all(eligible_neg[rows[n_fg:]]), 'a background slot is not a reference background'
    np.testing.assert_array_equal(out.matched[:n_fg], ref_matched[rows[:n_fg]])


def test_roi_foreground_first_then_background_then_unfilled():
  for key in KEYS:
    out = run_roi(key, 64, 0.5)
    n_fg, n_valid = _check_roi_layout(out)
    assert (n_fg, n_valid) == (7, 13)  # 7 fg, 6 bg, 51 unfilled
    assert np.all(out.classes[:n_fg] > 0) and np.all(out.classes[n_fg:] == 0)


def test_roi_at_most_floor_batch_times_fraction_foreground():
  assert targets.num_mask_rois(10, 0.25) == 2
  for batch, fraction in [(10, 0.25), (8, 0.25), (6, 0.5)]:
    cap = int(np.floor(batch * fraction))
    for key in KEYS:
      out = run_roi(key, batch, fraction)
      assert out.foreground.sum() == min(cap, 7)
      assert out.foreground.sum() <= targets.num_mask_rois(batch, fraction)


def test_roi_large_batch_takes_exactly_the_reference_sets():
  for kw in [dict(), dict(lo=0.1), dict(fg=0.6, hi=0.5, lo=0.1), dict(add_gt=False)]:
    ref_kw = {k: v for k, v in kw.items()}
    cands, cand_valid, ref_labels, _ = np_roi_reference(**ref_kw)
    all_c = ALL_CANDIDATES  # with add_gt=False the gt rows are simply never hit
    for key in KEYS[:3]:
      out = run_roi(key, 64, 0.5, **kw)
      n_fg, n_valid = _check_roi_layout(out)
      rows = roi_rows(out.rois[out.valid], all_c)
      want_fg = set(np.nonzero((ref_labels == 1) & cand_valid)[0].tolist())
      want_bg = set(np.nonzero((ref_labels == 0) & cand_valid)[0].tolist())
      assert set(rows[:n_fg].tolist()) == want_fg, kw
      assert set(rows[n_fg:].tolist()) == want_bg, kw
      assert n_valid == len(want_fg) + len(want_bg)


def test_roi_box_targets_and_classes_match_the_reference_encoding():
  _, _, ref_labels, ref_matched = np_roi_reference()
  for key in KEYS:
    out = run_roi(key, 64, 0.5)
    rows = roi_rows(out.rois[out.valid], ALL_CANDIDATES)
    for slot, row in enumerate(rows):
      if out.foreground[slot]:
        j = ref_matched[row]
        assert out.matched[slot] == j
        assert out.classes[slot] == GT_CLASSES[j]
        np.testing.assert_allclose(out.box_targets[slot],
                                   np_encode(GT_BOXES[j], ALL_CANDIDATES[row], ROI_WEIGHTS),
                                   rtol=1e-5, atol=1e-4, err_msg=f'slot {slot} row {row}')
      else:
        assert ref_labels[row] == 0 and out.classes[slot] == 0
        # Background targets are unused; they still encode the returned match.
        np.testing.assert_allclose(
            out.box_targets[slot],
            np_encode(GT_BOXES[out.matched[slot]], ALL_CANDIDATES[row], ROI_WEIGHTS),
            rtol=1e-5, atol=1e-4)
    assert np.all(out.classes[~out.valid] == 0)


def test_roi_gt_appended_as_proposal_is_foreground_with_zero_targets():
  seen = set()
  for key in KEYS:
    out = run_roi(key, 64, 0.5)
    for j in (0, 1, 3):
      slots = np.nonzero(np.all(out.rois == GT_BOXES[j][None], axis=1) & out.valid)[0]
      assert len(slots) == 1, f'gt {j} not appended exactly once'
      s = slots[0]
      assert out.foreground[s] and out.matched[s] == j and out.classes[s] == GT_CLASSES[j]
      np.testing.assert_allclose(out.box_targets[s], np.zeros(4), atol=1e-6)
      seen.add(j)
  assert seen == {0, 1, 3}
  # Without add_gt_as_proposals no gt box is a RoI.
  for key in KEYS[:3]:
    out = run_roi(key, 64, 0.5, add_gt=False)
    for j in range(len(GT_BOXES)):
      assert not np.any(np.all(out.rois == GT_BOXES[j][None], axis=1) & out.valid)


def test_roi_crowd_never_foreground_nor_appended_and_blocks_background():
  crowd_iou = np_iou(ALL_CANDIDATES, GT_BOXES)[:, 2]
  near_crowd = set(np.nonzero(crowd_iou >= 0.5)[0].tolist())
  assert near_crowd == {4, 5, len(PROPOSALS) + 2}  # proposals 4, 5 and the crowd box as a gt row
  for batch, fraction in [(8, 0.25), (64, 0.5)]:
    for key in KEYS:
      out = run_roi(key, batch, fraction)
      rows = roi_rows(out.rois[out.valid], ALL_CANDIDATES)
      assert not near_crowd & set(rows.tolist()), 'a row on the crowd box was sampled'
      assert not np.any(out.matched[out.foreground] == 2), 'matched to a crowd box'
      assert not np.any(np.all(out.rois == GT_BOXES[2][None], axis=1) & out.valid)
  # Proposal 6 (crowd IoU 0.375 < bg_hi 0.5) is an ordinary background.
  out = run_roi(KEYS[0], 64, 0.5)
  rows = roi_rows(out.rois[out.valid], ALL_CANDIDATES)
  assert 6 in rows[int(out.foreground.sum()):].tolist()
  # Every valid gt a crowd: no foreground at all.
  out = run_roi(KEYS[0], 64, 0.5, gt=make_gt(crowd=GT_VALID.copy()))
  assert not out.foreground.any()
  cands, cand_valid, ref_labels, _ = np_roi_reference(crowd=GT_VALID.copy())
  assert out.valid.sum() == np.sum((ref_labels == 0) & cand_valid)


def test_roi_crowd_gt_is_not_appended_even_where_it_would_be_foreground():
  # A crowd box at IoU 0.9025 with a valid box: appended, it would be a foreground RoI of gt 0.
  boxes = np.array([[10, 10, 50, 50], [12, 12, 50, 50], [0, 0, 0, 0]], np.float32)
  gt = GroundTruth(boxes=jnp.asarray(boxes), classes=jnp.asarray([3, 1, 0], jnp.int32),
                   masks=jnp.zeros((3, S, S), jnp.uint8), valid=jnp.asarray([True, True, False]),
                   is_crowd=jnp.asarray([False, True, False]))
  proposals = np.array([[100, 100, 120, 120], [12, 12, 50, 50]], np.float32)
  assert np_iou(boxes[1:2], boxes[:1])[0, 0] >= 0.5
  for key in KEYS[:3]:
    out = jax.tree_util.tree_map(np.asarray, roi_fn(8, 0.5)(
        key, jnp.asarray(proposals), jnp.asarray([True, False]), gt))
    assert out.foreground.sum() == 1 and out.valid.sum() == 2
    np.testing.assert_array_equal(out.rois[0], boxes[0])
    np.testing.assert_array_equal(out.rois[1], proposals[0])
    assert not np.any(np.all(out.rois == boxes[1][None], axis=1) & out.valid)


def test_roi_ignore_band_is_never_sampled():
  # fg >= 0.6, bg in [0.1, 0.5): proposals 1 (0.514) and 2 (0.571) fall between, proposals
  # 4, 5, 6, 8, 9 (no valid non-crowd overlap) below bg_lo.
  kw = dict(fg=0.6, hi=0.5, lo=0.1)
  _, cand_valid, ref_labels, _ = np_roi_reference(**kw)
  iou = np_iou(ALL_CANDIDATES, GT_BOXES)[:, [0, 1, 3]]
  best = iou.max(axis=1)
  outside = set(np.nonzero(((best < 0.1) | ((best >= 0.5) & (best < 0.6))) & cand_valid)[0].tolist())
  assert outside == {1, 2, 4, 5, 6, 8, 9}
  assert outside <= set(np.nonzero(ref_labels == -1)[0].tolist())
  for batch, fraction in [(6, 0.5), (64, 0.5)]:
    for key in KEYS:
      out = run_roi(key, batch, fraction, **kw)
      rows = set(roi_rows(out.rois[out.valid], ALL_CANDIDATES).tolist())
      assert not rows & outside


def test_roi_padding_is_never_sampled():
  padded_rois = PROPOSALS[PADDED_PROPOSALS]
  for batch, fraction in [(8, 0.25), (64, 0.5)]:
    for key in KEYS:
      out = run_roi(key, batch, fraction)
      for box in padded_rois:
        assert not np.any(np.all(out.rois == box[None], axis=1) & out.valid)
      # Padded gt: never a RoI, never the match of a foreground RoI.
      for j in PADDED_GT:
        assert not np.any(np.all(out.rois == GT_BOXES[j][None], axis=1) & out.valid)
      assert not np.any(np.isin(out.matched[out.foreground], PADDED_GT))
  # Proposal 9 sits on padded gt 4: background, not foreground.
  out = run_roi(KEYS[0], 64, 0.5)
  rows = roi_rows(out.rois[out.valid], ALL_CANDIDATES)
  assert 9 in rows[int(out.foreground.sum()):].tolist()


# ----------------------------------------------------------------------------------------------
# Mask targets.


def test_num_mask_rois():
  assert targets.num_mask_rois(512, 0.25) == 128
  assert targets.num_mask_rois(256, 0.5) == 128
  assert targets.num_mask_rois(10, 0.25) == 2


def test_mask_targets_on_hand_built_crops():
  gt = make_gt()
  rois = jnp.asarray([
      [10, 10, 50, 50],   # gt0 box: all ones
      [0, 0, 60, 60],     # larger than gt0: samples at cells 1, 4, 7, 10 -> margin, 1, 1, margin
      [60, 60, 75, 95],   # left half of gt1 (mask ones there)
      [75, 60, 90, 95],   # right half of gt1 (mask zeros there)
      [60, 60, 90, 95],   # gt1 box: samples at cells 2.5, 4.5, 6.5, 8.5 -> 1, 1, 0, 0
  ], jnp.float32)
  matched = jnp.asarray([0, 0, 1, 1, 1], jnp.int32)
  out = np.asarray(mask_fn(gt, rois, matched))
  assert out.shape == (5, 4, 4) and out.dtype == np.float32
  ones = np.ones((4, 4))
  edge = np.outer([0, 1, 1, 0], [0, 1, 1, 0])
  left = np.outer(np.ones(4), [1, 1, 0, 0])
  np.testing.assert_array_equal(out[0], ones)
  np.testing.assert_array_equal(out[1], edge)
  np.testing.assert_array_equal(out[2], ones)
  np.testing.assert_array_equal(out[3], np.zeros((4, 4)))
  np.testing.assert_array_equal(out[4], left)


# ----------------------------------------------------------------------------------------------
# vmap over a batch of two images: one with ground truth, one without any valid ground truth.


def test_targets_under_vmap_with_an_image_without_ground_truth():
  g0, g1 = make_gt(), make_gt(valid=np.zeros(len(GT_BOXES), bool))
  gts = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), g0, g1)
  keys = jnp.stack([KEYS[1], KEYS[2]])
  anchors, proposals = jnp.asarray(ANCHORS), jnp.asarray(PROPOSALS)
  props = jnp.stack([proposals, proposals])
  pvalid = jnp.stack([jnp.asarray(PROPOSAL_VALID)] * 2)
  rpn_single, roi_single = rpn_fn(256, 0.5), roi_fn(64, 0.5)

  @jax.jit
  def batched(keys, anchors, props, pvalid, gts):
    rpn = jax.vmap(rpn_single, in_axes=(0, None, 0))(keys, anchors, gts)
    roi = jax.vmap(roi_single)(keys, props, pvalid, gts)
    masks = jax.vmap(mask_fn)(gts, roi.rois, roi.matched)
    return rpn, roi, masks

  rpn, roi, masks = jax.tree_util.tree_map(np.asarray,
                                           batched(keys, anchors, props, pvalid, gts))
  assert rpn.labels.shape == (2, len(ANCHORS)) and roi.rois.shape == (2, 64, 4)
  assert masks.shape == (2, 64, 4, 4)

  # Image 0: as the unbatched call with the same key, and the reference sets (batch takes all).
  ref_labels, _ = np_rpn_reference()
  np.testing.assert_array_equal(rpn.labels[0], ref_labels)
  single = run_rpn(KEYS[1], 256, 0.5)
  np.testing.assert_array_equal(rpn.labels[0], single.labels)
  np.testing.assert_allclose(rpn.box_targets[0][single.positive],
                             single.box_targets[single.positive], rtol=1e-6, atol=1e-6)
  single_roi = run_roi(KEYS[1], 64, 0.5)
  for field in ('rois', 'matched', 'classes', 'foreground', 'valid'):
    np.testing.assert_array_equal(getattr(roi, field)[0], getattr(single_roi, field), field)
  assert roi.foreground[0].sum() == 7
  single_masks = np.asarray(mask_fn(g0, jnp.asarray(single_roi.rois),
                                   jnp.asarray(single_roi.matched)))
  np.testing.assert_array_equal(masks[0], single_masks)

  # Image 1: every anchor negative (the batch takes them all), no foreground RoI, no gt RoI.
  assert np.all(rpn.labels[1] == 0) and not rpn.positive[1].any()
  _, cand_valid, ref1, _ = np_roi_reference(valid=np.zeros(len(GT_BOXES), bool))
  assert not roi.foreground[1].any() and np.all(roi.classes[1] == 0)
  assert roi.valid[1].sum() == np.sum((ref1 == 0) & cand_valid) == 12
  rows = roi_rows(roi.rois[1][roi.valid[1]], ALL_CANDIDATES)
  assert set(rows.tolist()) == set(range(12))
