"""Mask quality: memorise the six real COCO images of tests/data/coco_sample (ResNet-18, 256^2).

What it is for: a small, reproducible comparison of our mask branch with torchvision's on real
images, with matched heads and schedule (bench/mask_quality.py trains torchvision's Mask R-CNN
with the same settings). The six COCO val2017 images are both the training and the evaluation
set (memorisation: image 89 has no annotations and is only evaluated), so the box and mask APs
measure how well each implementation fits the same few objects, not generalisation.

Settings: 256x256 canvas, no flip, ResNet-18 from random init with frozen batch norm and conv1 +
res2 frozen, 64-channel FPN, 64-wide box MLP, a 2 x 32-channel mask head (14x14 RoIAlign, 28x28
masks), 64 RPN / 64 RoI samples per image, 500 per-level / 200 proposals, batch 4, SGD lr 0.02
(linear warmup from 0 over 20 steps, x0.1 at step 320), 400 steps, gradient clipping at 10.

Commands (prepare once, then train and evaluate; about 3.5 minutes on 2 idle CPU cores):
  python -m maskrcnn_jax.data.prepare --manual_dir tests/data/coco_sample \
    --data_dir /tmp/coco_sample_tfds --no_progress
  python -m maskrcnn_jax.main --config=configs/mask_quality.py --workdir=/tmp/mask_quality \
    --config.data.tfds_data_dir=/tmp/coco_sample_tfds --config.seed=0
The metrics of step 400 are the last line of <workdir>/eval_metrics.jsonl. Several seeds of
both frameworks side by side: bench/mask_quality.py.
"""

import pathlib

from maskrcnn_jax.configs import import_config_module

coco_r50 = import_config_module(pathlib.Path(__file__).resolve().parent / 'coco_r50.py')


def get_config(arg=None):
  config = coco_r50.get_config(arg)
  config.mode = 'train_and_eval'

  data = config.data
  data.train_split = 'validation'   # coco_sample is prepared as the 'validation' split only
  data.eval_split = 'validation'
  data.image_size = (256, 256)
  data.gt_mask_size = 112
  data.max_instances = 32           # coco_sample: at most 16 non-crowd objects per image
  data.augment_hflip = False

  model = config.model
  model.backbone.depth = 18
  model.backbone.finetune_bn = False
  model.backbone.freeze_at = 2
  model.fpn_channels = 64
  model.rpn.batch_size_per_image = 64
  model.rpn.train_pre_nms_topk = 500  # per level
  model.rpn.train_post_nms_topk = 200
  model.rpn.test_pre_nms_topk = 500   # per level
  model.rpn.test_post_nms_topk = 200
  model.roi.batch_size_per_image = 64
  model.roi.fg_fraction = 0.25
  model.roi.mlp_head_dim = 64
  model.mask.num_convs = 2
  model.mask.conv_dim = 32
  model.mask.pooler_size = 14
  model.mask.resolution = 28
  model.test.detections_per_image = 100

  train = config.train
  train.per_device_batch_size = 4     # one CPU device
  train.learning_rate = 0.02
  train.momentum = 0.9
  train.l2_weight_decay = 1e-4
  train.warmup_steps = 20             # linear from warmup_learning_rate to learning_rate
  train.warmup_learning_rate = 0.0
  train.learning_rate_steps = (320,)
  train.learning_rate_decay_factors = (0.1,)
  train.total_steps = 400
  train.gradient_clip_norm = 10.0
  train.checkpoint_every_steps = 400
  train.log_every_steps = 50

  evaluation = config.eval
  evaluation.num_samples = 6
  evaluation.every_steps = 400
  evaluation.per_device_batch_size = 2
  return config
