"""Mask R-CNN (He et al. 2017) with a ResNet-FPN backbone: inference and training forward.

One module, :class:`MaskRCNN`, with two modes of ``__call__``:

* inference (``train=False``): images -> fixed-size detections
  ``{'boxes' (B, D, 4) xyxy, 'scores' (B, D), 'classes' (B, D) int32, 'masks' (B, D, M, M),
  'valid' (B, D) bool}``;
* training (``train=True``, ground truth given, ``rngs={'sampling': key}``): images + ground
  truth -> the reference's losses and counters (see :meth:`MaskRCNN.__call__`).

Everything is static-shaped: proposals, sampled RoIs and detections have fixed counts with
validity masks. Boxes are xyxy in absolute pixels of the padded input canvas. Anchor labelling,
proposal selection, sampling, target encoding and losses are the pure functions of
:mod:`maskrcnn_jax.ops`; this module only wires them to the heads.

Variables: ``params`` (trainable weights) and ``batch_stats`` (frozen batch-norm constants, or
running statistics with ``finetune_bn``; mutable in training only with ``finetune_bn``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.heads import BoxHead, MaskHead, RPNHead
from maskrcnn_jax.modeling.resnet import ResNet
from maskrcnn_jax.ops import anchors as anchor_ops
from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import losses as loss_ops
from maskrcnn_jax.ops import masks as mask_ops
from maskrcnn_jax.ops import matching, nms, roi_align, sampling

Dtype = Any


@dataclasses.dataclass(frozen=True)
class AnchorSettings:
  """Anchor grid: per level ``(level, widths, heights)`` (A shapes each), centre offset in
  strides, and torchvision's rounding of half extents."""
  shapes: tuple[tuple[int, tuple[float, ...], tuple[float, ...]], ...]
  offset: float = 0.5
  round_half_extents: bool = False

  @property
  def num_anchors(self) -> int:
    return len(self.shapes[0][1])

  def grid(self, height: int, width: int, min_level: int, max_level: int):
    """{'p2': (N2, 4), ...} float32 xyxy NumPy anchors for a (height, width) canvas."""
    shapes = {lvl: (np.asarray(w), np.asarray(h)) for lvl, w, h in self.shapes}
    return anchor_ops.multilevel_anchors(height, width, min_level, max_level, shapes,
                                         self.offset, self.round_half_extents)


@dataclasses.dataclass(frozen=True)
class RPNSettings:
  """RPN labelling, sampling, proposal selection and loss (``config.model.rpn``)."""
  positive_overlap: float = 0.7
  negative_overlap: float = 0.3
  allow_low_quality_matches: bool = True
  batch_size_per_image: int = 256
  fg_fraction: float = 0.5
  min_size: float = 0.0
  train_pre_nms_topk: int = 2000
  train_post_nms_topk: int = 1000
  train_nms_threshold: float = 0.7
  test_pre_nms_topk: int = 1000
  test_post_nms_topk: int = 1000
  test_nms_threshold: float = 0.7
  box_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
  huber_delta: float = 1.0 / 9.0
  box_loss_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class RoISettings:
  """RoI sampling, pooling, box head and its loss (``config.model.roi``)."""
  batch_size_per_image: int = 512
  fg_fraction: float = 0.25
  fg_threshold: float = 0.5
  bg_threshold_hi: float = 0.5
  bg_threshold_lo: float = 0.0
  add_gt_as_proposals: bool = True
  box_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
  pooler_size: int = 7
  sampling_ratio: int = 2
  aligned: bool = False
  canonical_size: float = 224.0
  canonical_level: int = 4
  level_mapping_eps: float = 0.0
  mlp_head_dim: int = 1024
  huber_delta: float = 1.0
  box_loss_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class MaskSettings:
  """Mask head and its loss (``config.model.mask``). Ground-truth masks arrive as
  ``(gt_mask_size + 2 * gt_margin)``-square crops of their boxes."""
  pooler_size: int = 14
  resolution: int = 28
  num_convs: int = 4
  conv_dim: int = 256
  loss_weight: float = 1.0
  gt_margin: int = 2


@dataclasses.dataclass(frozen=True)
class TestSettings:
  """Detection post-processing (``config.model.test``)."""
  detections_per_image: int = 100
  nms_threshold: float = 0.5
  score_threshold: float = 0.0
  pre_nms_topk: int = 1000
  min_box_size: float = 0.0


def init_variables(model: 'MaskRCNN', key, height: int, width: int, batch_size: int = 1):
  """Variables of ``model`` for (batch_size, height, width, 3) inputs (``params`` float32 and
  ``batch_stats``), created without running proposals or detection."""
  images = jnp.zeros((batch_size, height, width, 3), jnp.float32)
  return model.init(key, images, method=MaskRCNN.touch_all)


def normalize_images(images, image_sizes, mean: Sequence[float], std: Sequence[float],
                     dtype: Dtype = jnp.float32):
  """Normalises padded uint8 RGB images on the device and zeroes their padding.

  Args:
    images: (B, H, W, 3) uint8 (or float in [0, 255]) RGB, zero-padded past ``image_sizes``.
    image_sizes: (B, 2) int (height, width) of each image's valid region.
    mean, std: per-channel statistics of pixels scaled to [0, 1] (ImageNet's).
    dtype: output dtype.

  Returns:
    (B, H, W, 3) ``(images / 255 - mean) / std`` inside the valid region and 0 outside it, as the
    reference (normalise, then pad with zeros) and torchvision's ``ImageList`` batching.
  """
  x = jnp.asarray(images, jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  image_sizes = jnp.asarray(image_sizes)
  h, w = x.shape[1:3]
  inside = ((jnp.arange(h)[None, :, None] < image_sizes[:, 0, None, None])
            & (jnp.arange(w)[None, None, :] < image_sizes[:, 1, None, None]))
  return jnp.where(inside[..., None], x, 0.0).astype(dtype)


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
  boxes = box_ops.decode_boxes(box_deltas, proposals[:, None, :], box_weights)
  boxes = box_ops.clip_boxes(boxes, image_size[0], image_size[1])
  scores = jax.nn.softmax(class_logits, axis=-1)
  boxes = boxes[:, 1:].reshape(-1, 4)
  scores = scores[:, 1:].reshape(-1)
  classes = jnp.tile(jnp.arange(1, num_classes, dtype=jnp.int32), proposals.shape[0])
  ok = jnp.repeat(proposal_valid, num_classes - 1) & (scores > score_threshold)
  ok &= ((boxes[:, 2] - boxes[:, 0]) >= min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_box_size)
  k = min(pre_nms_topk, scores.shape[0])
  top_scores, top_idx = lax.top_k(jnp.where(ok, scores, -jnp.inf), k)
  cand_boxes, cand_classes, cand_ok = boxes[top_idx], classes[top_idx], ok[top_idx]
  keep, keep_valid = nms.batched_nms(cand_boxes, top_scores, cand_classes, nms_threshold,
                                     max_detections, valid=cand_ok)
  out_boxes = jnp.where(keep_valid[:, None], cand_boxes[keep], 0.0)
  out_scores = jnp.where(keep_valid, top_scores[keep], 0.0)
  out_classes = jnp.where(keep_valid, cand_classes[keep], 0)
  return out_boxes, out_scores, out_classes, keep_valid


class MaskRCNN(nn.Module):
  """Mask R-CNN with a ResNet-FPN backbone.

  Attributes:
    num_classes: K, background (0) included.
    depth: ResNet depth.
    frozen_bn: frozen batch norm (True) or trainable (``finetune_bn``).
    bn_epsilon, bn_momentum: batch-norm epsilon and running-average decay.
    freeze_at: frozen backbone stages (1 = stem, 2 = stem + res2); their trainable batch norms
      stay in inference mode. The parameters are frozen by the optimizer mask
      (:func:`maskrcnn_jax.modeling.frozen_param_mask`).
    stop_gradient_at: backbone stage after which gradients are stopped (0 = none); a speed
      measure equal to the freeze point, see :mod:`maskrcnn_jax.modeling.resnet`.
    min_level, max_level: pyramid levels (P2..P6); RoIs pool from min_level..min(max_level, 5).
    fpn_channels: FPN width.
    anchors, rpn, roi, mask, test: settings dataclasses.
    dtype: compute dtype; parameters float32; box arithmetic and losses float32.
  """
  num_classes: int = 91
  depth: int = 50
  frozen_bn: bool = True
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.997
  freeze_at: int = 0
  stop_gradient_at: int = 0
  min_level: int = 2
  max_level: int = 6
  fpn_channels: int = 256
  anchors: AnchorSettings = None
  rpn: RPNSettings = RPNSettings()
  roi: RoISettings = RoISettings()
  mask: MaskSettings = MaskSettings()
  test: TestSettings = TestSettings()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.backbone = ResNet(self.depth, self.frozen_bn, self.bn_epsilon, self.bn_momentum,
                           self.freeze_at, self.stop_gradient_at, dtype=self.dtype)
    self.fpn = FPN(self.min_level, self.max_level, self.fpn_channels, dtype=self.dtype)
    self.rpn_head = RPNHead(self.anchors.num_anchors, self.fpn_channels, dtype=self.dtype)
    self.box_head = BoxHead(self.num_classes, self.roi.mlp_head_dim, dtype=self.dtype)
    self.mask_head = MaskHead(self.num_classes, self.mask.num_convs, self.mask.conv_dim,
                              dtype=self.dtype)

  # ------------------------------------------------------------------ pieces
  def features(self, images, train: bool = False) -> dict[str, jnp.ndarray]:
    """images (B, H, W, 3) normalised -> FPN features {'p2': (B, H/4, W/4, C), ..., 'p6'}."""
    return self.fpn(self.backbone(images, train))

  def _roi_levels(self):
    return self.min_level, min(self.max_level, 5)

  def _pool(self, features, boxes, output_size: int):
    """Multilevel RoIAlign of (B, R, 4) xyxy boxes -> (B, R, S, S, C)."""
    lo, hi = self._roi_levels()
    pyramid = {f'p{l}': features[f'p{l}'] for l in range(lo, hi + 1)}
    return roi_align.multilevel_roi_align(
        pyramid, boxes, output_size, lo, hi, canonical_size=self.roi.canonical_size,
        canonical_level=self.roi.canonical_level, sampling_ratio=self.roi.sampling_ratio,
        aligned=self.roi.aligned, eps=self.roi.level_mapping_eps)

  def anchor_grid(self, height: int, width: int) -> dict[str, np.ndarray]:
    """Anchors of a (height, width) canvas: level -> (N_l, 4) float32 xyxy NumPy array."""
    return self.anchors.grid(height, width, self.min_level, self.max_level)

  def proposals(self, features, image_sizes, train: bool = False):
    """RPN head + proposal selection (train or test parameters).

    Returns:
      scores: level -> (B, N_l) logits; deltas: level -> (B, N_l, 4);
      proposals: (boxes (B, P, 4) xyxy, scores (B, P) logits, valid (B, P) bool), no gradient.
    """
    levels = {f'p{l}': features[f'p{l}'] for l in range(self.min_level, self.max_level + 1)}
    scores, deltas = self.rpn_head(levels)
    h, w = features[f'p{self.min_level}'].shape[1:3]
    stride = 2 ** self.min_level
    anchors = self.anchor_grid(h * stride, w * stride)
    rpn = self.rpn
    pre, post, thr = ((rpn.train_pre_nms_topk, rpn.train_post_nms_topk, rpn.train_nms_threshold)
                      if train else
                      (rpn.test_pre_nms_topk, rpn.test_post_nms_topk, rpn.test_nms_threshold))
    props = nms.multilevel_proposals(scores, deltas, anchors, image_sizes, pre, post, thr,
                                     rpn.min_size, rpn.box_weights)
    return scores, deltas, props

  def detect(self, features, proposal_boxes, proposal_valid, image_sizes):
    """Box head + post-processing + mask head on the kept detections (inference)."""
    class_logits, box_deltas = self.box_head(
        self._pool(features, proposal_boxes, self.roi.pooler_size))
    t = self.test
    post = jax.vmap(lambda p, v, c, d, s: detections_from_boxes(
        p, v, c, d, s, box_weights=self.roi.box_weights, score_threshold=t.score_threshold,
        min_box_size=t.min_box_size, pre_nms_topk=t.pre_nms_topk, nms_threshold=t.nms_threshold,
        max_detections=t.detections_per_image))
    boxes, scores, classes, valid = post(proposal_boxes, proposal_valid, class_logits,
                                         box_deltas, jnp.asarray(image_sizes))
    mask_logits = self.mask_head(self._pool(features, boxes, self.mask.pooler_size))
    # Each detection's mask is its class's channel (the background channel is never used).
    logits = jnp.take_along_axis(mask_logits, classes[:, :, None, None, None], axis=-1)[..., 0]
    masks = jnp.where(valid[:, :, None, None], jax.nn.sigmoid(logits), 0.0)
    return {'boxes': boxes, 'scores': scores, 'classes': classes, 'masks': masks,
            'valid': valid}

  def touch_all(self, images):
    """Runs every submodule once on dummy inputs (RoI features of zeros), without proposals,
    NMS or RoIAlign: ``model.init(key, images, method='touch_all')`` creates the same variables
    as a full forward, faster. Returns nothing useful."""
    features = self.features(images)
    self.rpn_head({f'p{l}': features[f'p{l}'] for l in range(self.min_level, self.max_level + 1)})
    c = self.fpn_channels
    self.box_head(jnp.zeros((1, 1, self.roi.pooler_size, self.roi.pooler_size, c), self.dtype))
    self.mask_head(jnp.zeros((1, 1, self.mask.pooler_size, self.mask.pooler_size, c),
                             self.dtype))
    return features

  # ------------------------------------------------------------------ entry point
  def __call__(self, images, image_sizes, gt_boxes=None, gt_classes=None, gt_masks=None,
               gt_valid=None, gt_is_crowd=None, train: bool = False):
    """Inference (``train=False``) or training losses (``train=True``).

    Args:
      images: (B, H, W, 3) float, normalised and zero-padded (:func:`normalize_images`); H and W
        multiples of ``2**max_level``.
      image_sizes: (B, 2) int32 (height, width) of each image's valid region.
      gt_boxes: (B, N, 4) float32 xyxy canvas pixels (training).
      gt_classes: (B, N) int32 class ids, 0 = padding (training).
      gt_masks: (B, N, S, S) uint8, ``round(255 * mask)`` cropped to the box at
        ``S - 2 * gt_margin`` plus a zero margin of ``gt_margin`` cells (training).
      gt_valid: (B, N) bool (training; default ``gt_classes > 0``).
      gt_is_crowd: (B, N) bool (training; default all False).
      train: select the mode. Training needs ``rngs={'sampling': key}`` and, with
        ``finetune_bn``, ``mutable=['batch_stats']``.

    Returns:
      Inference: dict of ``boxes`` (B, D, 4) float32 xyxy input-canvas pixels, ``scores``
      (B, D) float32, ``classes`` (B, D) int32, ``masks`` (B, D, M, M) float32 probabilities in
      box coordinates (unpasted), ``valid`` (B, D) bool; D = ``test.detections_per_image``.
      Training: dict of float32 scalars ``rpn_score_loss``, ``rpn_box_loss``,
      ``fast_rcnn_class_loss``, ``fast_rcnn_box_loss``, ``mask_loss``, ``total_loss`` and int32
      counters ``num_positive_anchors``, ``num_foreground_rois`` (summed over the batch).
    """
    if train:
      if gt_boxes is None or gt_classes is None or gt_masks is None:
        raise ValueError('train=True needs gt_boxes, gt_classes and gt_masks')
      return self.losses(images, image_sizes, gt_boxes, gt_classes, gt_masks, gt_valid,
                         gt_is_crowd)
    features = self.features(images, train=False)
    _, _, (boxes, _, valid) = self.proposals(features, image_sizes, train=False)
    return self.detect(features, boxes, valid, image_sizes)

  def losses(self, images, image_sizes, gt_boxes, gt_classes, gt_masks, gt_valid=None,
             gt_is_crowd=None):
    """Training forward; see :meth:`__call__` for the arguments and the result.

    The reference's recipe: anchors labelled by IoU (0.7 / 0.3 + low-quality matches; crowd and
    padded ground truth never positive), 256 anchors sampled per image at 0.5 positives;
    proposals with the training parameters (no gradient); ground truth appended to the
    proposals; 512 RoIs sampled per image at 0.25 foreground (IoU >= 0.5), foreground first;
    box targets with weights (10, 10, 5, 5); mask targets for the first
    ``512 * 0.25`` (foreground) slots. Losses and normalisations in :mod:`ops.losses`.
    """
    rpn_cfg, roi_cfg = self.rpn, self.roi
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_classes = jnp.asarray(gt_classes, jnp.int32)
    gt_valid = (gt_classes > 0) if gt_valid is None else jnp.asarray(gt_valid, bool)
    gt_is_crowd = (jnp.zeros_like(gt_valid) if gt_is_crowd is None
                   else jnp.asarray(gt_is_crowd, bool))
    batch = images.shape[0]
    key = self.make_rng('sampling')
    rpn_keys, roi_keys = jnp.split(jax.random.split(key, 2 * batch), 2)

    features = self.features(images, train=True)
    scores, deltas, (proposals, _, proposal_valid) = self.proposals(features, image_sizes,
                                                                    train=True)
    levels = sorted(scores)
    h, w = images.shape[1:3]
    anchors = self.anchor_grid(h, w)
    sizes = [anchors[l].shape[0] for l in levels]
    all_anchors = jnp.asarray(np.concatenate([anchors[l] for l in levels]))

    # ---- RPN targets: match, sample, encode.
    def rpn_targets(key, boxes, valid, crowd):
      iou = box_ops.box_iou(all_anchors, boxes, valid2=valid)
      matched, labels = matching.match(iou, rpn_cfg.positive_overlap, rpn_cfg.negative_overlap,
                                       rpn_cfg.allow_low_quality_matches, gt_valid=valid,
                                       crowd=crowd)
      pos, neg = sampling.sample_balanced_mask(key, labels, rpn_cfg.batch_size_per_image,
                                               rpn_cfg.fg_fraction)
      targets = box_ops.encode_boxes(boxes[matched], all_anchors, rpn_cfg.box_weights)
      sampled_labels = jnp.where(pos, 1, jnp.where(neg, 0, -1))
      return sampled_labels, pos, targets

    rpn_labels, rpn_pos, rpn_targets_all = jax.vmap(rpn_targets)(rpn_keys, gt_boxes, gt_valid,
                                                                 gt_is_crowd)
    logits = jnp.concatenate([scores[l] for l in levels], axis=1)
    rpn_score_loss = loss_ops.rpn_score_loss(logits, rpn_labels,
                                             batch * rpn_cfg.batch_size_per_image)
    # The reference normalises the RPN box loss per level and sums the levels.
    rpn_box_loss = 0.0
    start = 0
    for level, n in zip(levels, sizes):
      rpn_box_loss += loss_ops.rpn_box_loss(deltas[level], rpn_targets_all[:, start:start + n],
                                            rpn_pos[:, start:start + n], rpn_cfg.huber_delta)
      start += n

    # ---- RoI sampling on proposals + ground truth.
    def roi_targets(key, props, props_valid, boxes, classes, valid, crowd):
      if roi_cfg.add_gt_as_proposals:
        candidates = jnp.concatenate([props, boxes], axis=0)
        cand_valid = jnp.concatenate([props_valid, valid & ~crowd], axis=0)
      else:
        candidates, cand_valid = props, props_valid
      iou = box_ops.box_iou(candidates, boxes, valid2=valid)
      matched, labels = matching.match(iou, roi_cfg.fg_threshold, roi_cfg.bg_threshold_hi,
                                       False, gt_valid=valid, crowd=crowd,
                                       bg_threshold_lo=roi_cfg.bg_threshold_lo)
      idx, is_fg, slot_valid = sampling.sample_balanced_indices(
          key, labels, roi_cfg.batch_size_per_image, roi_cfg.fg_fraction, valid=cand_valid)
      rois = candidates[idx]
      roi_matched = matched[idx]
      roi_classes = jnp.where(is_fg, classes[roi_matched], 0)
      targets = box_ops.encode_boxes(boxes[roi_matched], rois, roi_cfg.box_weights)
      return rois, roi_matched, roi_classes, targets, is_fg, slot_valid

    rois, roi_matched, roi_classes, roi_box_targets, is_fg, roi_valid = jax.vmap(roi_targets)(
        roi_keys, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_is_crowd)
    rois = lax.stop_gradient(rois)

    class_logits, box_deltas = self.box_head(self._pool(features, rois, roi_cfg.pooler_size))
    # Mean over the filled RoI slots (= the reference's mean over all 512 whenever every slot is
    # filled, which needs fewer than 512 eligible candidates to fail).
    class_loss = loss_ops.fast_rcnn_class_loss(class_logits, roi_classes, valid=roi_valid)
    class_deltas = jnp.take_along_axis(box_deltas, roi_classes[:, :, None, None], axis=2)[:, :, 0]
    box_loss = loss_ops.fast_rcnn_box_loss(class_deltas, roi_box_targets, is_fg,
                                           roi_cfg.huber_delta)

    # ---- Mask head on the leading (foreground) slots.
    num_fg = int(roi_cfg.batch_size_per_image * roi_cfg.fg_fraction)
    fg_rois = rois[:, :num_fg]
    fg_matched = roi_matched[:, :num_fg]
    fg_classes = roi_classes[:, :num_fg]
    fg = is_fg[:, :num_fg]
    stored = gt_masks.shape[-1]
    margin = self.mask.gt_margin
    resolution = self.mask.resolution

    def mask_targets(masks, boxes, r, m):
      return mask_ops.mask_targets(jnp.asarray(masks, jnp.float32) / 255.0, boxes, r, m,
                                   output_size=resolution, gt_mask_size=stored - 2 * margin,
                                   margin=margin)

    targets = jax.vmap(mask_targets)(gt_masks, gt_boxes, fg_rois, fg_matched)
    mask_logits = self.mask_head(self._pool(features, fg_rois, self.mask.pooler_size))
    mask_logits = jnp.take_along_axis(mask_logits, fg_classes[:, :, None, None, None],
                                      axis=-1)[..., 0]
    mask_loss = loss_ops.mask_loss(mask_logits, targets, fg)

    total = (rpn_score_loss + rpn_cfg.box_loss_weight * rpn_box_loss + class_loss
             + roi_cfg.box_loss_weight * box_loss + self.mask.loss_weight * mask_loss)
    return {
        'rpn_score_loss': rpn_score_loss,
        'rpn_box_loss': jnp.asarray(rpn_box_loss, jnp.float32),
        'fast_rcnn_class_loss': class_loss,
        'fast_rcnn_box_loss': box_loss,
        'mask_loss': mask_loss,
        'total_loss': total,
        'num_positive_anchors': jnp.sum(rpn_pos, dtype=jnp.int32),
        'num_foreground_rois': jnp.sum(is_fg, dtype=jnp.int32),
    }
