"""Training targets of Mask R-CNN, per image: RPN anchor labels, sampled RoIs, mask targets.

Pure functions of one image's arrays (the model vmaps them over the batch), each a named step of
the recipe, as detectron2's ``RPN.label_and_sample_anchors`` /
``ROIHeads.label_and_sample_proposals`` and TF Model Garden's ``roi_sampler`` / ``mask_sampler``:

* :func:`rpn_targets`: anchors labelled by IoU with the ground truth (positive >= 0.7, negative
  < 0.3, plus each ground truth's best anchors; crowd and padded ground truth never positive),
  ``batch_size_per_image`` anchors sampled at ``fg_fraction`` positives, box targets encoded;
* :func:`roi_targets`: ground truth appended to the proposals (crowd excluded), candidates
  matched (foreground IoU >= 0.5, background in ``[lo, hi)``), ``batch_size_per_image`` RoIs
  sampled at ``fg_fraction`` foreground, **foreground first**, box targets encoded;
* :func:`mask_targets`: the ``resolution``-square mask targets of the leading (foreground) RoI
  slots, bilinear crops of the stored ground-truth crops.

Boxes are xyxy in absolute pixels of the padded canvas. Everything is static-shaped: padded
ground truth and proposal slots carry validity masks and are never sampled.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax.numpy as jnp

from maskrcnn_jax.data.spec import MASK_PADDING, GroundTruth
from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import masks as mask_ops
from maskrcnn_jax.ops import matching, sampling


class RPNTargets(NamedTuple):
  """Per-anchor RPN targets of one image (A anchors, all levels concatenated)."""
  labels: jnp.ndarray       # (A,) int32: 1 sampled positive, 0 sampled negative, -1 not sampled
  box_targets: jnp.ndarray  # (A, 4) float32 encoded matched ground truth (meaningful if positive)
  positive: jnp.ndarray     # (A,) bool, the sampled positives


class RoITargets(NamedTuple):
  """Sampled RoIs of one image (R = batch_size_per_image slots, foreground first)."""
  rois: jnp.ndarray         # (R, 4) float32 xyxy
  matched: jnp.ndarray      # (R,) int32 index of the matched ground truth
  classes: jnp.ndarray      # (R,) int32 class of the matched ground truth, 0 for background
  box_targets: jnp.ndarray  # (R, 4) float32 encoded matched ground truth
  foreground: jnp.ndarray   # (R,) bool
  valid: jnp.ndarray        # (R,) bool, filled slots


def rpn_targets(key, anchors, gt: GroundTruth, *, positive_overlap: float,
                negative_overlap: float, allow_low_quality_matches: bool,
                low_quality_ties: bool = True,
                batch_size_per_image: int, fg_fraction: float,
                box_weights: Sequence[float]) -> RPNTargets:
  """Labels, samples and encodes the anchors of one image (the reference's RPN targets).

  Args:
    key: PRNG key of the sampling.
    anchors: (A, 4) float32 xyxy, every level concatenated in level order.
    gt: the image's `GroundTruth` (no batch dim).
    positive_overlap, negative_overlap: IoU >= positive is foreground, < negative background;
      between them ignored.
    allow_low_quality_matches: each ground truth's highest-IoU anchors are also positive.
    low_quality_ties: all the anchors tying for that IoU (torchvision) or the first (reference).
    batch_size_per_image, fg_fraction: anchors sampled, at most this fraction positive.
    box_weights: box coder weights (the reference: 1, 1, 1, 1).
  """
  iou = box_ops.box_iou(anchors, gt.boxes, valid2=gt.valid)
  matched, labels = matching.match(iou, positive_overlap, negative_overlap,
                                   allow_low_quality_matches, gt_valid=gt.valid,
                                   low_quality_ties=low_quality_ties,
                                   crowd=gt.is_crowd)
  pos, neg = sampling.sample_balanced_mask(key, labels, batch_size_per_image, fg_fraction)
  box_targets = box_ops.encode_boxes(gt.boxes[matched], anchors, box_weights)
  sampled = jnp.where(pos, 1, jnp.where(neg, 0, -1)).astype(jnp.int32)
  return RPNTargets(labels=sampled, box_targets=box_targets, positive=pos)


def roi_targets(key, proposals, proposal_valid, gt: GroundTruth, *, fg_threshold: float,
                bg_threshold_hi: float, bg_threshold_lo: float, batch_size_per_image: int,
                fg_fraction: float, add_gt_as_proposals: bool,
                box_weights: Sequence[float]) -> RoITargets:
  """Samples the RoIs of one image for the box and mask heads (the reference's RoI sampler).

  Args:
    key: PRNG key of the sampling.
    proposals: (P, 4) float32 xyxy; proposal_valid: (P,) bool.
    gt: the image's `GroundTruth` (no batch dim).
    fg_threshold: IoU >= this is foreground.
    bg_threshold_hi, bg_threshold_lo: IoU in [lo, hi) is background; the rest is not sampled.
    batch_size_per_image, fg_fraction: RoI slots, at most this fraction foreground.
    add_gt_as_proposals: append the non-crowd ground-truth boxes to the candidates (so that
      every image has foreground RoIs with exact targets early in training).
    box_weights: box coder weights (the reference: 10, 10, 5, 5).

  Returns:
    `RoITargets` with the foreground slots first, then background, then unfilled slots.
  """
  if add_gt_as_proposals:
    candidates = jnp.concatenate([proposals, gt.boxes], axis=0)
    candidate_valid = jnp.concatenate([proposal_valid, gt.valid & ~gt.is_crowd], axis=0)
  else:
    candidates, candidate_valid = proposals, proposal_valid
  iou = box_ops.box_iou(candidates, gt.boxes, valid2=gt.valid)
  matched, labels = matching.match(iou, fg_threshold, bg_threshold_hi, False, gt_valid=gt.valid,
                                   crowd=gt.is_crowd, bg_threshold_lo=bg_threshold_lo)
  idx, foreground, slot_valid = sampling.sample_balanced_indices(
      key, labels, batch_size_per_image, fg_fraction, valid=candidate_valid)
  rois = candidates[idx]
  roi_matched = matched[idx]
  classes = jnp.where(foreground, gt.classes[roi_matched], 0)
  box_targets = box_ops.encode_boxes(gt.boxes[roi_matched], rois, box_weights)
  return RoITargets(rois=rois, matched=roi_matched, classes=classes, box_targets=box_targets,
                    foreground=foreground, valid=slot_valid)


def num_mask_rois(batch_size_per_image: int, fg_fraction: float) -> int:
  """Mask-head slots per image: the most foreground RoIs the sampler can return (128 of 512)."""
  return int(batch_size_per_image * fg_fraction)


def mask_targets(gt: GroundTruth, rois, matched, *, resolution: int,
                 binarize: bool = True) -> jnp.ndarray:
  """(R, resolution, resolution) float32 targets in [0, 1] of RoIs of one image.

  Args:
    gt: the image's `GroundTruth`; its masks are the stored uint8 crops (`MASK_PADDING` margin).
    rois: (R, 4) float32 xyxy; matched: (R,) int32 ground-truth index of each RoI.
    resolution: M, the mask head's output size.
    binarize: threshold at 0.5 (the reference) or keep the bilinear fractions (torchvision).
  """
  masks = jnp.asarray(gt.masks, jnp.float32) / 255.0
  return mask_ops.mask_targets(masks, gt.boxes, rois, matched, output_size=resolution,
                               gt_mask_size=gt.mask_size, margin=MASK_PADDING,
                               binarize=binarize)
