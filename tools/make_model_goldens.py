"""Generate torchvision golden outputs of the whole Mask R-CNN for the parity test.

Builds torchvision's ``maskrcnn_resnet50_fpn`` architecture (frozen batch norm, as torchvision
builds it whenever weights are loaded), fills it with the deterministic synthetic weights of
:mod:`maskrcnn_jax.weights.synthetic` (which the test regenerates without torch), and runs it in
float32 on one real COCO image preprocessed here once (resized to exactly 384 x 512, normalised
with torchvision's mean / std). No resizing transform intervenes: the script calls
``model.backbone``, ``model.rpn`` and ``model.roi_heads`` on an ``ImageList`` itself, so the masks
are torchvision's 28 x 28 probabilities before pasting.

Writes (from the repository root)::

    $TORCH_VENV/bin/python tools/make_model_goldens.py

* ``tests/modeling/goldens/torchvision_maskrcnn_r50_manifest.json``: state-dict names and shapes
  of ``maskrcnn_resnet50_fpn`` with frozen batch norm, and torchvision's parameter counts;
* ``tests/modeling/goldens/torchvision_maskrcnn_r50.npz`` (< 2 MB): keys
  ``image_uint8 (1, 384, 512, 3)``, ``mean``, ``std`` (the input is
  ``(image_uint8 / 255 - mean) / std`` in float32), ``image_sizes (1, 2)``,
  ``features/<level>/index (K, 3)`` (y, x, c) and ``features/<level>/values (K,)`` for p2..p6,
  ``proposals (50, 4)`` (the first 50 of the RPN's 1000, descending score),
  ``num_proposals``, ``boxes (D, 4)``, ``scores (D,)``, ``labels (D,)``, ``masks (D, 28, 28)``,
  ``weight_checksums (T,)`` (sum of every synthetic tensor in manifest order), ``seed``.

Requires torch==2.14.1, torchvision==0.29.1, numpy and Pillow in $TORCH_VENV (a venv with them and this package).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.models import resnet50
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNN
from torchvision.ops.misc import FrozenBatchNorm2d

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Loaded by path: the maskrcnn_jax package imports jax/flax, which this venv does not have.
_spec = importlib.util.spec_from_file_location(
    'synthetic', ROOT / 'maskrcnn_jax/weights/synthetic.py')
_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synthetic)
synthetic_torchvision_state_dict = _synthetic.synthetic_torchvision_state_dict

SEED = 0
IMAGE = ROOT / 'tests/data/coco_sample/val2017/000000000089.jpg'
HEIGHT, WIDTH = 384, 512
MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
STD = np.asarray([0.229, 0.224, 0.225], np.float32)
SAMPLES_PER_LEVEL = 256
OUT = ROOT / 'tests/modeling/goldens'


def build_model() -> torch.nn.Module:
  """torchvision's maskrcnn_resnet50_fpn as built with weights: FrozenBatchNorm2d, 3 trainable
  backbone layers (freeze point 2), 91 classes, default inference settings."""
  backbone = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
  backbone = _resnet_fpn_extractor(backbone, 3)
  return MaskRCNN(backbone, num_classes=91).eval()


def main() -> None:
  torch.manual_seed(SEED)
  model = build_model()
  state = model.state_dict()
  # Same names as maskrcnn_resnet50_fpn(weights=None) apart from BatchNorm2d's counters.
  reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
  other = {k for k in reference if not k.endswith('num_batches_tracked')}
  assert other == set(state), sorted(other ^ set(state))[:10]

  manifest = [(k, list(v.shape)) for k, v in state.items()]
  synthetic = synthetic_torchvision_state_dict(manifest, SEED)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in synthetic.items()})

  body = build_model().backbone.body
  counts = {
      'maskrcnn_resnet50_fpn': sum(p.numel() for p in model.parameters()),
      'backbone_body_resnet50': sum(p.numel() for p in body.parameters()),
      'resnet50_imagenet': sum(p.numel() for p in resnet50(weights=None).parameters()),
  }
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / 'torchvision_maskrcnn_r50_manifest.json').write_text(json.dumps({
      'torch': torch.__version__, 'torchvision': torchvision.__version__,
      'parameter_counts': counts, 'state_dict': manifest}, indent=0))

  image = Image.open(IMAGE).convert('RGB').resize((WIDTH, HEIGHT), Image.BILINEAR)
  image_u8 = np.asarray(image, np.uint8)[None]
  x = (image_u8.astype(np.float32) / np.float32(255.0) - MEAN) / STD  # (1, H, W, 3)
  tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

  out = {'image_uint8': image_u8, 'mean': MEAN, 'std': STD,
         'image_sizes': np.asarray([[HEIGHT, WIDTH]], np.int32), 'seed': np.asarray(SEED)}
  with torch.no_grad():
    images = ImageList(tensor, [(HEIGHT, WIDTH)])
    features = model.backbone(tensor)
    rng = np.random.default_rng(SEED)
    for name, level in zip(['0', '1', '2', '3', 'pool'], ['p2', 'p3', 'p4', 'p5', 'p6']):
      f = features[name][0].permute(1, 2, 0).numpy()  # (H, W, C)
      idx = np.stack([rng.integers(0, n, SAMPLES_PER_LEVEL) for n in f.shape], axis=1)
      out[f'features/{level}/index'] = idx.astype(np.int32)
      out[f'features/{level}/values'] = f[idx[:, 0], idx[:, 1], idx[:, 2]]
      print(level, f.shape, 'mean|f|', np.abs(f).mean(), 'max', np.abs(f).max())
    proposals, _ = model.rpn(images, features)
    out['proposals'] = proposals[0][:50].numpy()
    out['num_proposals'] = np.asarray(len(proposals[0]))
    detections, _ = model.roi_heads(features, proposals, images.image_sizes)
    det = detections[0]
    out['boxes'] = det['boxes'].numpy()
    out['scores'] = det['scores'].numpy()
    out['labels'] = det['labels'].numpy().astype(np.int32)
    out['masks'] = det['masks'][:, 0].numpy()

    # Diagnostics for tuning the synthetic weights: how many candidates pass 0.05.
    rh = model.roi_heads
    box_features = rh.box_head(rh.box_roi_pool(features, proposals, images.image_sizes))
    logits, _ = rh.box_predictor(box_features)
    probs = torch.softmax(logits, -1)[:, 1:]
    print('proposals', len(proposals[0]), 'candidates > 0.05:', int((probs > 0.05).sum()),
          'max prob', float(probs.max()), 'detections', len(det['boxes']))
    print('scores', out['scores'][:10], 'labels', out['labels'][:10])
  out['weight_checksums'] = np.asarray([synthetic[k].astype(np.float64).sum()
                                        for k, _ in manifest])
  np.savez_compressed(OUT / 'torchvision_maskrcnn_r50.npz', **out)
  print('parameter counts', counts)
  print('wrote', OUT / 'torchvision_maskrcnn_r50.npz',
        (OUT / 'torchvision_maskrcnn_r50.npz').stat().st_size, 'bytes')


if __name__ == '__main__':
  main()
