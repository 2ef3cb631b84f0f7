"""Matching anchors or proposals to ground truth by IoU (one function for the RPN and the RoI head).

Rules, following Detectron / torchvision's ``Matcher`` and the reference's labelling:

* RPN (the reference's ``ArgMaxMatcher(0.7, 0.3, force_match_for_each_row=True)``): a row whose
  best IoU is >= 0.7 is positive, < 0.3 negative, in between ignored; every ground-truth box also
  claims the first anchor that reaches its own best IoU ("low-quality matches";
  ``low_quality_ties=True`` claims every anchor tying for it, as torchvision's ``Matcher``).
* RoI head (the reference's ``proposal_label_op``): foreground IoU >= 0.5, background IoU in
  ``[bg_thresh_lo, bg_thresh_hi) = [0.0, 0.5)``, no low-quality matches. Call with
  ``positive_threshold=negative_threshold=0.5``. (The reference tests ``> fg_thresh``; a row at
  exactly 0.5 is positive here, as in torchvision -- a set of measure zero.)

Rows are anchors or proposals, columns ground truth. The IoU matrix comes from
:func:`maskrcnn_jax.ops.boxes.box_iou`, whose ``valid`` masks already put -1 in padded columns.
Row validity (padded proposals) is not handled here: pass it to the sampler.
"""

from __future__ import annotations

import jax.numpy as jnp

POSITIVE = 1
NEGATIVE = 0
IGNORE = -1


def match(iou, positive_threshold: float, negative_threshold: float,
          allow_low_quality_matches: bool = False, gt_valid=None, crowd=None,
          bg_threshold_lo: float = 0.0, low_quality_ties: bool = True):
  """Assigns each row (anchor / proposal) a ground-truth index and a label.

  Labelling, in order (later steps override earlier ones):

  1. Threshold the row's best IoU over *valid, non-crowd* columns: ``>= positive_threshold`` ->
     positive (1), ``< negative_threshold`` -> negative (0), otherwise ignored (-1).
  2. ``bg_threshold_lo``: a negative row whose best IoU is ``< bg_threshold_lo`` becomes ignored
     (the reference's ``bg_thresh_lo``). The best IoU is floored at 0 here, so a row that meets
     no valid ground truth at all (IoU -1 against padding) counts as IoU 0: with the default
     ``bg_threshold_lo = 0.0`` it stays negative.
  3. Crowd safety net: a negative row whose best IoU with any valid crowd box is
     ``>= negative_threshold`` becomes ignored. Rationale: such a row would not have been a
     negative had the crowd region been an ordinary box, and a crowd region does contain
     objects, so calling it background would teach the classifier that people are background.
     Positive rows keep their label: they overlap a real instance well enough to be trained on.
     This mirrors Detectron's crowd filter (which uses IoA > 0.7 and ignores proposals) in the
     IoU terms available here. The reference drops crowd boxes in training altogether
     (``skip_crowd_during_training``), so this only matters when crowds are kept.
  4. Low-quality matches (``allow_low_quality_matches``): for each valid non-crowd column whose
     best IoU over all rows is > 0, every row reaching exactly that IoU (ties included, as
     torchvision) becomes positive *and is matched to that column* (as the reference's
     ``force_match_for_each_row``; torchvision instead keeps the row's argmax column). A row
     claimed by several columns takes the one it overlaps most (first column on ties). With
     ``low_quality_ties=False`` each column claims only its first best row (the lowest row
     index), as the reference's ``ArgMaxMatcher``, whose ``tf.argmax`` forces one anchor per
     ground truth; with tiny objects the difference is large (a 5-pixel box inside dozens of
     32-pixel anchors ties with all of them).

  Padded columns (``gt_valid`` False) and crowd columns never produce positives and are never
  the ``matched_idx`` of a positive row. With no valid column at all every row is negative and
  matched to column 0.

  Args:
    iou: (N, M) float32 IoU, rows = anchors or proposals, columns = ground truth; padded columns
      hold -1 (``box_iou(..., valid2=gt_valid)``).
    positive_threshold: IoU at or above which a row is positive.
    negative_threshold: IoU below which a row is negative (``<= positive_threshold``).
    allow_low_quality_matches: add each ground truth's best-overlapping rows as positives (RPN).
    low_quality_ties: every row tying for a column's best IoU (torchvision) or only the first
      (the reference).
    gt_valid: optional (M,) bool, False for padding; None means every column is valid (padded
      columns at -1 still never match).
    crowd: optional (M,) bool, True for ``iscrowd`` boxes.
    bg_threshold_lo: rows with best IoU below this are not negatives but ignored (RoI head).

  Returns:
    matched_idx: (N,) int32 column of each row: its best valid non-crowd column (its forced
      column for low-quality matches); 0 where there is none. Meaningful for positive rows only.
    labels: (N,) int32, 1 positive, 0 negative, -1 ignored.
  """
  iou = jnp.asarray(iou, jnp.float32)
  n, m = iou.shape
  if m == 0 or n == 0:
    # No ground truth columns at all (a static shape): everything is background.
    return jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32)

  valid = jnp.ones((m,), bool) if gt_valid is None else jnp.asarray(gt_valid, bool)
  is_crowd = jnp.zeros((m,), bool) if crowd is None else jnp.asarray(crowd, bool)
  # Columns allowed to produce positives.
  target = valid & ~is_crowd
  iou_t = jnp.where(target[None, :], iou, -1.0)

  max_iou = jnp.max(iou_t, axis=1)
  matched_idx = jnp.argmax(iou_t, axis=1).astype(jnp.int32)

  # 1. Thresholds.
  labels = jnp.where(max_iou >= positive_threshold, POSITIVE,
                     jnp.where(max_iou < negative_threshold, NEGATIVE, IGNORE)).astype(jnp.int32)

  # 2. Lower background bound; -1 (no valid column) is read as zero overlap.
  too_low = jnp.maximum(max_iou, 0.0) < bg_threshold_lo
  labels = jnp.where((labels == NEGATIVE) & too_low, IGNORE, labels)

  # 3. Crowd regions turn would-be negatives that overlap them into ignored rows.
  if crowd is not None:
    crowd_iou = jnp.max(jnp.where((valid & is_crowd)[None, :], iou, -1.0), axis=1)
    labels = jnp.where((labels == NEGATIVE) & (crowd_iou >= negative_threshold), IGNORE, labels)

  # 4. Low-quality matches: each ground truth keeps at least its best rows.
  if allow_low_quality_matches:
    best_per_gt = jnp.max(iou_t, axis=0)  # (M,)
    # Exact equality is safe: both sides are the same float32 values.
    if low_quality_ties:
      best_rows = iou_t == best_per_gt[None, :]
    else:
      first = jnp.argmax(iou_t, axis=0)  # (M,) lowest row index among the ties
      best_rows = jnp.arange(n)[:, None] == first[None, :]
    forced = best_rows & (best_per_gt > 0.0)[None, :] & target[None, :]
    any_forced = jnp.any(forced, axis=1)
    forced_idx = jnp.argmax(jnp.where(forced, iou_t, -2.0), axis=1).astype(jnp.int32)
    matched_idx = jnp.where(any_forced, forced_idx, matched_idx)
    labels = jnp.where(any_forced, POSITIVE, labels)

  return matched_idx, labels
