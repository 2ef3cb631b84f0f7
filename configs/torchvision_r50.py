"""torchvision's ``maskrcnn_resnet50_fpn`` architecture and inference settings, as an overlay of
coco_r50, so that torchvision's published COCO weights (37.9 box AP / 34.6 mask AP with its own
resizing to 800 x 1333) can be imported and evaluated here:

  python -m maskrcnn_jax.main --config=configs/torchvision_r50.py --workdir=/tmp/tv \
    --config.mode=eval
with the weights converted by ``maskrcnn_jax.weights.from_torchvision`` (a ``.pth``, ``.npz`` or
``.safetensors`` file read by ``maskrcnn_jax.weights.load_state_dict``; nothing is downloaded).

What differs from the reference (coco_r50):
* anchors: torchvision's ``AnchorGenerator`` (sizes 32..512, h/w ratios 0.5/1/2, centres at
  offset 0, rounded half extents);
* RPN: test pre/post-NMS top-k 1000/1000 (pre per level), NMS 0.7, min box size 1e-3;
* box head: score threshold 0.05 (strictly greater), detections narrower or shorter than 1e-2
  dropped, per-class NMS 0.5, 100 per image;
* RoIAlign: ``aligned=False``, 2 samples per bin, level mapper ``floor(4 + log2(sqrt(area) / 224)
  + 1e-6)``;
* frozen batch norm epsilon 1e-5 (``FrozenBatchNorm2d``); 91 classes (COCO category ids).
The low-quality matches are torchvision's (every anchor tying for a ground truth's best IoU is
positive); the other training-time settings (RPN train top-k 2000/2000 per image in torchvision,
the loss normalisations, etc.) are left at the reference's values: this overlay is for inference
with imported weights. torchvision's losses are options: ``rpn.box_loss_normalizer='sampled'``
and ``roi.box_loss_normalizer='sampled'`` with ``huber_delta=1/9`` and ``box_loss_weight=9``.
"""

import pathlib

from maskrcnn_jax.configs import import_config_module

coco_r50 = import_config_module(pathlib.Path(__file__).resolve().parent / 'coco_r50.py')


def get_config(arg=None):
  config = coco_r50.get_config(arg)
  model = config.model
  model.num_classes = 91
  model.backbone.depth = 50
  model.backbone.bn_epsilon = 1e-5
  model.backbone.freeze_at = 2          # torchvision's trainable_backbone_layers=3
  model.anchors.convention = 'torchvision'
  model.anchors.sizes = (32, 64, 128, 256, 512)
  model.anchors.aspect_ratios = (0.5, 1.0, 2.0)
  model.anchors.offset = 0.0
  model.anchors.round_half_extents = True
  model.rpn.test_pre_nms_topk = 1000
  model.rpn.test_post_nms_topk = 1000
  model.rpn.test_nms_threshold = 0.7
  model.rpn.min_size = 1e-3
  model.rpn.low_quality_ties = True     # torchvision's Matcher (training only)
  model.roi.aligned = False
  model.roi.sampling_ratio = 2
  model.roi.level_mapping_eps = 1e-6
  model.test.score_threshold = 0.05
  model.test.min_box_size = 1e-2
  model.test.nms_threshold = 0.5
  model.test.detections_per_image = 100
  return config
