"""Generate torchvision golden outputs for the detection ops of maskrcnn_jax.

Produces ONE file, ``tests/ops/goldens/torchvision_ops.npz`` (written with
``np.savez_compressed``), that holds deterministic inputs (from a seeded numpy
RNG) together with the outputs torchvision computes for them. The test
``tests/ops/test_torchvision_goldens.py`` compares our JAX ops against it; the
project and its test suite never need torch, only this script does.

Rerun it (from the repository root, with the separate torch venv) with::

    $TORCH_VENV/bin/python tools/make_ops_goldens.py

(torch==2.14.1, torchvision==0.29.1 and numpy installed in ``$TORCH_VENV``, a venv with them and this package).

Keys are ``<op>/<case>/<array>``; all floating point arrays are float32 and
every torchvision computation runs in float32. Layout conventions are ours:

* ``meta/torch_version``, ``meta/torchvision_version``, ``meta/numpy_version``,
  ``meta/seed``: provenance (string / int arrays).
* ``box_iou/{random,degenerate}/{boxes1 (N,4), boxes2 (M,4), iou (N,M)}``:
  ``torchvision.ops.box_iou`` on xyxy boxes. ``degenerate`` pairs zero-area
  boxes with positive-area partners only (no 0/0 unions).
* ``box_area/{boxes (N,4), area (N,)}``: ``torchvision.ops.box_area``.
* ``clip_boxes/{boxes (N,4), image_size (2,) = (height, width), clipped (N,4)}``:
  ``torchvision.ops.clip_boxes_to_image``.
* ``box_coder/w<wx>_<wy>_<ww>_<wh>/...``: ``BoxCoder`` of
  ``torchvision.models.detection._utils`` with ``bbox_xform_clip =
  log(1000/16)``: ``weights (4,)``, ``encode_boxes (N,4)`` (reference boxes),
  ``encode_anchors (N,4)`` (proposals), ``encode_deltas (N,4)`` (dx,dy,dw,dh);
  ``decode_deltas (M,4)``, ``decode_anchors (M,4)``, ``decoded (M,4)``. Some
  decode deltas have ``|dw|, |dh|`` large enough (after division by the weight)
  to hit the clamp.
* ``nms/<case>/{boxes (N,4), scores (N,), iou_threshold (), keep (K,) int64}``:
  ``torchvision.ops.nms``; ``keep`` is in decreasing score order. Scores are a
  permutation (no ties), and boxes are drawn so that no suppression decision
  is within ``NMS_MARGIN`` of the threshold (checked in float64).
* ``batched_nms/<case>/{boxes, scores, classes (N,) int64, iou_threshold, keep}``:
  ``torchvision.ops.batched_nms``.
* ``roi_align/features (B,H,W,C)``: shared NHWC input features.
  ``roi_align/cotangent/<oh>x<ow> (B,N,oh,ow,C)``: upstream cotangents.
  ``roi_align/<case>/{boxes (B,N,4) (image coordinates, xyxy),
  output_size (2,), spatial_scale (), sampling_ratio (), aligned () bool,
  output (B,N,oh,ow,C), grad_features (B,H,W,C)}`` where ``grad_features`` is
  d(sum(output * cotangent))/d(features) from torch autograd. Case names are
  ``o<oh>x<ow>_s<scale>_r<ratio>_<aligned|unaligned>``; the adaptive
  (``sampling_ratio=-1``) case lives under ``roi_align_adaptive/<case>``.
* ``anchors/config/{sizes (L,), aspect_ratios (A,), image_size (2,),
  feature_sizes (L,2), strides (L,)}`` and ``anchors/tv/p<l> (h*w*A, 4)``
  (torchvision ``AnchorGenerator`` output split by level, order (y, x, anchor)),
  ``anchors/tv/cell_p<l> (A,4)`` (``AnchorGenerator.cell_anchors``).
"""

from __future__ import annotations

import itertools
import math
import os
import sys

import numpy as np
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

SEED = 20240611
OUT_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    'tests', 'ops', 'goldens', 'torchvision_ops.npz')

# Minimum distance (float64) between any NMS suppression decision's IoU and
# the threshold, so that float32 rounding differences cannot flip a decision.
NMS_MARGIN = 1e-4
BATCHED_NMS_MARGIN = 1e-3  # batched_nms offsets coordinates per class: more rounding.
# Minimum distance of every RoIAlign sample point to the discontinuities of
# torchvision's bilinear interpolation (coordinates -1 and H / W).
ROI_MARGIN = 1e-3

ROI_B, ROI_C, ROI_H, ROI_W = 2, 3, 13, 17
ROI_OUTPUT_SIZES = ((7, 7), (5, 4))
ROI_SCALES = (1.0, 0.5)
ROI_RATIOS = (2, 1)
ROI_ALIGNED = (True, False)
ROI_ADAPTIVE = ((7, 7), 0.5, -1, True)  # the one adaptive (sampling_ratio=-1) setting


def roi_case_name(output_size, spatial_scale, sampling_ratio, aligned):
  """Key of one RoIAlign case, e.g. ``o7x7_s0.5_r2_aligned``."""
  oh, ow = output_size
  return (f'o{oh}x{ow}_s{spatial_scale}_r{sampling_ratio}_'
          f"{'aligned' if aligned else 'unaligned'}")


def f32(x):
  """Cast a torch tensor or array-like to a float32 numpy array."""
  if isinstance(x, torch.Tensor):
    x = x.detach().cpu().numpy()
  return np.asarray(x, dtype=np.float32)


def t32(x):
  """numpy array -> float32 torch tensor."""
  return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# ----------------------------------------------------------------------------
# Box helpers
# ----------------------------------------------------------------------------

def random_boxes(rng, n, lo=0.0, hi=100.0, min_size=1.0, max_size=50.0):
  """Random xyxy boxes with positive area. Returns float32 (n, 4)."""
  xy = rng.uniform(lo, hi, size=(n, 2))
  wh = rng.uniform(min_size, max_size, size=(n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def clustered_boxes(rng, n, n_clusters, extent=400.0, size_range=(20.0, 120.0),
                    jitter=0.12, size_jitter=0.15):
  """Boxes jittered around ``n_clusters`` objects (heavy NMS suppression).

  Every box is an object box whose centre moves by ``jitter * size`` and whose
  width/height are scaled by ``exp(N(0, size_jitter))``. Returns float32 (n, 4).
  """
  centers = rng.uniform(0.0, extent, size=(n_clusters, 2))
  sizes = np.exp(rng.uniform(np.log(size_range[0]), np.log(size_range[1]),
                             size=(n_clusters, 2)))
  which = rng.integers(0, n_clusters, size=n)
  wh = sizes[which] * np.exp(rng.normal(0.0, size_jitter, size=(n, 2)))
  ctr = centers[which] + rng.normal(0.0, jitter, size=(n, 2)) * sizes[which]
  return np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1).astype(np.float32)


def iou_matrix_f64(a, b):
  """Float64 IoU of xyxy boxes a (N,4), b (M,4) -> (N,M); 0 where union is 0."""
  a = a.astype(np.float64)
  b = b.astype(np.float64)
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0.0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a[:, None] + area_b[None, :] - inter
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
  return iou


def greedy_nms_f64(boxes, scores, iou_threshold):
  """Reference greedy NMS in float64.

  Args:
    boxes: (N, 4) xyxy. scores: (N,) without ties. iou_threshold: float.
  Returns:
    (keep (K,) int64 in decreasing score order, margin) where margin is the
    smallest |max IoU with an earlier kept box - threshold| over all boxes that
    had an earlier kept box (inf if none).
  """
  order = np.argsort(-scores.astype(np.float64), kind='stable')
  iou = iou_matrix_f64(boxes, boxes)
  keep = []
  margin = np.inf
  for j in order:
    if keep:
      m = iou[j, keep].max()
      margin = min(margin, abs(m - iou_threshold))
      if m > iou_threshold:
        continue
    keep.append(j)
  return np.asarray(keep, dtype=np.int64), margin


def permutation_scores(rng, n):
  """Distinct float32 scores in (0, 1]: a random permutation of (k+1)/n."""
  return ((rng.permutation(n) + 1) / n).astype(np.float32)


# ----------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------

def make_box_iou(rng, out):
  """box_iou: random boxes with identical and disjoint pairs; degenerate set."""
  b1 = random_boxes(rng, 37)
  b2 = random_boxes(rng, 23)
  b2[:4] = b1[[3, 10, 20, 36]]                          # identical pairs (IoU 1)
  b2[4:8] = random_boxes(rng, 4, lo=1000.0, hi=1100.0)  # overlap nothing
  b2[8] = [b1[5, 2], b1[5, 1], b1[5, 2] + 10, b1[5, 3]]  # touches b1[5]: IoU 0
  out['box_iou/random/boxes1'] = b1
  out['box_iou/random/boxes2'] = b2
  out['box_iou/random/iou'] = f32(torchvision.ops.box_iou(t32(b1), t32(b2)))

  # Zero-area boxes (points and segments, inside / on the edge / outside of
  # their partners) against positive-area boxes only: unions are > 0.
  d1 = np.array([
      [10, 10, 10, 10],   # point inside d2[0]
      [10, 5, 10, 30],    # vertical segment crossing d2[0]
      [5, 12, 40, 12],    # horizontal segment crossing d2[0]
      [0, 0, 0, 0],       # point at the corner of d2[1]
      [60, 60, 60, 70],   # segment far from everything but d2[3]
      [20, 20, 30, 30],   # positive-area box for contrast
  ], dtype=np.float32)
  d2 = np.array([
      [0, 0, 20, 20],
      [0, 0, 5, 5],
      [8, 8, 40, 40],
      [55, 55, 65, 80],
  ], dtype=np.float32)
  out['box_iou/degenerate/boxes1'] = d1
  out['box_iou/degenerate/boxes2'] = d2
  iou = f32(torchvision.ops.box_iou(t32(d1), t32(d2)))
  assert np.isfinite(iou).all(), iou
  out['box_iou/degenerate/iou'] = iou


def make_box_area_and_clip(rng, out):
  """box_area and clip_boxes_to_image on boxes incl. zero-area / outside ones."""
  boxes = random_boxes(rng, 20, lo=-30.0, hi=120.0, min_size=0.0, max_size=60.0)
  boxes[0] = [5, 5, 5, 9]      # zero width
  boxes[1] = [7, 3, 12, 3]     # zero height
  boxes[2] = [-10, -10, 200, 150]  # covers the whole image
  out['box_area/boxes'] = boxes
  out['box_area/area'] = f32(torchvision.ops.box_area(t32(boxes)))

  height, width = 90, 110
  out['clip_boxes/boxes'] = boxes
  out['clip_boxes/image_size'] = np.array([height, width], dtype=np.int64)
  out['clip_boxes/clipped'] = f32(
      torchvision.ops.clip_boxes_to_image(t32(boxes), (height, width)))


def make_box_coder(rng, out):
  """BoxCoder encode / decode for weights (10,10,5,5) and (1,1,1,1)."""
  clip = math.log(1000.0 / 16)
  for weights in ((10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)):
    coder = BoxCoder(weights, bbox_xform_clip=clip)
    key = 'box_coder/w' + '_'.join(str(int(w)) for w in weights)
    out[f'{key}/weights'] = np.asarray(weights, dtype=np.float32)

    # Encode: ground-truth boxes near their proposals (as after matching),
    # plus a few unrelated pairs.
    anchors = random_boxes(rng, 30, lo=0.0, hi=60.0, min_size=8.0, max_size=60.0)
    wh = anchors[:, 2:] - anchors[:, :2]
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = ctr + rng.normal(0.0, 0.2, size=ctr.shape) * wh
    g_wh = wh * np.exp(rng.normal(0.0, 0.4, size=wh.shape))
    gt = np.concatenate([g_ctr - g_wh / 2, g_ctr + g_wh / 2], 1).astype(np.float32)
    far = slice(len(gt) - 5, None)  # less related pairs: larger deltas
    f_ctr = ctr[far] + rng.uniform(-2.0, 2.0, size=(5, 2)) * wh[far]
    f_wh = wh[far] * np.exp(rng.uniform(-1.5, 1.5, size=(5, 2)))
    gt[far] = np.concatenate([f_ctr - f_wh / 2, f_ctr + f_wh / 2], 1)
    out[f'{key}/encode_boxes'] = gt
    out[f'{key}/encode_anchors'] = anchors
    out[f'{key}/encode_deltas'] = f32(coder.encode_single(t32(gt), t32(anchors)))

    # Decode: moderate deltas on ordinary anchors, then large |dw|, |dh|
    # (beyond the clamp after division by the weight) on small anchors so
    # the decoded coordinates stay small enough for a 1e-4 float32 check.
    w = np.asarray(weights, dtype=np.float64)
    n_mod, n_big = 24, 12
    d_mod = rng.normal(0.0, 1.0, size=(n_mod, 4)) * [0.3, 0.3, 0.5, 0.5] * w
    a_mod = random_boxes(rng, n_mod, lo=0.0, hi=100.0, min_size=4.0, max_size=60.0)
    d_big = np.concatenate([
        rng.normal(0.0, 0.3, size=(n_big, 2)) * w[:2],
        rng.choice([-1.0, 1.0], size=(n_big, 2))
        * rng.uniform(0.5 * clip, 2.0 * clip, size=(n_big, 2)) * w[2:],
    ], axis=1)
    a_big = random_boxes(rng, n_big, lo=0.0, hi=30.0, min_size=0.5, max_size=2.0)
    deltas = np.concatenate([d_mod, d_big]).astype(np.float32)
    dec_anchors = np.concatenate([a_mod, a_big]).astype(np.float32)
    assert (deltas[:, 2:] / w[2:] > clip).sum() >= 4  # the clamp is hit
    out[f'{key}/decode_deltas'] = deltas
    out[f'{key}/decode_anchors'] = dec_anchors
    decoded = coder.decode_single(t32(deltas), t32(dec_anchors))
    out[f'{key}/decoded'] = f32(decoded).reshape(-1, 4)


def _nms_case(rng, out, name, draw, iou_threshold, margin=NMS_MARGIN, attempts=200):
  """Draw (boxes, scores) with ``draw(rng)`` until every NMS decision is at
  least ``margin`` away from the threshold, run torchvision and store it."""
  for _ in range(attempts):
    boxes, scores = draw(rng)
    keep_ref, m = greedy_nms_f64(boxes, scores, iou_threshold)
    if m >= margin:
      break
  else:
    raise RuntimeError(f'nms/{name}: could not draw a case with margin {margin}')
  keep = torchvision.ops.nms(t32(boxes), t32(scores), iou_threshold).numpy()
  assert np.array_equal(keep, keep_ref), name
  out[f'nms/{name}/boxes'] = boxes
  out[f'nms/{name}/scores'] = scores
  out[f'nms/{name}/iou_threshold'] = np.float32(iou_threshold)
  out[f'nms/{name}/keep'] = keep.astype(np.int64)
  print(f'  nms/{name}: {len(boxes)} boxes -> kept {len(keep)} '
        f'(decision margin {m:.2e})')


def make_nms(rng, out):
  """torchvision.ops.nms cases (a)-(e) and batched_nms."""
  def clustered(r):
    b = clustered_boxes(r, 300, n_clusters=12)
    return b, permutation_scores(r, len(b))

  _nms_case(rng, out, 'clustered_t0.5', clustered, 0.5)
  _nms_case(rng, out, 'clustered_t0.7', clustered, 0.7)

  def identical(r):
    b = np.repeat(random_boxes(r, 1), 50, axis=0)
    return b, permutation_scores(r, len(b))

  _nms_case(rng, out, 'identical', identical, 0.5)

  def distinct(r):
    b = random_boxes(r, 120, lo=0.0, hi=100.0, min_size=10.0, max_size=60.0)
    return b, permutation_scores(r, len(b))

  _nms_case(rng, out, 'distinct_scores', distinct, 0.5)

  def proposals(r):
    # RPN-like: many jittered proposals on ~60 objects of widely varying
    # size in an 800 x 1216 image, plus 20% background proposals.
    n_obj, n_bg = 1600, 400
    b_obj = clustered_boxes(r, n_obj, n_clusters=60, extent=1000.0,
                            size_range=(16.0, 400.0), jitter=0.1,
                            size_jitter=0.12)
    b_bg = random_boxes(r, n_bg, lo=0.0, hi=1100.0, min_size=8.0, max_size=300.0)
    b = np.concatenate([b_obj, b_bg])
    b[:, 0::2] = np.clip(b[:, 0::2], 0.0, 1216.0)
    b[:, 1::2] = np.clip(b[:, 1::2], 0.0, 800.0)
    b = b[r.permutation(len(b))].astype(np.float32)
    return b, permutation_scores(r, len(b))

  _nms_case(rng, out, 'proposals_2000_t0.7', proposals, 0.7)

  def zero_area(r):
    b = clustered_boxes(r, 80, n_clusters=5, extent=200.0)
    z = r.choice(len(b), size=16, replace=False)
    b[z[:6], 2] = b[z[:6], 0]        # zero width
    b[z[6:12], 3] = b[z[6:12], 1]    # zero height
    b[z[12:], 2:] = b[z[12:], :2]    # points
    b[z[14]] = b[z[15]]              # two identical points
    return b, permutation_scores(r, len(b))

  _nms_case(rng, out, 'zero_area', zero_area, 0.5)

  # batched_nms: 300 clustered boxes, 4 classes, threshold 0.5. Margin is
  # checked per class (the class offset trick is exact in real arithmetic).
  iou_threshold = 0.5
  for _ in range(500):
    boxes = clustered_boxes(rng, 300, n_clusters=10, extent=200.0)
    scores = permutation_scores(rng, len(boxes))
    classes = rng.integers(0, 4, size=len(boxes)).astype(np.int64)
    m = np.inf
    for c in np.unique(classes):
      idx = np.nonzero(classes == c)[0]
      m = min(m, greedy_nms_f64(boxes[idx], scores[idx], iou_threshold)[1])
    if m >= BATCHED_NMS_MARGIN:
      break
  else:
    raise RuntimeError('batched_nms: could not draw a case with enough margin')
  keep = torchvision.ops.batched_nms(t32(boxes), t32(scores),
                                     torch.from_numpy(classes), iou_threshold).numpy()
  # Reference: per-class greedy NMS merged in decreasing score order.
  ref = np.concatenate([
      np.nonzero(classes == c)[0][greedy_nms_f64(
          boxes[classes == c], scores[classes == c], iou_threshold)[0]]
      for c in np.unique(classes)])
  ref = ref[np.argsort(-scores[ref], kind='stable')]
  assert np.array_equal(keep, ref)
  name = 'clustered_4classes_t0.5'
  out[f'batched_nms/{name}/boxes'] = boxes
  out[f'batched_nms/{name}/scores'] = scores
  out[f'batched_nms/{name}/classes'] = classes
  out[f'batched_nms/{name}/iou_threshold'] = np.float32(iou_threshold)
  out[f'batched_nms/{name}/keep'] = keep.astype(np.int64)
  print(f'  batched_nms/{name}: {len(boxes)} boxes -> kept {len(keep)} '
        f'(decision margin {m:.2e})')


def roi_boxes_feature_coords(rng):
  """Per-image RoIs in feature-map coordinates. Returns float64 (B, 9, 4).

  Per image: 3 random boxes inside the map, one sticking out top-left, one
  sticking out bottom-right, one fully outside (right of the map), one
  zero-area box, one tiny box, and one box covering the whole map.
  """
  H, W = ROI_H, ROI_W
  all_boxes = []
  for _ in range(ROI_B):
    inside = []
    for _ in range(3):
      x1, y1 = rng.uniform(0, W - 4), rng.uniform(0, H - 4)
      inside.append([x1, y1, x1 + rng.uniform(1.5, W - x1),
                     y1 + rng.uniform(1.5, H - y1)])
    boxes = inside + [
        [rng.uniform(-5, -1.5), rng.uniform(-4, -1.5),
         rng.uniform(3, 8), rng.uniform(3, 7)],                  # top-left out
        [rng.uniform(W - 6, W - 2), rng.uniform(H - 5, H - 2),
         rng.uniform(W + 1.5, W + 5), rng.uniform(H + 1.5, H + 4)],  # bottom-right out
        [rng.uniform(W + 1.5, W + 3), rng.uniform(1, 4),
         rng.uniform(W + 4, W + 8), rng.uniform(6, 10)],          # fully outside
    ]
    zx, zy = rng.uniform(1, W - 2), rng.uniform(1, H - 2)
    boxes.append([zx, zy, zx, zy])                                # zero area
    tx, ty = rng.uniform(1, W - 2), rng.uniform(1, H - 2)
    boxes.append([tx, ty, tx + rng.uniform(0.1, 0.4), ty + rng.uniform(0.1, 0.4)])  # tiny
    boxes.append([rng.uniform(-1.4, -0.6), rng.uniform(-1.4, -0.6),
                  W + rng.uniform(0.6, 1.4), H + rng.uniform(0.6, 1.4)])  # covers all
    all_boxes.append(boxes)
  return np.asarray(all_boxes, dtype=np.float64)


def roi_sample_margin(boxes_img, output_size, spatial_scale, sampling_ratio, aligned):
  """Smallest distance (float64) of a RoIAlign sample point to -1 or H (y) /
  -1 or W (x), the discontinuities of torchvision's bilinear sampling.

  boxes_img: (B, N, 4) image-coordinate xyxy boxes. Returns a float.
  """
  offset = 0.5 if aligned else 0.0
  b = boxes_img.reshape(-1, 4) * spatial_scale - offset
  margin = np.inf
  for start, end, pooled, size in ((b[:, 1], b[:, 3], output_size[0], ROI_H),
                                   (b[:, 0], b[:, 2], output_size[1], ROI_W)):
    length = end - start
    if not aligned:
      length = np.maximum(length, 1.0)
    bin_size = length / pooled
    for i in range(len(b)):
      grid = (sampling_ratio if sampling_ratio > 0
              else int(math.ceil(length[i] / pooled)))
      p = np.arange(pooled)[:, None]
      g = np.arange(grid)[None, :]
      pos = start[i] + p * bin_size[i] + (g + 0.5) * bin_size[i] / grid
      if pos.size:
        margin = min(margin, np.abs(pos - -1.0).min(), np.abs(pos - size).min())
      if sampling_ratio <= 0 and length[i] > 0:
        # adaptive grid = ceil(length / pooled): keep away from integers
        q = length[i] / pooled
        margin = min(margin, abs(q - round(q)))
  return margin


def _roi_settings():
  """All fixed-sampling-ratio settings: (output_size, scale, ratio, aligned)."""
  return list(itertools.product(ROI_OUTPUT_SIZES, ROI_SCALES, ROI_RATIOS, ROI_ALIGNED))


def make_roi_align(rng, out):
  """torchvision.ops.roi_align forward and backward, stored in NHWC layout."""
  feats = rng.normal(0.0, 1.0, size=(ROI_B, ROI_H, ROI_W, ROI_C)).astype(np.float32)
  out['roi_align/features'] = feats
  cotangents = {}
  for oh, ow in ROI_OUTPUT_SIZES:
    cotangents[(oh, ow)] = rng.normal(0.0, 1.0, size=(ROI_B, 9, oh, ow, ROI_C)
                                      ).astype(np.float32)
    out[f'roi_align/cotangent/{oh}x{ow}'] = cotangents[(oh, ow)]

  settings = _roi_settings() + [ROI_ADAPTIVE]
  for _ in range(200):
    boxes_feat = roi_boxes_feature_coords(rng)
    margins = {s: roi_sample_margin(boxes_feat / s[1], *s) for s in settings}
    if min(margins.values()) >= ROI_MARGIN:
      break
  else:
    raise RuntimeError('roi_align: could not draw boxes with enough margin')

  for setting in settings:
    output_size, scale, ratio, aligned = setting
    boxes = (boxes_feat / scale).astype(np.float32)  # image coordinates
    x = t32(feats).permute(0, 3, 1, 2).contiguous().requires_grad_(True)  # NCHW
    y = torchvision.ops.roi_align(x, [t32(b) for b in boxes], output_size,
                                  spatial_scale=scale, sampling_ratio=ratio,
                                  aligned=aligned)
    assert y.dtype == torch.float32
    # (B*N, C, oh, ow) -> (B, N, oh, ow, C)
    y_nhwc = y.reshape(ROI_B, -1, ROI_C, *output_size).permute(0, 1, 3, 4, 2)
    cot = torch.from_numpy(cotangents[output_size])
    (y_nhwc * cot).sum().backward()
    prefix = 'roi_align_adaptive' if ratio <= 0 else 'roi_align'
    key = f'{prefix}/{roi_case_name(output_size, scale, ratio, aligned)}'
    out[f'{key}/boxes'] = boxes
    out[f'{key}/output_size'] = np.asarray(output_size, dtype=np.int64)
    out[f'{key}/spatial_scale'] = np.float32(scale)
    out[f'{key}/sampling_ratio'] = np.int64(ratio)
    out[f'{key}/aligned'] = np.bool_(aligned)
    out[f'{key}/output'] = f32(y_nhwc)
    out[f'{key}/grad_features'] = f32(x.grad.permute(0, 2, 3, 1))
  print(f'  roi_align: {len(settings)} settings, sample margin '
        f'{min(margins.values()):.2e}')


def make_anchors(out):
  """AnchorGenerator on a 128 x 192 padded image with 5 FPN levels."""
  sizes = ((32,), (64,), (128,), (256,), (512,))
  aspect_ratios = ((0.5, 1.0, 2.0),) * 5
  image_size = (128, 192)
  strides = (4, 8, 16, 32, 64)
  feature_sizes = [(image_size[0] // s, image_size[1] // s) for s in strides]
  gen = AnchorGenerator(sizes, aspect_ratios)
  images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
  features = [torch.zeros(1, 4, h, w) for h, w in feature_sizes]
  anchors = gen(images, features)[0]
  counts = [h * w * len(aspect_ratios[0]) for h, w in feature_sizes]
  assert anchors.shape == (sum(counts), 4)
  out['anchors/config/sizes'] = np.asarray([s[0] for s in sizes], dtype=np.float32)
  out['anchors/config/aspect_ratios'] = np.asarray(aspect_ratios[0], dtype=np.float32)
  out['anchors/config/image_size'] = np.asarray(image_size, dtype=np.int64)
  out['anchors/config/feature_sizes'] = np.asarray(feature_sizes, dtype=np.int64)
  out['anchors/config/strides'] = np.asarray(strides, dtype=np.int64)
  levels = zip(torch.split(anchors, counts), gen.cell_anchors)
  for level, (chunk, cell) in enumerate(levels, start=2):
    out[f'anchors/tv/p{level}'] = f32(chunk)
    out[f'anchors/tv/cell_p{level}'] = f32(cell)


def main():
  """Build every case, write the npz and print a summary."""
  torch.set_num_threads(1)
  torch.manual_seed(0)  # nothing random is drawn from torch; set for safety
  print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, '
        f'numpy {np.__version__}')
  rng = np.random.default_rng(SEED)
  out = {
      'meta/torch_version': np.asarray(torch.__version__),
      'meta/torchvision_version': np.asarray(torchvision.__version__),
      'meta/numpy_version': np.asarray(np.__version__),
      'meta/seed': np.int64(SEED),
  }
  make_box_iou(rng, out)
  make_box_area_and_clip(rng, out)
  make_box_coder(rng, out)
  make_nms(rng, out)
  make_roi_align(rng, out)
  make_anchors(out)
  for k, v in out.items():
    v = np.asarray(v)
    assert v.dtype != np.float64, k
    if v.dtype.kind == 'f':
      assert np.isfinite(v).all(), k
  os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
  np.savez_compressed(OUT_PATH, **out)
  print(f'wrote {OUT_PATH}: {len(out)} arrays, {os.path.getsize(OUT_PATH)} bytes')
  return 0


if __name__ == '__main__':
  sys.exit(main())
