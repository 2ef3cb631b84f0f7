"""Flax modules of Mask R-CNN and the one function that reads the model config.

Public API:
  build_model(model_config) -> MaskRCNN   (the only reader of ``config.model``)
  init_variables(model, key, height, width) -> {'params', 'batch_stats'}
  normalize_images(images_uint8, image_sizes, mean, std) -> normalised float images
  frozen_param_mask(params, freeze_at)    (optimizer mask of the frozen backbone stages)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.modeling.model import (AnchorSettings, MaskRCNN, MaskSettings, RoISettings,
                                         RPNSettings, TestSettings, detections_from_boxes,
                                         init_variables, normalize_images)
from maskrcnn_jax.modeling.resnet import ResNet, frozen_param_mask
from maskrcnn_jax.ops import anchors as anchor_ops

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

__all__ = ['AnchorSettings', 'MaskRCNN', 'MaskSettings', 'ResNet', 'RoISettings', 'RPNSettings',
           'TestSettings', 'build_model', 'detections_from_boxes', 'frozen_param_mask',
           'init_variables', 'normalize_images', 'anchor_settings']


def anchor_settings(model_config) -> AnchorSettings:
  """Anchor shapes per level from ``config.model.anchors`` (either convention)."""
  a = model_config.anchors
  shapes = []
  for i, level in enumerate(range(model_config.min_level, model_config.max_level + 1)):
    if a.convention == 'reference':
      w, h = anchor_ops.reference_anchor_shapes(level, a.num_scales, a.anchor_scale,
                                                a.aspect_ratios)
    else:
      w, h = anchor_ops.torchvision_anchor_shapes((a.sizes[i],), a.aspect_ratios)
    shapes.append((level, tuple(float(x) for x in np.asarray(w)),
                   tuple(float(x) for x in np.asarray(h))))
  return AnchorSettings(tuple(shapes), float(a.offset), bool(a.round_half_extents))


def build_model(model_config) -> MaskRCNN:
  """Builds the Mask R-CNN module described by ``config.model`` (see configs/coco_r50.py)."""
  m = model_config
  b, rpn, roi, mask, test = m.backbone, m.rpn, m.roi, m.mask, m.test
  freeze_at = int(b.freeze_at)
  stop_at = freeze_at if b.stop_frozen_gradients else 0
  return MaskRCNN(
      num_classes=int(m.num_classes),
      depth=int(b.depth),
      frozen_bn=not b.finetune_bn,
      bn_epsilon=float(b.bn_epsilon),
      bn_momentum=float(b.bn_momentum),
      freeze_at=freeze_at,
      stop_gradient_at=stop_at,
      min_level=int(m.min_level),
      max_level=int(m.max_level),
      fpn_channels=int(m.fpn_channels),
      anchors=anchor_settings(m),
      rpn=RPNSettings(
          positive_overlap=float(rpn.positive_overlap),
          negative_overlap=float(rpn.negative_overlap),
          allow_low_quality_matches=bool(rpn.allow_low_quality_matches),
          batch_size_per_image=int(rpn.batch_size_per_image),
          fg_fraction=float(rpn.fg_fraction),
          min_size=float(rpn.min_size),
          train_pre_nms_topk=int(rpn.train_pre_nms_topk),
          train_post_nms_topk=int(rpn.train_post_nms_topk),
          train_nms_threshold=float(rpn.train_nms_threshold),
          test_pre_nms_topk=int(rpn.test_pre_nms_topk),
          test_post_nms_topk=int(rpn.test_post_nms_topk),
          test_nms_threshold=float(rpn.test_nms_threshold),
          box_weights=tuple(float(x) for x in rpn.box_weights),
          huber_delta=float(rpn.huber_delta),
          box_loss_weight=float(rpn.box_loss_weight)),
      roi=RoISettings(
          batch_size_per_image=int(roi.batch_size_per_image),
          fg_fraction=float(roi.fg_fraction),
          fg_threshold=float(roi.fg_threshold),
          bg_threshold_hi=float(roi.bg_threshold_hi),
          bg_threshold_lo=float(roi.bg_threshold_lo),
          add_gt_as_proposals=bool(roi.add_gt_as_proposals),
          box_weights=tuple(float(x) for x in roi.box_weights),
          pooler_size=int(roi.pooler_size),
          sampling_ratio=int(roi.sampling_ratio),
          aligned=bool(roi.aligned),
          canonical_size=float(roi.canonical_size),
          canonical_level=int(roi.canonical_level),
          level_mapping_eps=float(roi.level_mapping_eps),
          mlp_head_dim=int(roi.mlp_head_dim),
          huber_delta=float(roi.huber_delta),
          box_loss_weight=float(roi.box_loss_weight)),
      mask=MaskSettings(
          pooler_size=int(mask.pooler_size),
          resolution=int(mask.resolution),
          num_convs=int(mask.num_convs),
          conv_dim=int(mask.conv_dim),
          loss_weight=float(mask.loss_weight),
          gt_margin=int(mask.gt_margin)),
      test=TestSettings(
          detections_per_image=int(test.detections_per_image),
          nms_threshold=float(test.nms_threshold),
          score_threshold=float(test.score_threshold),
          pre_nms_topk=int(test.pre_nms_topk),
          min_box_size=float(test.min_box_size)),
      dtype=DTYPES[m.precision],
  )
