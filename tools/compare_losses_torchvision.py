"""Our training losses against torchvision's at the same weights, image by image (coco_sample).

Given torchvision Mask R-CNN weights with the heads of configs/mask_quality.py (for example the
``torchvision_seed0.pt`` that ``bench/mask_quality.py --workdir W`` keeps), both sides compute
their five training losses on the same canvas images and ground truth: our side runs
configs/mask_quality.py with torchvision's architecture settings and torchvision's loss options
(its anchors, ``'sampled'`` box-loss normalisers with Huber 1/9 x 9, soft mask targets,
``low_quality_ties=True``), one image at a time, averaged over ``--keys`` sampling keys; the torch
side feeds torchvision's model the same uint8 canvas image (its resize is then the identity),
the same boxes and classes, and masks resized from the full-resolution annotations to the canvas
(nearest, as torchvision's transform does), averaged over as many ``torch.manual_seed``s. A ratio
far from 1 points at a target or normalisation that differs. What remains by construction: the
RPN box loss where a low-quality anchor's argmax ground truth differs from the one that claimed it
(ours matches it to the claiming one, as the reference; torchvision keeps the argmax), and the
mask targets (ours from 112x112 crops of the full-resolution masks, torchvision from the canvas
masks).

  $TORCH_VENV/bin/python tools/compare_losses_torchvision.py --weights W/torchvision_seed0.pt \
    --data_dir W/tfds [--keys 16]

$TORCH_VENV as in bench/mask_quality.py; our side runs in a subprocess with ``--ours_python``
(default .venv/bin/python). About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
# (our key, torchvision's key, our weight to torchvision's scale: Huber 1/9 = smooth-L1 / 9)
PAIRS = (('rpn_score_loss', 'loss_objectness', 1.0), ('rpn_box_loss', 'loss_rpn_box_reg', 9.0),
         ('fast_rcnn_class_loss', 'loss_classifier', 1.0),
         ('fast_rcnn_box_loss', 'loss_box_reg', 9.0), ('mask_loss', 'loss_mask', 1.0))
TORCHVISION_OPTIONS = {
    'model.anchors.convention': 'torchvision', 'model.anchors.aspect_ratios': (0.5, 1.0, 2.0),
    'model.anchors.offset': 0.0, 'model.anchors.round_half_extents': True,
    'model.rpn.min_size': 1e-3, 'model.roi.level_mapping_eps': 1e-6,
    'model.backbone.bn_epsilon': 1e-5, 'model.rpn.low_quality_ties': True,
    'model.rpn.box_loss_normalizer': 'sampled', 'model.rpn.box_loss_weight': 9.0,
    'model.roi.box_loss_normalizer': 'sampled', 'model.roi.box_loss_weight': 9.0,
    'model.roi.huber_delta': 1.0 / 9.0, 'model.mask.binarize_targets': False}
NUM_IMAGES = 5  # the trainable coco_sample images, one batch of the training order


def ours(npz: str, data_dir: str, out: str, keys: int) -> None:
  """Our side (the repository's venv): writes the batch and our mean losses per image."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.configs import load_config  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.data.spec import GroundTruth  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.modeling import normalize_images  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.train import experiment  # pylint: disable=import-outside-toplevel

  config = load_config(ROOT / 'configs' / 'mask_quality.py')
  config.update_from_flattened_dict(dict(TORCHVISION_OPTIONS))
  config.data.tfds_data_dir = data_dir
  config.init.torchvision_maskrcnn = npz
  exp = experiment.build_experiment(config)
  variables = exp.initial_variables()
  batch = next(experiment.build_train_iterator(config, NUM_IMAGES, seed=0))
  losses = jax.jit(lambda v, x, s, g, k: exp.model.apply(v, x, s, g, train=True,
                                                         rngs={'sampling': k}))
  result = []
  for b in range(NUM_IMAGES):
    one = {k: v[b:b + 1] for k, v in batch.items()}
    images = normalize_images(one['images'], one['image_sizes'], config.data.pixel_mean,
                              config.data.pixel_std)
    gt = GroundTruth.from_batch(one)
    runs = [jax.device_get(losses(variables, images, jnp.asarray(one['image_sizes']), gt,
                                  jax.random.PRNGKey(k))) for k in range(keys)]
    result.append({name: float(np.mean([r[name] for r in runs])) for name, _, _ in PAIRS})
  np.savez(out + '.npz', **{k: np.asarray(v) for k, v in batch.items()})
  with open(out + '.json', 'w') as f:
    json.dump(result, f)


def torchvision_losses(weights: str, batch: dict, keys: int) -> list[dict]:
  import torch  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(ROOT / 'bench'))
  import mask_quality  # pylint: disable=import-outside-toplevel

  model = mask_quality.build_torchvision_model()
  model.load_state_dict(torch.load(weights))
  model.train()
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = mask_quality.load_ground_truth()
    coco.createIndex()
  result = []
  for b in range(NUM_IMAGES):
    h, w = (int(v) for v in batch['image_sizes'][b])
    image = torch.from_numpy(batch['images'][b, :h, :w].astype(np.float32) / 255.0)
    keep = batch['gt_valid'][b] & ~batch['gt_is_crowd'][b]
    boxes = batch['gt_boxes'][b][keep]
    image_id = int(batch['image_ids'][b])
    info = coco.imgs[image_id]
    sx, sy = w / info['width'], h / info['height']
    anns = [a for a in coco.imgToAnns[image_id] if not a.get('iscrowd', 0)]
    masks = []
    for box in boxes:  # the annotation whose scaled box is this ground-truth box
      def distance(a):
        x, y, bw, bh = a['bbox']
        return np.abs(np.array([x * sx, y * sy, (x + bw) * sx, (y + bh) * sy]) - box).sum()
      full = coco.annToMask(min(anns, key=distance))
      masks.append(np.asarray(Image.fromarray(full * 255).resize((w, h), Image.NEAREST)) > 127)
    target = {'boxes': torch.from_numpy(boxes.astype(np.float32)),
              'labels': torch.from_numpy(batch['gt_classes'][b][keep].astype(np.int64)),
              'masks': torch.from_numpy(np.stack(masks).astype(np.uint8))}
    runs = []
    for k in range(keys):
      torch.manual_seed(k)
      with torch.no_grad():
        out = model([image.permute(2, 0, 1)], [{n: v.clone() for n, v in target.items()}])
      runs.append({n: float(v) for n, v in out.items()})
    result.append({n: float(np.mean([r[n] for r in runs])) for n in runs[0]})
  return result


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--weights', help='torchvision state_dict (.pt), mask_quality heads')
  parser.add_argument('--data_dir', help='coco_sample prepared (TFDS data_dir)')
  parser.add_argument('--keys', type=int, default=16, help='sampling seeds averaged per image')
  parser.add_argument('--ours_python', default=str(ROOT / '.venv' / 'bin' / 'python'))
  parser.add_argument('--side', choices=('both', 'ours'), default='both', help=argparse.SUPPRESS)
  parser.add_argument('--npz', help=argparse.SUPPRESS)
  parser.add_argument('--out', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side == 'ours':
    ours(args.npz, args.data_dir, args.out, args.keys)
    return 0
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  with tempfile.TemporaryDirectory() as tmp:
    npz = os.path.join(tmp, 'weights.npz')
    np.savez(npz, **{k: v.numpy() for k, v in torch.load(args.weights).items()})
    out = os.path.join(tmp, 'ours')
    subprocess.run([args.ours_python, __file__, '--side', 'ours', '--npz', npz, '--data_dir',
                    args.data_dir, '--out', out, '--keys', str(args.keys)], check=True,
                   cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
    batch = dict(np.load(out + '.npz'))
    with open(out + '.json') as f:
      our_losses = json.load(f)
  theirs = torchvision_losses(args.weights, batch, args.keys)
  print('image id  ' + '  '.join(f'{t:>24s}' for _, t, _ in PAIRS))
  for b in range(NUM_IMAGES):
    cells = []
    for o, t, w in PAIRS:
      mine = our_losses[b][o] * w
      cells.append(f'{mine:.4f}/{theirs[b][t]:.4f} ({mine / theirs[b][t]:4.2f})'
                   if theirs[b][t] else 'n/a')
    print(f'{int(batch["image_ids"][b]):8d}  ' + '  '.join(f'{c:>24s}' for c in cells))
  print('cells: ours (at torchvision scale) / torchvision (ratio)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
