"""Mask quality: our Mask R-CNN vs torchvision's, memorising tests/data/coco_sample, over seeds.

Both frameworks train from random init on the six real COCO val2017 images of
tests/data/coco_sample (five have non-crowd objects and are trained on; image 89 has none) with
matched heads and schedule (configs/mask_quality.py), then evaluate box and mask AP on the same six
images with pycocotools against tests/data/coco_sample/annotations/instances_val2017.json. The
images are both the training and the evaluation set: the APs say how well each implementation
fits the same few objects (memorisation), which separates the training recipe and the heads
from generalisation. Several seeds per framework, mean and sample std, the difference of the means.

Commands (from the repository root; $TORCH_VENV is a virtual environment with torch,
torchvision, numpy, pillow and pycocotools, e.g. made with
``python3.11 -m venv $TORCH_VENV && $TORCH_VENV/bin/pip install torch torchvision numpy pillow
pycocotools``; our side runs in a subprocess with the repository's .venv):
  $TORCH_VENV/bin/python bench/mask_quality.py --steps 20 --seeds 0          # smoke, ~1 minute
  $TORCH_VENV/bin/python bench/mask_quality.py --seeds 0,1,2 \
    --output /tmp/mask_quality.json 2>&1 | tee /tmp/mask_quality.log       # the comparison
  $TORCH_VENV/bin/python bench/mask_quality.py --frameworks ours ...         # one side only
On 2 otherwise idle CPU cores a 400-step run takes about 3.5 minutes (ours, compilation and
evaluation included) and 2.5 minutes (torchvision, ~0.35 s/step), the full 3 + 3 seeds about 20
minutes. torchvision's 2 OpenMP threads degrade badly when another job shares the cores (3.7-7
s/step measured). ``--ours_python`` (default .venv/bin/python) is the
interpreter of our side; ``--workdir`` keeps the workdirs (default a temporary directory) and
the trained torchvision weights; ``--ours_override KEY=VALUE`` (repeatable) adds a config override
to our side (an ablation, e.g. ``--ours_override model.rpn.low_quality_ties=True``).

Checking the evaluation path: torchvision's trained weights (W/torchvision_seed0.npz, kept by
``--workdir W``) evaluated by our inference and evaluator, with torchvision's architecture
settings (configs/torchvision_r50.py's anchors, RPN min size, level mapping, BN epsilon, box
size filter):
  .venv/bin/python -m maskrcnn_jax.main --config=configs/mask_quality.py --workdir=/tmp/tv_eval \
    --config.mode=eval --config.data.tfds_data_dir=W/tfds \
    --config.init.torchvision_maskrcnn=W/torchvision_seed0.npz \
    --config.model.anchors.convention=torchvision \
    '--config.model.anchors.aspect_ratios=(0.5,1.0,2.0)' \
    --config.model.anchors.offset=0.0 --config.model.anchors.round_half_extents=True \
    --config.model.rpn.min_size=0.001 --config.model.roi.level_mapping_eps=0.000001 \
    --config.model.backbone.bn_epsilon=0.00001 --config.model.test.min_box_size=0.01
gives the APs torchvision's own evaluation gives with ``--torch_resize ours`` (measured 0.501 box
/ 0.301 mask against 0.504 / 0.297, seed 0).

Our side, per seed s (W_s = <workdir>/ours_seed<s>; D = <workdir>/tfds, prepared once):
  .venv/bin/python -m maskrcnn_jax.data.prepare --manual_dir tests/data/coco_sample \
    --data_dir D --no_progress
  .venv/bin/python -m maskrcnn_jax.main --config=configs/mask_quality.py --workdir=W_s \
    --config.seed=s --config.data.tfds_data_dir=D --config.mode=train_and_eval \
    --config.train.total_steps=N --config.train.warmup_steps=round(0.05 N) \
    --config.train.learning_rate_steps='(int(0.8 N),)' --config.eval.every_steps=N \
    --config.train.checkpoint_every_steps=N
and the metrics are the last line of W_s/eval_metrics.jsonl. As a check of the evaluation, our
detections (W_s/coco_results_step<N>.json) are also scored by this script's own COCOeval (the one
the torchvision side uses): 'crosscheck_max_abs_diff' in the output should be ~0.

torchvision side, per seed s: ``torch.manual_seed(s)``, then
``torchvision.models.detection.MaskRCNN`` with a random-init ResNet-18 FPN backbone (FrozenBatchNorm2d,
conv1 + layer1 frozen = trainable_layers 3, FPN 64 channels with the max-pool P6), box head
TwoMLPHead(64*7*7, 64) + FastRCNNPredictor(64, 91), mask head MaskRCNNHeads(64, [32, 32], 1) +
MaskRCNNPredictor(32, 32, 91) on a 14x14 MultiScaleRoIAlign (sampling 2), 91 classes (COCO
category ids as labels, as ours), min_size = max_size = 256, ImageNet mean/std, RPN 64 samples per
image, 500 per-level / 200 proposals in training and test, 64 RoIs per image with 25%
foreground, no score threshold, 100 detections per image.

Matched settings (N = --steps, 400 by default):
* data: the same five trainable images in the same batches: batch 4, each epoch a permutation of
  the trainable images (sorted by image id, as our records are) drawn from
  ``np.random.default_rng([s, 0, epoch])`` -- exactly our sampler's batches; no flip; crowd
  objects skipped in training. Each image is resized to fit 256x256 (the same scale,
  min(256/h, 256/w), on both sides) with the same resize (``--torch_resize``, below).
* optimisation: SGD momentum 0.9, lr 0.02, weight decay 1e-4, linear warmup lr * step / warmup
  from 0 (step 0 has lr 0, as ours; not torchvision's LinearLR start factor 0.001) over
  round(0.05 N) steps (20), x0.1 from step int(0.8 N) (320), global gradient-norm clipping at 10,
  N updates. ``torch.set_num_threads(2)``.
* evaluation: the six images at their original size, masks pasted at the original size and
  thresholded at >= 0.5 (as ours), RLE with pycocotools.mask.encode, boxes clipped to the image
  and rounded as ours; pycocotools COCOeval bbox and segm over the six image ids with the
  ground-truth annotation ids renumbered 1..n (as ours does; pycocotools ignores a matched id 0).
  Our evaluator rebuilds the ground truth from the prepared records (float32 normalised boxes,
  the same RLE masks, areas and crowd flags; coco_sample has no clipped or dropped objects), this
  script reads the JSON: the same ground truth up to float32 rounding of the boxes.

Known differences of the two recipes (not matched):
* anchors: ours the reference's, size 8 * stride (32..512 on P2..P6) with (x, y) scales (1, 1),
  (1.4, 0.7), (0.7, 1.4) and centre offset 0.5; torchvision's defaults, sizes 32..512 with h/w
  ratios 0.5, 1, 2 (areas preserved), offset 0, rounded half extents.
* box coder: both RPN (1, 1, 1, 1) and RoI (10, 10, 5, 5); ours the reference's encoding
  (no +1, centre offsets), torchvision's BoxCoder with its log-clamp of dw/dh.
* losses (sum of the five terms, unit weights, on both sides): ours the reference's -- RPN
  objectness sigmoid CE summed / (batch * 64); RPN box TF Huber (delta 1/9, which is 1/9 of
  smooth-L1 with beta 1/9) on the positive anchors, sum / (4 * positives) per level, summed over
  the levels; box-head class CE mean over the RoI slots; box-head box Huber delta 1 on the
  foreground, sum / (4 * foreground RoIs); mask sigmoid CE mean over the foreground RoIs' 28x28
  cells. torchvision: objectness BCE mean over the sampled anchors; RPN box smooth-L1 (beta 1/9)
  summed / sampled anchors of the batch; class CE mean over the sampled RoIs; box-head box
  smooth-L1 (beta 1/9) summed / sampled RoIs (not foreground); mask BCE mean over the positive
  RoIs' cells.
* mask targets: ours crops each GT mask to its box at the original resolution, resizes it
  bilinearly to 112x112 (+2 margin), samples the 28x28 targets of each RoI bilinearly from that
  crop and binarises them at 0.5 (the reference); torchvision resizes the full GT masks with
  nearest-neighbour interpolation to the input scale (~256) and RoIAligns soft (unthresholded)
  28x28 targets from those (aligned=False, adaptive sampling).
* image resize: matched by default (``--torch_resize ours``): the torch side resizes with our
  pipeline's PIL bilinear (antialiased when downscaling) on the uint8 image with rounded sizes,
  so both sides see the same pixels; the targets are resized as torchvision does (boxes per
  axis, masks nearest). ``--torch_resize torchvision`` keeps torchvision's own F.interpolate
  (bilinear without antialias, floored sizes). This matters on these images: the same trained
  torchvision weights score 0.600 box / 0.396 mask AP with the resize they were trained with and
  0.504 / 0.297 with ours.
* weight decay and biases: ours (the reference) decays only conv/dense kernels, adds the decay to
  the gradient before clipping, and multiplies bias gradients by 2 (after clipping);
  torchvision's recipe (the default here) decays every trainable parameter inside SGD, after the
  clipping, and treats biases as weights. ``--torch_optimizer reference`` uses our rules on the
  torch side instead (an ablation). Frozen batch norm has no parameters on either side.
* batch norm epsilon: ours 1e-4 (the reference), torchvision's FrozenBatchNorm2d 1e-5; with random
  init (mean 0, var 1, scale 1, bias 0) both are ~identity.
* RoIAlign: ours the reference's (aligned=False); torchvision's MultiScaleRoIAlign aligned=False
  with its own level mapping (eps 1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COCO_SAMPLE = REPO_ROOT / 'tests' / 'data' / 'coco_sample'
ANNOTATIONS = COCO_SAMPLE / 'annotations' / 'instances_val2017.json'
IMAGE_DIR = COCO_SAMPLE / 'val2017'
CONFIG = REPO_ROOT / 'configs' / 'mask_quality.py'

STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm',
              'ARl')
METRIC_KEYS = tuple(f'{t}/{s}' for t in ('bbox', 'segm') for s in STAT_NAMES)
TABLE_KEYS = (('box AP', 'bbox/AP'), ('box AP50', 'bbox/AP50'), ('mask AP', 'segm/AP'),
              ('mask AP50', 'segm/AP50'), ('mask APs', 'segm/APs'))

# configs/mask_quality.py, mirrored on the torchvision side.
BATCH_SIZE = 4
CANVAS = 256
NUM_CLASSES = 91
LEARNING_RATE = 0.02
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
DECAY_FACTOR = 0.1
CLIP_NORM = 10.0
BIAS_GRAD_MULTIPLIER = 2.0
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------ shared
def schedule(steps: int) -> dict[str, int]:
  """The schedule of an N-step run: 400 steps -> warmup 20, decay at 320 (configs/mask_quality)."""
  return {'total_steps': steps, 'warmup_steps': int(round(0.05 * steps)),
          'decay_step': int(0.8 * steps)}


def learning_rate(step: int, sched: dict[str, int]) -> float:
  """Ours (maskrcnn_jax.train.optimizer.learning_rate_schedule) at update count `step`."""
  if step < sched['warmup_steps']:
    return LEARNING_RATE * step / sched['warmup_steps']
  return LEARNING_RATE * (DECAY_FACTOR if step >= sched['decay_step'] else 1.0)


def load_ground_truth() -> dict[str, Any]:
  with open(ANNOTATIONS) as f:
    return json.load(f)


def trainable_image_ids(gt: dict[str, Any]) -> list[int]:
  """Image ids with at least one non-crowd object, ascending (our trainable records' order)."""
  with_objects = {a['image_id'] for a in gt['annotations'] if not a.get('iscrowd', 0)}
  return sorted(i['id'] for i in gt['images'] if i['id'] in with_objects)


def batch_image_ids(ids: Sequence[int], seed: int, step: int, batch_size: int = BATCH_SIZE,
                    _cache: dict | None = None) -> list[int]:
  """The images of training step `step`: our `pipeline.TrainSampler` (position q = step * B + j
  is image perm_e[q mod n] of epoch e = q // n, perm_e from default_rng([seed, 0, e]))."""
  cache = {} if _cache is None else _cache
  out = []
  for j in range(batch_size):
    epoch, offset = divmod(step * batch_size + j, len(ids))
    if epoch not in cache:
      cache[epoch] = np.random.default_rng([seed, 0, epoch]).permutation(len(ids))
    out.append(int(ids[int(cache[epoch][offset])]))
  return out


def coco_eval(gt: dict[str, Any], results: list[dict[str, Any]], image_ids: Sequence[int]
              ) -> dict[str, float]:
  """COCOeval bbox and segm as ours (maskrcnn_jax.evaluation.coco.coco_metrics): annotation ids
  renumbered 1..n, imgIds = image_ids, the 12 stats of each named 'bbox/AP' ... 'segm/ARl'."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import copy  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  if not results:
    return {k: 0.0 for k in METRIC_KEYS}
  dataset = copy.deepcopy(gt)
  for i, ann in enumerate(dataset['annotations']):
    ann['id'] = i + 1
  out = {}
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = dataset
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes([dict(r) for r in results])
    for iou_type in ('bbox', 'segm'):
      evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
      evaluator.params.imgIds = sorted(int(i) for i in image_ids)
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
      out.update({f'{iou_type}/{n}': float(v) for n, v in zip(STAT_NAMES, evaluator.stats)})
  return out


def log(msg: str) -> None:
  print(msg, flush=True)


# ------------------------------------------------------------------------------ ours
def prepare_data(ours_python: str, data_dir: str) -> None:
  cmd = [ours_python, '-m', 'maskrcnn_jax.data.prepare', '--manual_dir', str(COCO_SAMPLE),
         '--data_dir', data_dir, '--no_progress']
  log('preparing coco_sample: ' + ' '.join(cmd))
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
  if proc.returncode:
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise RuntimeError(f'data preparation failed (exit {proc.returncode})')


def run_ours(seed: int, sched: dict[str, int], ours_python: str, data_dir: str, workdir: str,
             gt: dict[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Trains and evaluates our side of one seed; `overrides` are extra ``--config.KEY=VALUE``
  flags (after the schedule's)."""
  steps = sched['total_steps']
  if os.path.exists(workdir):  # a fresh run, not a resumed one
    shutil.rmtree(workdir)
  os.makedirs(workdir)
  cmd = [ours_python, '-m', 'maskrcnn_jax.main', f'--config={CONFIG}', f'--workdir={workdir}',
         f'--config.seed={seed}', f'--config.data.tfds_data_dir={data_dir}',
         '--config.mode=train_and_eval', f'--config.train.total_steps={steps}',
         f'--config.train.warmup_steps={sched["warmup_steps"]}',
         f'--config.train.learning_rate_steps=({sched["decay_step"]},)',
         f'--config.eval.every_steps={steps}', f'--config.train.checkpoint_every_steps={steps}',
         *overrides]
  log(f'[ours seed {seed}] ' + ' '.join(cmd))
  start = time.time()
  with open(os.path.join(workdir, 'ours.log'), 'w') as f:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT)
  wall = time.time() - start
  if proc.returncode:
    raise RuntimeError(f'ours seed {seed} failed (exit {proc.returncode}); see '
                       f'{workdir}/ours.log')
  with open(os.path.join(workdir, 'eval_metrics.jsonl')) as f:
    last = json.loads([line for line in f if line.strip()][-1])
  if int(last['step']) != steps:
    raise RuntimeError(f'ours seed {seed}: last evaluation at step {last["step"]}, not {steps}')
  out = {k: float(last[k]) for k in METRIC_KEYS}
  out['wall_s'] = wall
  # Our detections scored by this script's COCOeval (the torchvision side's): should agree.
  with open(os.path.join(workdir, f'coco_results_step{steps}.json')) as f:
    results = json.load(f)
  check = coco_eval(gt, results, [im['id'] for im in gt['images']])
  out['crosscheck_max_abs_diff'] = max(abs(check[k] - out[k]) for k in METRIC_KEYS)
  out['num_detections'] = len(results)
  log(f'[ours seed {seed}] {wall:.0f} s: box AP {out["bbox/AP"]:.4f}, mask AP '
      f'{out["segm/AP"]:.4f} (crosscheck max |diff| {out["crosscheck_max_abs_diff"]:.1e})')
  return out


# ------------------------------------------------------------------------------ torchvision
def build_torchvision_model():
  """torchvision's MaskRCNN with the heads of configs/mask_quality.py (random init)."""
  from torchvision.models import resnet18  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection import MaskRCNN  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection.backbone_utils import BackboneWithFPN  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor  # pylint: disable=g-import-not-at-top
  from torchvision.ops import MultiScaleRoIAlign  # pylint: disable=g-import-not-at-top
  from torchvision.ops import misc as misc_nn_ops  # pylint: disable=g-import-not-at-top
  from torchvision.ops.feature_pyramid_network import LastLevelMaxPool  # pylint: disable=g-import-not-at-top

  body = resnet18(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
  # backbone_utils._resnet_fpn_extractor(body, trainable_layers=3), whose FPN width is fixed at
  # 256: conv1 and layer1 frozen, layer2..4 trained.
  trainable = ('layer4', 'layer3', 'layer2')
  for name, parameter in body.named_parameters():
    if not name.startswith(trainable):
      parameter.requires_grad_(False)
  backbone = BackboneWithFPN(body, {f'layer{k}': str(k - 1) for k in (1, 2, 3, 4)},
                             [64, 128, 256, 512], 64, extra_blocks=LastLevelMaxPool())
  fpn = 64
  model = MaskRCNN(
      backbone, num_classes=None, min_size=CANVAS, max_size=CANVAS,
      image_mean=list(PIXEL_MEAN), image_std=list(PIXEL_STD),
      rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=200,
      rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=200,
      rpn_batch_size_per_image=64,
      box_head=TwoMLPHead(fpn * 7 * 7, 64), box_predictor=FastRCNNPredictor(64, NUM_CLASSES),
      box_batch_size_per_image=64, box_positive_fraction=0.25, box_score_thresh=0.0,
      box_detections_per_img=100,
      mask_roi_pool=MultiScaleRoIAlign(['0', '1', '2', '3'], 14, 2),
      mask_head=MaskRCNNHeads(fpn, [32, 32], 1),
      mask_predictor=MaskRCNNPredictor(32, 32, NUM_CLASSES))
  return model


def load_torch_examples(gt: dict[str, Any]):
  """{image_id: (image float CHW in [0, 1] at original size, training target)}; the target
  holds the non-crowd objects: boxes xyxy from the COCO bbox, labels = category ids, masks from
  pycocotools' annToMask at the original resolution."""
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  import contextlib, io  # pylint: disable=g-import-not-at-top,multiple-imports
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
  examples = {}
  for info in gt['images']:
    image = np.asarray(Image.open(IMAGE_DIR / info['file_name']).convert('RGB'))
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0
    anns = sorted((a for a in coco.imgToAnns[info['id']] if not a.get('iscrowd', 0)),
                  key=lambda a: a['id'])
    boxes = [[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2],
              a['bbox'][1] + a['bbox'][3]] for a in anns]
    target = {
        'boxes': torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        'labels': torch.tensor([a['category_id'] for a in anns], dtype=torch.int64),
        'masks': torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])
                                  if anns else np.zeros((0,) + image.shape[:2], np.uint8)),
    }
    examples[info['id']] = (tensor, target)
  return examples


def use_our_resize(model) -> None:
  """Makes torchvision's transform resize images as our input pipeline does (PIL bilinear,
  antialiased when downscaling, on the uint8 image, sizes rounded; `maskrcnn_jax.data.preprocess`)
  instead of ``F.interpolate`` (bilinear without antialias, on the normalised float image); the
  targets are resized as torchvision does (boxes scaled per axis, masks nearest). The transform
  normalises before resizing, so the normalisation is undone around the PIL resize. With the same
  input pixels on both sides the comparison is of the models and their training only."""
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  mean = torch.tensor(PIXEL_MEAN)[:, None, None]
  std = torch.tensor(PIXEL_STD)[:, None, None]

  def resize(image, target=None):
    h, w = image.shape[-2:]
    scale = min(CANVAS / h, CANVAS / w)  # preprocess.resize_scale
    new_h = min(CANVAS, max(1, int(round(h * scale))))
    new_w = min(CANVAS, max(1, int(round(w * scale))))
    pixels = ((image * std + mean).permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255)
    pixels = np.asarray(Image.fromarray(pixels.astype(np.uint8)).resize((new_w, new_h),
                                                                         Image.BILINEAR))
    image = (torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1) - mean) / std
    if target is not None:
      target = dict(target)
      ratio = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=torch.float32)
      target['boxes'] = target['boxes'] * ratio
      if 'masks' in target:
        masks = target['masks'][:, None].float()
        target['masks'] = torch.nn.functional.interpolate(masks, size=(new_h, new_w))[:, 0].byte()
    return image, target

  model.transform.resize = resize


def run_torchvision(seed: int, sched: dict[str, int], gt: dict[str, Any], threads: int,
                    optimizer_rules: str, weights_path: str = '',
                    resize: str = 'ours') -> dict[str, Any]:
  """Trains and evaluates torchvision's side of one seed; `weights_path` (optional) receives
  the trained state_dict (loadable by ours: ``--config.init.torchvision_maskrcnn``)."""
  import torch  # pylint: disable=g-import-not-at-top
  from pycocotools import mask as mask_util  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  start = time.time()
  model = build_torchvision_model()
  if resize == 'ours':
    use_our_resize(model)
  examples = load_torch_examples(gt)
  ids = trainable_image_ids(gt)
  params = [p for p in model.parameters() if p.requires_grad]
  if optimizer_rules == 'torchvision':
    groups = [{'params': params, 'weight_decay': WEIGHT_DECAY, 'lr_mult': 1.0}]
  else:  # ours: decay on weights only (added before clipping, below), bias gradients x2
    groups = [{'params': [p for p in params if p.ndim > 1], 'weight_decay': 0.0, 'lr_mult': 1.0},
              {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0,
               'lr_mult': BIAS_GRAD_MULTIPLIER}]
  optimizer = torch.optim.SGD(groups, lr=0.0, momentum=MOMENTUM)
  model.train()
  perms = {}
  train_start = time.time()
  window_start, window_loss = time.time(), []
  for step in range(sched['total_steps']):
    lr = learning_rate(step, sched)
    for group in optimizer.param_groups:
      group['lr'] = lr * group['lr_mult']
    batch = [examples[i] for i in batch_image_ids(ids, seed, step, _cache=perms)]
    losses = model([b[0] for b in batch], [{k: v.clone() for k, v in b[1].items()}
                                           for b in batch])
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if optimizer_rules != 'torchvision':
      with torch.no_grad():
        for p in optimizer.param_groups[0]['params']:
          if p.grad is not None:
            p.grad.add_(p, alpha=WEIGHT_DECAY)
    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    optimizer.step()
    window_loss.append(loss.item())
    if (step + 1) % 50 == 0 or step + 1 == sched['total_steps']:
      seconds = (time.time() - window_start) / len(window_loss)
      parts = ', '.join(f'{k} {v.item():.3f}' for k, v in losses.items())
      log(f'[torchvision seed {seed}] step {step + 1}: loss {np.mean(window_loss):.3f} '
          f'({parts}), lr {lr:.4g}, {seconds:.2f} s/step')
      window_start, window_loss = time.time(), []
  train_s = time.time() - train_start
  if weights_path:  # .pt for torch, .npz for our side (--config.init.torchvision_maskrcnn)
    torch.save(model.state_dict(), weights_path)
    np.savez(os.path.splitext(weights_path)[0] + '.npz',
             **{k: v.numpy() for k, v in model.state_dict().items()})

  eval_start = time.time()
  model.eval()
  results = []
  with torch.no_grad():
    for info in gt['images']:
      h, w = info['height'], info['width']
      out = model([examples[info['id']][0]])[0]
      boxes = out['boxes'].numpy().astype(np.float64)
      boxes = np.clip(boxes, 0.0, [w, h, w, h])
      masks = (out['masks'][:, 0].numpy() >= 0.5).astype(np.uint8)  # (N, h, w) at original size
      rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(boxes) else []
      for k in range(len(boxes)):
        x0, y0, x1, y1 = boxes[k]
        results.append({
            'image_id': int(info['id']), 'category_id': int(out['labels'][k]),
            'bbox': [round(float(x0), 3), round(float(y0), 3), round(float(x1 - x0), 3),
                     round(float(y1 - y0), 3)],
            'score': round(float(out['scores'][k]), 5),
            'segmentation': {'size': [int(s) for s in rles[k]['size']],
                             'counts': rles[k]['counts'].decode('ascii')}})
  metrics = coco_eval(gt, results, [im['id'] for im in gt['images']])
  eval_s = time.time() - eval_start
  out = dict(metrics)
  out.update({'wall_s': time.time() - start, 'train_s': train_s,
              's_per_step': train_s / sched['total_steps'], 'eval_s': eval_s,
              'num_detections': len(results), 'threads': torch.get_num_threads()})
  log(f'[torchvision seed {seed}] {out["wall_s"]:.0f} s ({out["s_per_step"]:.2f} s/step, eval '
      f'{eval_s:.0f} s): box AP {out["bbox/AP"]:.4f}, mask AP {out["segm/AP"]:.4f}')
  return out


# ------------------------------------------------------------------------------ summary
def summarise(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
  """Mean and sample std over seeds of every metric, and ours - torchvision of the means."""
  summary = {}
  for framework, by_seed in runs.items():
    if not by_seed:
      continue
    summary[framework] = {}
    for key in METRIC_KEYS:
      values = [r[key] for r in by_seed.values()]
      summary[framework][key] = {
          'mean': statistics.fmean(values),
          'std': statistics.stdev(values) if len(values) > 1 else float('nan'),
          'n': len(values)}
  if summary.get('ours') and summary.get('torchvision'):
    summary['difference_of_means'] = {
        key: summary['ours'][key]['mean'] - summary['torchvision'][key]['mean']
        for key in METRIC_KEYS}
  return summary


def format_tables(runs: dict[str, dict[str, dict[str, Any]]], summary: dict[str, Any]) -> str:
  lines = []
  header = f'{"seed":>6} ' + ' '.join(f'{name:>9}' for name, _ in TABLE_KEYS) + f' {"wall s":>8}'
  for framework, by_seed in runs.items():
    if not by_seed:
      continue
    lines += ['', f'== {framework}', header]
    for seed, r in sorted(by_seed.items(), key=lambda kv: int(kv[0])):
      lines.append(f'{seed:>6} ' + ' '.join(f'{r[k]:9.4f}' for _, k in TABLE_KEYS)
                   + f' {r["wall_s"]:8.0f}')
    for stat in ('mean', 'std'):
      lines.append(f'{stat:>6} ' + ' '.join(
          f'{summary[framework][k][stat]:9.4f}' for _, k in TABLE_KEYS))
  if 'difference_of_means' in summary:
    diff = summary['difference_of_means']
    lines += ['', 'ours - torchvision (difference of means): '
              + ', '.join(f'{name} {diff[k]:+.4f}' for name, k in TABLE_KEYS)]
  return '\n'.join(lines)


def git_revision() -> str:
  try:
    rev = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                           cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    return rev + (' (with uncommitted changes to tracked files)' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated seeds')
  parser.add_argument('--frameworks', default='ours,torchvision',
                      help='comma-separated: ours, torchvision')
  parser.add_argument('--steps', type=int, default=400,
                      help='training steps of both sides (warmup 5%%, decay at 80%%)')
  parser.add_argument('--output', default='results.json', help='results JSON (rewritten after '
                      'every run)')
  parser.add_argument('--workdir', default='', help='workdirs and prepared data (default: a '
                      'temporary directory, removed at the end); it also keeps the trained '
                      'torchvision weights, torchvision_seed<s>.pt and .npz')
  parser.add_argument('--ours_python', default=str(REPO_ROOT / '.venv' / 'bin' / 'python'),
                      help='the interpreter of our side (default: the repository .venv)')
  parser.add_argument('--data_dir', default='', help='an already prepared coco_sample TFDS '
                      'data_dir (default: prepare one under the workdir)')
  parser.add_argument('--ours_override', action='append', default=[], metavar='KEY=VALUE',
                      help='an extra --config.KEY=VALUE of our side (repeatable), e.g. '
                      "model.anchors.offset=0.0")
  parser.add_argument('--torch_resize', choices=('ours', 'torchvision'), default='ours',
                      help="the torch side's image resize: ours (PIL bilinear on uint8, the "
                      "same input pixels as our side) or torchvision's F.interpolate")
  parser.add_argument('--torch_threads', type=int, default=2)
  parser.add_argument('--torch_optimizer', choices=('torchvision', 'reference'),
                      default='torchvision', help='weight decay / bias rules on the torch side')
  args = parser.parse_args(argv)

  seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  frameworks = [f.strip() for f in args.frameworks.split(',') if f.strip()]
  unknown = set(frameworks) - {'ours', 'torchvision'}
  if unknown:
    parser.error(f'unknown frameworks: {sorted(unknown)}')
  if args.steps < 2:
    parser.error('--steps must be >= 2')
  sched = schedule(args.steps)
  gt = load_ground_truth()

  temporary = not args.workdir
  workdir = tempfile.mkdtemp(prefix='mask_quality_') if temporary else args.workdir
  os.makedirs(workdir, exist_ok=True)
  record: dict[str, Any] = {
      'command': [sys.executable] + sys.argv, 'git_revision': git_revision(),
      'config': str(CONFIG.relative_to(REPO_ROOT)), 'schedule': sched, 'seeds': seeds,
      'frameworks': frameworks, 'torch_optimizer': args.torch_optimizer,
      'torch_resize': args.torch_resize,
      'ours_overrides': args.ours_override,
      'trainable_image_ids': trainable_image_ids(gt),
      'runs': {f: {} for f in frameworks}}
  if 'torchvision' in frameworks:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
    record['versions'] = {'torch': torch.__version__, 'torchvision': torchvision.__version__}

  def save():
    record['summary'] = summarise(record['runs'])
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + '.tmp', 'w') as f:
      json.dump(record, f, indent=1)
    os.replace(args.output + '.tmp', args.output)

  log(f'schedule {sched}, seeds {seeds}, frameworks {frameworks}, workdir {workdir}')
  try:
    data_dir = args.data_dir
    if 'ours' in frameworks and not data_dir:
      data_dir = os.path.join(workdir, 'tfds')
      prepare_data(args.ours_python, data_dir)
    for seed in seeds:  # seed-major: the two sides alternate, sharing any load on the machine
      for framework in frameworks:
        if framework == 'ours':
          result = run_ours(seed, sched, args.ours_python, data_dir,
                            os.path.join(workdir, f'ours_seed{seed}'), gt,
                            [f'--config.{o}' for o in args.ours_override])
        else:
          weights_path = ('' if temporary else
                          os.path.join(workdir, f'torchvision_seed{seed}.pt'))
          result = run_torchvision(seed, sched, gt, args.torch_threads, args.torch_optimizer,
                                   weights_path, args.torch_resize)
        record['runs'][framework][str(seed)] = result
        save()
  finally:
    if temporary:
      shutil.rmtree(workdir, ignore_errors=True)
  save()
  log(format_tables(record['runs'], record['summary']))
  log(f'\nresults: {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
