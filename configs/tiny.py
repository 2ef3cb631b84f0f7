"""A tiny Mask R-CNN for tests: ResNet-18 at 128x128, few proposals and RoIs.

Not meant to learn anything; it exercises every code path in seconds on a CPU:
  python -m maskrcnn_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

import pathlib

from maskrcnn_jax.configs import import_config_module

coco_r50 = import_config_module(pathlib.Path(__file__).resolve().parent / 'coco_r50.py')


def get_config(arg=None):
  config = coco_r50.get_config(arg)
  config.data.image_size = (128, 128)
  config.data.max_instances = 8
  config.data.gt_mask_size = 16
  config.model.backbone.depth = 18
  config.model.fpn_channels = 32
  config.model.rpn.batch_size_per_image = 64
  config.model.rpn.train_pre_nms_topk = 200
  config.model.rpn.train_post_nms_topk = 100
  config.model.rpn.test_pre_nms_topk = 100
  config.model.rpn.test_post_nms_topk = 50
  config.model.roi.batch_size_per_image = 32
  config.model.roi.mlp_head_dim = 64
  config.model.mask.conv_dim = 32
  config.model.mask.num_convs = 2
  config.model.mask.pooler_size = 7
  config.model.mask.resolution = 14
  config.model.test.detections_per_image = 10
  config.train.per_device_batch_size = 2
  config.train.learning_rate = 0.01
  config.train.warmup_steps = 2
  config.train.total_steps = 6
  config.train.learning_rate_steps = (4,)
  config.train.learning_rate_decay_factors = (0.1,)
  config.train.checkpoint_every_steps = 3
  config.train.log_every_steps = 1
  config.eval.per_device_batch_size = 2
  config.eval.num_samples = 6
  config.eval.every_steps = 3
  return config
