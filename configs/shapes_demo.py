"""Mask R-CNN on the synthetic shapes dataset, trained from scratch on a CPU: `make demo`.

A ResNet-18-FPN narrowed for 96x96 images of squares, circles and triangles
(`maskrcnn_jax.data.shapes`, 3 classes + background). Nothing is pretrained, so nothing is
frozen and batch norm trains (``finetune_bn``); anchors start at 16 px (the shapes are 20-56 px
wide at 96 px); fewer proposals and RoIs than COCO needs; a higher learning rate with a short
warmup.
float32: bfloat16 is no faster on CPUs (docs/performance.md: 1.03x for a training step).

Sized for 2 CPU cores and <= 5 minutes end to end (data generation, preparation, compilation,
training, evaluation). The command (what `make demo` runs after generating and preparing the
data; see the Makefile):
  python -m maskrcnn_jax.main --config=configs/shapes_demo.py --workdir=/tmp/shapes_demo/work \
    --config.data.tfds_data_dir=/tmp/shapes_demo/tfds
Measured (2026-12-02, 2 quiet CPU cores, the matmul kernel gradients of maskrcnn_jax/ops/conv.py):
460 steps, box AP 0.672 / mask AP 0.702 (seed 0) and 0.674 / 0.681 (seed 1) on the 200
validation images, 275 and 273 s end to end (the data already generated; generating it adds
about 15 s); README.md has the table and the earlier figures.
"""

import pathlib

from maskrcnn_jax.configs import import_config_module

coco_r50 = import_config_module(pathlib.Path(__file__).resolve().parent / 'coco_r50.py')


def get_config(arg=None):
  config = coco_r50.get_config(arg)
  config.mode = 'train_and_eval'

  data = config.data
  data.tfds_name = 'coco_instances/shapes'
  data.image_size = (96, 96)
  data.max_instances = 8            # the generator draws at most 4 shapes
  data.gt_mask_size = 28
  data.num_workers = 2
  data.prefetch_batches = 2

  model = config.model
  model.num_classes = 4             # background + square, circle, triangle
  model.precision = 'float32'
  model.backbone.depth = 18
  model.backbone.freeze_at = 0      # random init: train everything
  model.backbone.finetune_bn = True
  model.backbone.stop_frozen_gradients = False
  model.min_level = 2
  model.max_level = 5
  model.fpn_channels = 64
  model.anchors.anchor_scale = 4.0  # 16, 32, 64, 128 px at P2..P5
  model.rpn.batch_size_per_image = 128
  model.rpn.train_pre_nms_topk = 512
  model.rpn.train_post_nms_topk = 128
  model.rpn.test_pre_nms_topk = 512
  model.rpn.test_post_nms_topk = 100
  model.roi.batch_size_per_image = 64
  model.roi.fg_fraction = 0.25
  model.roi.mlp_head_dim = 256
  model.roi.canonical_size = 112.0  # half of COCO's 224, as the anchors: 28 px RoIs pool from P2
  model.mask.conv_dim = 64
  model.mask.num_convs = 2
  model.mask.pooler_size = 14
  model.mask.resolution = 28
  model.test.detections_per_image = 20
  model.test.pre_nms_topk = 300

  train = config.train
  train.per_device_batch_size = 8
  train.learning_rate = 0.04
  train.warmup_steps = 100
  train.warmup_learning_rate = 0.0
  train.total_steps = 460           # the most that fits 5 minutes on 2 quiet cores (README)
  train.learning_rate_steps = (345, 414)
  train.learning_rate_decay_factors = (0.1, 0.01)
  train.checkpoint_every_steps = 200
  train.max_checkpoints_to_keep = 2
  train.log_every_steps = 50
  train.gradient_clip_norm = 10.0   # from-scratch warmup safety; the reference has it off

  evaluation = config.eval
  evaluation.per_device_batch_size = 20
  evaluation.num_samples = -1       # the whole validation split (200 images)
  evaluation.every_steps = 400      # once, at the end
  return config
