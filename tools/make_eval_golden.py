"""Writes tests/evaluation/goldens/{instances.json, results.json, expected_stats.json}: a small
COCO case and the 12 bbox + 12 segm stats of an independent pycocotools run on it.

Independent: this script imports pycocotools and NumPy only, never maskrcnn_jax, so the
evaluate command and both engines of `maskrcnn_jax.evaluation.coco` are checked against
pycocotools itself (tests/evaluation/test_golden.py).

The case (deterministic, seed below; about 10 kB in all):
* 5 images of 5 sizes, 4 categories (category 4 has no ground truth; its detections are ignored
  by COCOeval); objects small, medium and large (COCO's area ranges 32**2 and 96**2);
* ground truth as polygons (several parts for one object), one non-crowd object as compressed
  RLE, one crowd region as uncompressed RLE (as COCO stores crowds) and one as a polygon, both
  with detections on them; the first annotation has id 0;
* image 3 has objects and no result; image 4 has no object and only false positives;
* results: each non-crowd object found 0-2 times (jittered polygon -> compressed RLE mask, a
  jittered box), false positives, one result of a category id the annotations do not have.

pycocotools counts a ground truth matched under id 0 as unmatched (``dtm`` holds the matched
annotation id and ``accumulate`` tests it for truth), so the expected stats are those of the same
annotations renumbered 1..n, in order (what COCO's own 1-based ids give). The stats of the file
as given, id 0 included, are recorded too (``stats_with_id_0``), to show that the case exercises
that trap. Run from the repository root:

  .venv/bin/python tools/make_eval_golden.py
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import io
import json
import pathlib

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

OUT = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'evaluation' / 'goldens'
SEED = 13
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm',
              'ARl')
IMAGES = [(1, 160, 200), (2, 100, 140), (3, 90, 90), (4, 80, 120), (5, 128, 128)]  # id, h, w
CATEGORIES = [{'id': 1, 'name': 'disc', 'supercategory': 'shape'},
              {'id': 2, 'name': 'box', 'supercategory': 'shape'},
              {'id': 3, 'name': 'star', 'supercategory': 'shape'},
              {'id': 4, 'name': 'absent', 'supercategory': 'shape'}]
# Non-crowd objects per image: (category, centre x, centre y, radius x, radius y).
OBJECTS = {
    1: [(1, 40, 40, 30, 25), (2, 150, 30, 12, 10), (1, 120, 105, 72, 50), (3, 20, 130, 6, 5),
        (2, 40, 100, 14, 9), (3, 180, 145, 8, 7)],
    2: [(1, 30, 30, 20, 18), (3, 100, 70, 25, 20), (2, 60, 80, 5, 4)],
    3: [(1, 45, 45, 30, 30), (2, 20, 15, 8, 6)],
    5: [(2, 30, 30, 18, 22), (1, 64, 68, 62, 58), (3, 100, 25, 16, 10)],
}


def _polygon(rng, cx, cy, rx, ry, vertices=12):
  """A lumpy ellipse around (cx, cy): flat [x0, y0, x1, y1, ...] rounded to 0.1 px."""
  angles = (np.arange(vertices) + rng.uniform(-0.3, 0.3, vertices)) * 2 * np.pi / vertices
  radius = rng.uniform(0.9, 1.0, vertices)
  xs, ys = cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles)
  return [round(float(v), 1) for xy in zip(xs, ys) for v in xy]


def _rle(segmentation, h, w):
  """Compressed RLE of polygons or of an RLE (as pycocotools' annToRLE)."""
  if isinstance(segmentation, dict) and isinstance(segmentation['counts'], str):
    return {'size': segmentation['size'], 'counts': segmentation['counts'].encode()}
  rles = mask_util.frPyObjects(segmentation, h, w)
  return mask_util.merge(rles) if isinstance(rles, list) else rles


def _box(rle):
  return [round(float(v), 2) for v in mask_util.toBbox(rle)]


def make_case(seed: int = SEED):
  """(ground truth dict, results list) of the committed case."""
  rng = np.random.default_rng(seed)
  sizes = {i: (h, w) for i, h, w in IMAGES}
  annotations, results = [], []

  def add(image_id, category_id, segmentation, iscrowd=0):
    h, w = sizes[image_id]
    rle = _rle(segmentation, h, w)
    annotations.append({'id': len(annotations), 'image_id': image_id,
                        'category_id': category_id, 'iscrowd': iscrowd,
                        'area': float(mask_util.area(rle)), 'bbox': _box(rle),
                        'segmentation': segmentation})

  polygons = {}
  for image_id, objects in OBJECTS.items():
    for k, (category, cx, cy, rx, ry) in enumerate(objects):
      polygon = polygons[image_id, k] = _polygon(rng, cx, cy, rx, ry)
      if image_id == 1 and k == 4:  # an object in two parts
        add(image_id, category, [polygon, _polygon(rng, cx + rx + 8, cy, 5, 4, 6)])
      elif image_id == 2 and k == 1:  # a non-crowd object stored as compressed RLE
        rle = _rle([polygon], *sizes[image_id])
        add(image_id, category, {'size': rle['size'], 'counts': rle['counts'].decode()})
      else:
        add(image_id, category, [polygon])
  # A crowd of discs on image 2 as uncompressed RLE (column-major run lengths, COCO's crowd
  # format) and a crowd of boxes on image 5 as a polygon.
  h, w = sizes[2]
  crowd = np.zeros((h, w), np.uint8)
  crowd[60:95, 5:45] = 1
  runs, last, count = [], 0, 0
  for v in crowd.T.reshape(-1):
    if v != last:
      runs.append(count)
      last, count = v, 0
    count += 1
  runs.append(count)
  add(2, 1, {'size': [h, w], 'counts': [int(r) for r in runs]}, iscrowd=1)
  add(5, 2, [[55.0, 50.0, 105.0, 50.0, 105.0, 70.0, 55.0, 70.0]], iscrowd=1)

  def detect(image_id, category_id, polygon, score):
    h, w = sizes[image_id]
    rle = _rle([polygon], h, w)
    box = np.asarray(mask_util.toBbox(rle), np.float64) + rng.normal(0, 1.0, 4)
    results.append({'image_id': image_id, 'category_id': category_id,
                    'bbox': [round(float(v), 2) for v in box], 'score': round(score, 4),
                    'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode()}})

  for image_id, objects in OBJECTS.items():
    if image_id == 3:
      continue  # an image without results
    for k, (category, cx, cy, rx, ry) in enumerate(objects):
      count = int(rng.choice([0, 1, 1, 1, 2]))
      if image_id == 1 and k == 0:
        count = max(count, 1)  # the annotation of id 0 is matched
      for _ in range(count):
        # The object's polygon moved, scaled and its vertices jittered.
        xy = np.asarray(polygons[image_id, k], np.float64).reshape(-1, 2)
        scale = 1 + rng.normal(0, 0.1, 2)
        shift = rng.normal(0, 0.1, 2) * [rx, ry]
        xy = ([cx, cy] + (xy - [cx, cy]) * scale + shift
              + rng.normal(0, 0.05, xy.shape) * [rx, ry])
        detect(image_id, category, [round(float(v), 1) for v in xy.reshape(-1)],
               float(rng.uniform(0.3, 1.0)))
  # Detections on the crowd regions (matched to them: ignored, neither true nor false).
  detect(2, 1, [6, 62, 30, 62, 30, 90, 6, 90], 0.8)
  detect(2, 1, [25, 65, 44, 65, 44, 94, 25, 94], 0.75)
  detect(5, 2, [58, 52, 80, 52, 80, 68, 58, 68], 0.7)
  # False positives: anywhere, on an image without objects, of a category without ground truth.
  for image_id, h, w in IMAGES:
    for _ in range(2 if image_id != 3 else 0):
      cx, cy = rng.uniform(10, w - 10), rng.uniform(10, h - 10)
      category = int(rng.choice([1, 2, 3, 4]))
      detect(image_id, category, _polygon(rng, cx, cy, rng.uniform(3, 20), rng.uniform(3, 20)),
             float(rng.uniform(0.05, 0.6)))
  detect(1, 99, _polygon(rng, 40, 40, 30, 25), 0.9)  # category 99 is not in the annotations
  ground_truth = {
      'info': {'description': f'tools/make_eval_golden.py (seed {seed})'}, 'licenses': [],
      'images': [{'id': i, 'height': h, 'width': w, 'file_name': f'{i:012d}.png'}
                 for i, h, w in IMAGES],
      'annotations': annotations, 'categories': CATEGORIES}
  return ground_truth, results


def pycocotools_stats(ground_truth, results, renumber: bool = True) -> dict[str, float]:
  """pycocotools' 12 stats per IoU type, ``{'bbox/AP': ..., 'segm/ARl': ...}``."""
  gt = copy.deepcopy(ground_truth)
  if renumber:
    for i, ann in enumerate(gt['annotations']):
      ann['id'] = i + 1
  stats = {}
  with contextlib.redirect_stdout(io.StringIO()):
    index = COCO()
    index.dataset = gt
    index.createIndex()
    detections = index.loadRes(copy.deepcopy(results))
    for iou_type in ('bbox', 'segm'):
      evaluator = COCOeval(index, detections, iouType=iou_type)
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
      stats.update({f'{iou_type}/{n}': float(v) for n, v in zip(STAT_NAMES, evaluator.stats)})
  return stats


def main() -> None:
  ground_truth, results = make_case()
  expected = pycocotools_stats(ground_truth, results)
  as_given = pycocotools_stats(ground_truth, results, renumber=False)
  assert expected != as_given, 'the id-0 annotation must be matched for the case to show the trap'
  OUT.mkdir(parents=True, exist_ok=True)
  with open(OUT / 'instances.json', 'w') as f:
    json.dump(ground_truth, f, separators=(',', ':'))
  with open(OUT / 'results.json', 'w') as f:
    json.dump(results, f, separators=(',', ':'))
  with open(OUT / 'expected_stats.json', 'w') as f:
    json.dump({'made_by': 'tools/make_eval_golden.py', 'seed': SEED,
               'pycocotools': importlib.metadata.version('pycocotools'),
               'stats': expected, 'stats_with_id_0': as_given}, f, indent=1)
    f.write('\n')
  for name in ('instances.json', 'results.json', 'expected_stats.json'):
    print(f'{OUT / name}: {(OUT / name).stat().st_size} bytes')
  print(f"{len(ground_truth['annotations'])} annotations, {len(results)} results; bbox AP "
        f"{expected['bbox/AP']:.4f} (id 0 as given: {as_given['bbox/AP']:.4f}), segm AP "
        f"{expected['segm/AP']:.4f} (id 0 as given: {as_given['segm/AP']:.4f})")


if __name__ == '__main__':
  main()
