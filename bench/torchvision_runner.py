"""torchvision's Mask R-CNN R50-FPN as a benchmark runner beside ours (needs torch, torchvision).

`TorchvisionRunner` is a :class:`maskrcnn_jax.train.benchmark.Runner`: the drivers time it in
windows alternated with our step (``extra_runners=``), on the same host batches in the same
order, canvas and per-step image count. `build_torchvision_model` builds
``maskrcnn_resnet50_fpn``'s architecture configured like config.model; `same_architecture` says
whether the comparison is like for like.
"""

from __future__ import annotations

import os
from typing import Any

# Before torch loads libgomp: its OpenMP workers otherwise spin after every parallel region, and
# in a process that alternates torch's windows with XLA's the spinning takes cores from XLA's
# thread pool (512x512 training, 2 cores: ours 8-10% faster and torchvision 2-3% faster with
# PASSIVE; docs/performance.md). A value the user set is kept.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
import torchvision
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import misc as misc_nn_ops

from maskrcnn_jax.train import benchmark


def build_torchvision_model(cfg):
  """torchvision's ``maskrcnn_resnet50_fpn`` architecture with random weights, configured like
  ours: frozen batch norm and conv1 + layer1 frozen (what ``maskrcnn_resnet50_fpn`` builds with
  pretrained weights; with ``weights=None, weights_backbone=None`` it would train every batch
  norm), the reference's proposal counts, no score threshold, no resizing (the transform is
  bypassed: `TorchvisionRunner` calls backbone, rpn and roi_heads on an ImageList)."""
  m = cfg.model
  backbone = resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
  # torchvision counts trainable stages from the top: freeze_at=2 (conv1 + layer1) -> 3.
  backbone = _resnet_fpn_extractor(backbone, min(5, max(0, 5 - int(m.backbone.freeze_at))))
  h, w = cfg.data.image_size
  return MaskRCNN(
      backbone, num_classes=int(m.num_classes), min_size=min(h, w), max_size=max(h, w),
      rpn_pre_nms_top_n_train=int(m.rpn.train_pre_nms_topk),
      rpn_post_nms_top_n_train=int(m.rpn.train_post_nms_topk),
      rpn_pre_nms_top_n_test=int(m.rpn.test_pre_nms_topk),
      rpn_post_nms_top_n_test=int(m.rpn.test_post_nms_topk),
      rpn_nms_thresh=float(m.rpn.test_nms_threshold),
      rpn_batch_size_per_image=int(m.rpn.batch_size_per_image),
      box_batch_size_per_image=int(m.roi.batch_size_per_image),
      box_positive_fraction=float(m.roi.fg_fraction),
      box_score_thresh=float(m.test.score_threshold),
      box_nms_thresh=float(m.test.nms_threshold),
      box_detections_per_img=int(m.test.detections_per_image))


def same_architecture(cfg) -> bool:
  """Whether config.model is the R50-FPN that `build_torchvision_model` builds (else the ratio
  only exercises the code path, as with the tiny test configs)."""
  m = cfg.model
  return (int(m.backbone.depth) == 50 and int(m.fpn_channels) == 256
          and int(m.roi.mlp_head_dim) == 1024 and int(m.mask.conv_dim) == 256
          and int(m.mask.num_convs) == 4 and int(m.min_level) == 2 and int(m.max_level) == 6)


class TorchvisionRunner(benchmark.Runner):
  """torchvision Mask R-CNN on host batches: train mode with an SGD step (momentum 0.9, L2
  1e-4), or eval mode under ``torch.no_grad``. Step i runs on ``host_batches[i % len]`` (ours:
  its ``host_ring``, so both do the same work). Images go in as uint8 NCHW and are normalised
  inside the step, as ours are; ground-truth masks are full-canvas (torchvision's format), filled
  boxes of the same instances."""
  name = 'torchvision'

  def __init__(self, cfg, host_batches, train: bool, threads: int):
    self.cfg, self.train = cfg, train
    torch.set_num_threads(threads)
    self.threads = torch.get_num_threads()
    torch.manual_seed(0)
    self.model = build_torchvision_model(cfg)
    self.model.train(train)
    self.inputs = [self._inputs(b) for b in host_batches]
    self.images_per_step = self.inputs[0][0].shape[0]
    self.mean = torch.tensor(cfg.data.pixel_mean).view(1, 3, 1, 1)
    self.std = torch.tensor(cfg.data.pixel_std).view(1, 3, 1, 1)
    if train:
      params = [p for p in self.model.parameters() if p.requires_grad]
      self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
      self._count_foreground()

  def _inputs(self, host_batch):
    """(uint8 NCHW images, image sizes, targets or None) of one host batch."""
    images = torch.from_numpy(np.ascontiguousarray(
        np.transpose(host_batch['images'], (0, 3, 1, 2))))
    sizes = [tuple(int(v) for v in s) for s in host_batch['image_sizes']]
    if not self.train:
      return images, sizes, None
    h, w = images.shape[2:]
    targets = []
    for b in range(images.shape[0]):
      valid = host_batch['gt_valid'][b] & ~host_batch['gt_is_crowd'][b]
      boxes = host_batch['gt_boxes'][b][valid]
      masks = np.zeros((len(boxes), h, w), np.uint8)
      for i, (x1, y1, x2, y2) in enumerate(np.round(boxes).astype(int)):
        masks[i, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)] = 1
      targets.append({
          'boxes': torch.from_numpy(boxes.astype(np.float32)),
          'labels': torch.from_numpy(host_batch['gt_classes'][b][valid].astype(np.int64)),
          'masks': torch.from_numpy(masks)})
    return images, sizes, targets

  def _count_foreground(self):
    """Records the foreground RoIs sampled per image at each step: torchvision's mask head runs
    on exactly those (ours on a fixed or bucketed number of slots, config.model.mask)."""
    heads = self.model.roi_heads
    sample = heads.select_training_samples
    self.foreground_rois = None

    def counting(*args, **kwargs):
      out = sample(*args, **kwargs)
      labels = out[2]  # (proposals, matched_idxs, labels, regression_targets)
      self.foreground_rois = float(np.mean([int((l > 0).sum()) for l in labels]))
      return out

    heads.select_training_samples = counting

  def _forward(self, i):
    images, sizes, targets = self.inputs[i % len(self.inputs)]
    x = (images.float() / 255.0 - self.mean) / self.std
    image_list = ImageList(x, sizes)
    features = self.model.backbone(image_list.tensors)
    proposals, rpn_losses = self.model.rpn(image_list, features, targets)
    detections, roi_losses = self.model.roi_heads(features, proposals, image_list.image_sizes,
                                                  targets)
    return detections, {**rpn_losses, **roi_losses}

  def step(self, i):
    if self.train:
      self.optimizer.zero_grad(set_to_none=True)
      _, losses = self._forward(i)
      loss = sum(losses.values())
      loss.backward()
      self.optimizer.step()
      return loss.detach()
    with torch.no_grad():
      return self._forward(i)[0]

  def describe(self) -> dict[str, Any]:
    facts = {'torch_version': torch.__version__, 'torchvision_version': torchvision.__version__,
             'threads': self.threads, 'same_architecture': same_architecture(self.cfg)}
    if self.train:
      facts['foreground_rois_per_image'] = self.foreground_rois  # of the last step
    return facts
