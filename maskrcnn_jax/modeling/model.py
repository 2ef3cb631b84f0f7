"""Mask R-CNN (He et al. 2017) with a ResNet-FPN backbone: inference and training forward.

One module, :class:`MaskRCNN`, with two modes of ``__call__``:

* inference (``train=False``): images -> fixed-size detections
  ``{'boxes' (B, D, 4) xyxy, 'scores' (B, D), 'classes' (B, D) int32, 'masks' (B, D, M, M),
  'valid' (B, D) bool}``;
* training (``train=True``, a `GroundTruth` given, ``rngs={'sampling': key}``): the reference's
  losses and counters (see :meth:`MaskRCNN.losses`), normalised over this device's batch or,
  with ``batch_axis`` (the mapped device axis), over the global batch.

The module wires the recipe, as the paper reads: features -> proposals -> targets -> heads ->
losses. Each step is a named pure function of :mod:`maskrcnn_jax.ops` (``proposals``,
``targets``, ``losses``, ``postprocess``), tested on its own; the module holds the parameters
(backbone, FPN, heads) and the settings of ``config.model`` (:mod:`maskrcnn_jax.settings`).

Everything is static-shaped: proposals, sampled RoIs and detections have fixed counts with
validity masks. Boxes are xyxy in absolute pixels of the padded input canvas.

Variables: ``params`` (trainable weights) and ``batch_stats`` (frozen batch-norm constants, or
running statistics with ``finetune_bn``; mutable in training only with ``finetune_bn``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskrcnn_jax.settings import (AnchorSettings, MaskSettings, RoISettings, RPNSettings,
                                   TestSettings)
from maskrcnn_jax.data.spec import GroundTruth
from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.heads import BoxHead, MaskHead, RPNHead
from maskrcnn_jax.ops import anchors as anchor_ops
from maskrcnn_jax.ops import losses as loss_ops
from maskrcnn_jax.ops import postprocess, roi_align, targets
from maskrcnn_jax.ops.proposals import Proposals, multilevel_proposals

Dtype = Any
LOSS_KEYS = ('total_loss', 'rpn_score_loss', 'rpn_box_loss', 'fast_rcnn_class_loss',
             'fast_rcnn_box_loss', 'mask_loss')
COUNTER_KEYS = ('num_positive_anchors', 'num_foreground_rois')
# Compiler options of the one-off initialisation: it runs once, so XLA's backend optimisations
# (minutes of LLVM time for the whole inference graph on a CPU) buy nothing.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def init_variables(model: 'MaskRCNN', key, image_size: tuple[int, int], batch_size: int = 1):
  """Fresh variables of ``model`` (``params`` float32 and ``batch_stats``) for
  (batch_size, H, W, 3) inputs, created without running proposals or detection
  (:meth:`MaskRCNN.touch_all`).

  Traceable (``jax.eval_shape`` gives the abstract variables); called eagerly it compiles the
  initialisation with `INIT_COMPILER_OPTIONS`.
  """
  h, w = image_size

  def init(key):
    images = jnp.zeros((batch_size, h, w, 3), jnp.float32)
    return dict(model.init(key, images, method=MaskRCNN.touch_all))

  if isinstance(key, jax.core.Tracer):
    return init(key)
  return jax.jit(init).lower(key).compile(compiler_options=INIT_COMPILER_OPTIONS)(key)


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


def anchor_shapes(settings: AnchorSettings, min_level: int, max_level: int):
  """level -> (widths, heights) float64 of the configured anchor convention."""
  shapes = {}
  for i, level in enumerate(range(min_level, max_level + 1)):
    if settings.convention == 'reference':
      shapes[level] = anchor_ops.reference_anchor_shapes(
          level, settings.num_scales, settings.anchor_scale, settings.aspect_ratios)
    else:
      shapes[level] = anchor_ops.torchvision_anchor_shapes((settings.sizes[i],),
                                                           settings.aspect_ratios)
  return shapes


class MaskRCNN(nn.Module):
  """Mask R-CNN with a ResNet-FPN backbone.

  Attributes:
    num_classes: K, background (0) included.
    backbone_cls: the backbone module's constructor, ``dtype`` aside (``build_model`` passes
      ``functools.partial(ResNet, **config.model.backbone)``); it returns {'c2'..'c5'}.
    min_level, max_level: pyramid levels (P2..P6); RoIs pool from min_level..min(max_level, 5).
    fpn_channels: FPN width.
    anchors, rpn, roi, mask, test: the settings of the config.model sections.
    dtype: compute dtype; parameters float32; box arithmetic and losses float32.
    conv_kernel_grad: the convolutions' kernel-gradient algorithm, 'xla' or 'matmul'
      (:mod:`maskrcnn_jax.ops.conv`; ``build_model`` resolves the config's 'auto').
    products: the products of the convolutions and dense layers, 'float32' or 'bfloat16'
      (:class:`maskrcnn_jax.modeling.layers.Conv`: forward and gradients); ``build_model`` sets
      ``config.model.train_products``, or ``inference_products`` with ``inference=True``.
  """
  num_classes: int
  backbone_cls: Callable[..., nn.Module]
  min_level: int
  max_level: int
  fpn_channels: int
  anchors: AnchorSettings
  rpn: RPNSettings
  roi: RoISettings
  mask: MaskSettings
  test: TestSettings
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_kernel_grad: str = 'xla'
  products: str = 'float32'

  def setup(self):
    grad, products = self.conv_kernel_grad, self.products
    self.backbone = self.backbone_cls(dtype=self.dtype, conv_kernel_grad=grad,
                                      products=products)
    self.fpn = FPN(min_level=self.min_level, max_level=self.max_level,
                   channels=self.fpn_channels, dtype=self.dtype, conv_kernel_grad=grad,
                   products=products)
    num_anchors = anchor_ops.num_anchors_per_location(
        anchor_shapes(self.anchors, self.min_level, self.max_level))
    self.rpn_head = RPNHead(num_anchors=num_anchors, channels=self.fpn_channels,
                            dtype=self.dtype, conv_kernel_grad=grad, products=products)
    self.box_head = BoxHead(num_classes=self.num_classes, mlp_dim=self.roi.mlp_head_dim,
                            dtype=self.dtype, products=products)
    # Bucketed: the head's activations are recomputed in the backward pass (nn.remat), so that
    # each branch of the conditional keeps only its inputs; otherwise the forward conditional
    # returns every branch's activations, zero-filled for the branches not taken.
    mask_head_cls = nn.remat(MaskHead) if len(self._mask_buckets()) > 1 else MaskHead
    self.mask_head = mask_head_cls(num_classes=self.num_classes, num_convs=self.mask.num_convs,
                              conv_dim=self.mask.conv_dim,
                              predictor_init_std=self.mask.predictor_init_std, dtype=self.dtype,
                              conv_kernel_grad=grad, products=products)

  # ------------------------------------------------------------------ pieces
  def features(self, images, train: bool = False) -> dict[str, jnp.ndarray]:
    """images (B, H, W, 3) normalised -> FPN features {'p2': (B, H/4, W/4, C), ..., 'p6'}."""
    return self.fpn(self.backbone(images, train))

  def anchor_grid(self, height: int, width: int) -> dict[str, np.ndarray]:
    """Anchors of a (height, width) canvas: level -> (N_l, 4) float32 xyxy NumPy array."""
    return anchor_ops.multilevel_anchors(
        height, width, self.min_level, self.max_level,
        anchor_shapes(self.anchors, self.min_level, self.max_level), self.anchors.offset,
        self.anchors.round_half_extents)

  def _pool(self, features, boxes, output_size: int):
    """Multilevel RoIAlign of (B, R, 4) xyxy boxes -> (B, R, S, S, C)."""
    lo, hi = self.min_level, min(self.max_level, 5)
    pyramid = {f'p{l}': features[f'p{l}'] for l in range(lo, hi + 1)}
    return roi_align.multilevel_roi_align(
        pyramid, boxes, output_size, lo, hi, canonical_size=self.roi.canonical_size,
        canonical_level=self.roi.canonical_level, sampling_ratio=self.roi.sampling_ratio,
        aligned=self.roi.aligned, eps=self.roi.level_mapping_eps)

  def proposals(self, features, anchors, image_sizes, train: bool = False):
    """RPN head + proposal selection (train or test parameters).

    Returns:
      scores: level -> (B, N_l) logits; deltas: level -> (B, N_l, 4); `Proposals` (no gradient).
    """
    scores, deltas = self.rpn_head(
        {f'p{l}': features[f'p{l}'] for l in range(self.min_level, self.max_level + 1)})
    rpn = self.rpn
    pre, post, thr = ((rpn.train_pre_nms_topk, rpn.train_post_nms_topk, rpn.train_nms_threshold)
                      if train else
                      (rpn.test_pre_nms_topk, rpn.test_post_nms_topk, rpn.test_nms_threshold))
    proposals = multilevel_proposals(
        scores, deltas, anchors, image_sizes, pre_nms_topk=pre, post_nms_topk=post,
        nms_threshold=thr, min_size=rpn.min_size, box_weights=rpn.box_weights)
    return scores, deltas, proposals

  def detect(self, features, proposals: Proposals, image_sizes):
    """Box head + post-processing + mask head on the kept detections (inference)."""
    class_logits, box_deltas = self.box_head(
        self._pool(features, proposals.boxes, self.roi.pooler_size))
    t = self.test
    post = jax.vmap(functools.partial(
        postprocess.detections_from_boxes, box_weights=self.roi.box_weights,
        score_threshold=t.score_threshold, min_box_size=t.min_box_size,
        pre_nms_topk=t.pre_nms_topk, nms_threshold=t.nms_threshold,
        max_detections=t.detections_per_image))
    boxes, scores, classes, valid = post(proposals.boxes, proposals.valid, class_logits,
                                         box_deltas, jnp.asarray(image_sizes))
    mask_logits = self.mask_head(self._pool(features, boxes, self.mask.pooler_size))
    # Each detection's mask is its class's channel (the background channel is never used).
    masks = jax.nn.sigmoid(_class_channel(mask_logits, classes))
    masks = jnp.where(valid[:, :, None, None], masks, 0.0)
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

  # ------------------------------------------------------------------ entry points
  def __call__(self, images, image_sizes, gt: GroundTruth | None = None, train: bool = False,
               batch_axis: str | None = None):
    """Inference (``train=False``) or training losses (``train=True``).

    Args:
      images: (B, H, W, 3) float, normalised and zero-padded (:func:`normalize_images`); H and W
        multiples of ``2**max_level``.
      image_sizes: (B, 2) int32 (height, width) of each image's valid region.
      gt: the batch's `GroundTruth` (training).
      train: select the mode. Training needs ``rngs={'sampling': key}`` and, with
        ``finetune_bn``, ``mutable=['batch_stats']``.
      batch_axis: training only: None, or the mapped device axis whose devices share one global
        batch (:meth:`losses`).

    Returns:
      Inference: dict of ``boxes`` (B, D, 4) float32 xyxy input-canvas pixels, ``scores``
      (B, D) float32, ``classes`` (B, D) int32, ``masks`` (B, D, M, M) float32 probabilities in
      box coordinates (unpasted), ``valid`` (B, D) bool; D = ``test.detections_per_image``.
      Training: :meth:`losses`.
    """
    if train:
      if gt is None:
        raise ValueError('train=True needs the ground truth (gt=GroundTruth(...))')
      return self.losses(images, image_sizes, gt, batch_axis)
    features = self.features(images, train=False)
    anchors = self.anchor_grid(*images.shape[1:3])
    _, _, proposals = self.proposals(features, anchors, image_sizes, train=False)
    return self.detect(features, proposals, image_sizes)

  def losses(self, images, image_sizes, gt: GroundTruth, batch_axis: str | None = None):
    """Training forward: the reference's recipe (:mod:`maskrcnn_jax.ops.targets`).

    Args:
      images, image_sizes, gt: this device's batch of b images (see ``__call__``).
      batch_axis: None (the reference under Horovod): each loss is normalised over this batch
        and image i samples its anchors and RoIs with the i-th of 2b keys split from the
        'sampling' key. The name of a mapped device axis whose devices hold equal shares of one
        global batch (the 'sampling' key the same on every device): every normaliser is its
        mean over the devices (`maskrcnn_jax.ops.losses.device_mean`) and image i of device d
        samples with ``fold_in(key, d * b + i)``, its index in the global batch, so that the
        average over devices of the losses (and of their gradients) is the loss of the global
        batch, the same however the batch is split over devices.

    Returns:
      dict of float32 scalars `LOSS_KEYS` (``total_loss`` = the weighted sum of the five terms)
      and int32 `COUNTER_KEYS` (sampled positive anchors and foreground RoIs, summed over the
      batch). With ``batch_axis`` a loss term is this device's sum over the global normaliser's
      mean: its mean over devices, not its value alone, is the global batch's loss.
    """
    rpn, roi = self.rpn, self.roi
    batch = images.shape[0]
    rpn_keys, roi_keys = _image_keys(self.make_rng('sampling'), batch, batch_axis)

    # Features, anchors (built once) and proposals (training parameters, no gradient).
    features = self.features(images, train=True)
    anchors = self.anchor_grid(*images.shape[1:3])
    scores, deltas, proposals = self.proposals(features, anchors, image_sizes, train=True)

    # Targets: anchors labelled and sampled; RoIs sampled, foreground first; mask targets.
    all_anchors = jnp.asarray(np.concatenate([anchors[l] for l in sorted(anchors)]))
    anchor_targets = jax.vmap(functools.partial(
        targets.rpn_targets, positive_overlap=rpn.positive_overlap,
        negative_overlap=rpn.negative_overlap,
        allow_low_quality_matches=rpn.allow_low_quality_matches,
        low_quality_ties=rpn.low_quality_ties,
        batch_size_per_image=rpn.batch_size_per_image, fg_fraction=rpn.fg_fraction,
        box_weights=rpn.box_weights), in_axes=(0, None, 0))(rpn_keys, all_anchors, gt)
    rois = jax.vmap(functools.partial(
        targets.roi_targets, fg_threshold=roi.fg_threshold,
        bg_threshold_hi=roi.bg_threshold_hi, bg_threshold_lo=roi.bg_threshold_lo,
        batch_size_per_image=roi.batch_size_per_image, fg_fraction=roi.fg_fraction,
        add_gt_as_proposals=roi.add_gt_as_proposals, box_weights=roi.box_weights))(
            roi_keys, proposals.boxes, proposals.valid, gt)
    rois = rois._replace(rois=lax.stop_gradient(rois.rois))
    num_fg = targets.num_mask_rois(roi.batch_size_per_image, roi.fg_fraction)
    fg = jax.tree_util.tree_map(lambda x: x[:, :num_fg], rois)  # the foreground slots

    # Heads (the mask head with its targets and loss sum: `_mask_head_loss_sum`).
    class_logits, box_deltas = self.box_head(self._pool(features, rois.rois, roi.pooler_size))
    mask_loss_sum = self._mask_head_loss_sum(features, gt, fg)

    # Losses (normalisations: ops.losses; over the devices of batch_axis when given).
    levels = sorted(scores)
    axis = batch_axis
    terms = {
        'rpn_score_loss': loss_ops.rpn_score_loss(
            jnp.concatenate([scores[l] for l in levels], axis=1), anchor_targets.labels,
            batch * rpn.batch_size_per_image, axis),
        'rpn_box_loss': (
            loss_ops.multilevel_rpn_box_loss(deltas, anchor_targets.box_targets,
                                             anchor_targets.positive, rpn.huber_delta, axis)
            if rpn.box_loss_normalizer == 'positives_per_level' else
            loss_ops.sampled_rpn_box_loss(deltas, anchor_targets.box_targets,
                                          anchor_targets.positive,
                                          batch * rpn.batch_size_per_image, rpn.huber_delta,
                                          axis)),
        # Mean over the filled RoI slots (= the reference's mean over all slots whenever every
        # slot is filled, which needs fewer eligible candidates than slots to fail).
        'fast_rcnn_class_loss': loss_ops.fast_rcnn_class_loss(class_logits, rois.classes,
                                                              valid=rois.valid, axis_name=axis),
        'fast_rcnn_box_loss': loss_ops.fast_rcnn_box_loss(
            jnp.take_along_axis(box_deltas, rois.classes[:, :, None, None], axis=2)[:, :, 0],
            rois.box_targets, rois.foreground, roi.huber_delta,
            None if roi.box_loss_normalizer == 'foreground' else jnp.sum(rois.valid), axis),
        'mask_loss': loss_ops.safe_divide(mask_loss_sum, loss_ops.mask_loss_normalizer(
            fg.foreground, self.mask.resolution, axis)),
    }
    terms['total_loss'] = (terms['rpn_score_loss'] + rpn.box_loss_weight * terms['rpn_box_loss']
                           + terms['fast_rcnn_class_loss']
                           + roi.box_loss_weight * terms['fast_rcnn_box_loss']
                           + self.mask.loss_weight * terms['mask_loss'])
    terms['num_positive_anchors'] = jnp.sum(anchor_targets.positive, dtype=jnp.int32)
    terms['num_foreground_rois'] = jnp.sum(rois.foreground, dtype=jnp.int32)
    return terms

  def _mask_loss_sum(self, features, gt: GroundTruth, fg, slots: int):
    """The mask loss's numerator (`loss_ops.mask_loss_sum`) over the first ``slots`` foreground
    slots of each image: their mask targets, RoIAlign, mask head and pixel losses."""
    fg = jax.tree_util.tree_map(lambda x: x[:, :slots], fg)
    mask_targets = jax.vmap(functools.partial(
        targets.mask_targets, resolution=self.mask.resolution,
        binarize=self.mask.binarize_targets))(gt, fg.rois, fg.matched)
    mask_logits = self.mask_head(self._pool(features, fg.rois, self.mask.pooler_size))
    return loss_ops.mask_loss_sum(_class_channel(mask_logits, fg.classes), mask_targets,
                                  fg.foreground)

  def _mask_buckets(self) -> tuple[int, ...]:
    """The slot counts the training mask head runs on (one: no conditional)."""
    mode = self.mask.train_slots
    if mode not in ('fixed', 'bucketed'):
      raise ValueError(f"mask.train_slots must be 'fixed' or 'bucketed' here, not {mode!r} "
                       "(build_model resolves 'auto')")
    num_slots = targets.num_mask_rois(self.roi.batch_size_per_image, self.roi.fg_fraction)
    return mask_slot_buckets(num_slots) if mode == 'bucketed' else (num_slots,)

  def _mask_head_loss_sum(self, features, gt: GroundTruth, fg):
    """`_mask_loss_sum` over the foreground slots ``fg`` (B, S), by ``mask.train_slots``.

    'fixed': all S slots (the reference). 'bucketed': the fewest of `mask_slot_buckets` (S)
    slots that hold every image's foreground (sampled foreground first, so the slots past it
    weigh 0 and the sum is the same), chosen at run time by ``nn.switch``: one compiled branch
    per size, the mask head's cost following the batch's foreground count.
    """
    buckets = self._mask_buckets()
    if len(buckets) == 1:
      return self._mask_loss_sum(features, gt, fg, buckets[0])
    need = jnp.max(jnp.sum(fg.foreground, axis=1, dtype=jnp.int32))
    index = jnp.sum(jnp.asarray(buckets[:-1], jnp.int32) < need, dtype=jnp.int32)
    branches = [functools.partial(MaskRCNN._mask_loss_sum, slots=b) for b in buckets]
    return nn.switch(index, branches, self, features, gt, fg)


def mask_slot_buckets(num_slots: int, smallest: int = 16) -> tuple[int, ...]:
  """Slot counts the 'bucketed' mask head may run on: ceil(S / 8), ceil(S / 4), ceil(S / 2) and
  S, none below ``smallest`` (fewer RoIs than that cost little anyway) unless S is: 128 ->
  (16, 32, 64, 128); 32 -> (16, 32); 16 or fewer -> (S,), no conditional."""
  return tuple(sorted({min(num_slots, max(smallest, -(-num_slots // d))) for d in (8, 4, 2, 1)}))


def _image_keys(key, batch: int, batch_axis: str | None):
  """The sampling keys of the batch's images: (rpn_keys, roi_keys), (batch,) keys each.

  batch_axis None: the 2 * batch keys split from ``key`` (this device's batch is the batch).
  A mapped device axis: image i of device d, the global batch's image d * batch + i, gets the two
  keys split from fold_in(key, d * batch + i), whatever the number of devices.
  """
  if batch_axis is None:
    return jnp.split(jax.random.split(key, 2 * batch), 2)
  index = lax.axis_index(batch_axis) * batch + jnp.arange(batch)
  pairs = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i)))(index)
  return pairs[:, 0], pairs[:, 1]


def _class_channel(mask_logits, classes):
  """(B, R, M, M, K) per-class mask logits -> (B, R, M, M) of each RoI's class."""
  return jnp.take_along_axis(mask_logits, classes[:, :, None, None, None], axis=-1)[..., 0]
