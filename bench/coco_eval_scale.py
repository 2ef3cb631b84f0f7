"""COCO evaluation at the scale of COCO val2017: both engines, from results files to metrics.

Makes 5,000 synthetic images with COCO val2017's statistics, writes the annotation and results
JSON files, then runs each engine of `maskrcnn_jax.evaluation.coco` (``--engines``) in its own
subprocess, the evaluate command's path: read both files, index the ground truth
(`coco.index_ground_truth`), `coco.coco_metrics` for bbox and segm. It prints wall time per phase,
the process's peak resident memory (``getrusage`` maxrss), the APs and the largest difference of
the 24 stats from the first engine's:

  .venv/bin/python bench/coco_eval_scale.py                   # 5,000 images (minutes)
  .venv/bin/python bench/coco_eval_scale.py --num_images 50   # smoke run (seconds)

The synthetic case (``--seed``):
* image sizes: COCO's mix, mostly 640 on the long side (640x480, 640x427, portrait, ...);
* instances per image: negative binomial of mean 7.3 (COCO val: 36,781 on 5,000 images, a long
  tail, ~1% of images without any); ~1% crowd regions (uncompressed RLE, as COCO stores them);
* classes: the 80 COCO category ids, person ~30% of the instances, the rest decaying (Zipf);
* areas: small / medium / large (COCO's 32**2, 96**2 bounds) in COCO's proportions, 41% / 34% /
  24%, log-uniform inside each range, aspect ratios log-normal;
* ground-truth masks: polygons (ellipse-like, 16 vertices);
* results: ~100 detections per image, as Mask R-CNN outputs (``detections_per_image``): each
  object found once or twice with jittered box and polygon (some missed), near misses, false
  positives of random classes with lower scores; masks compressed RLE, boxes rounded as
  `coco.detections_to_results` writes them.

Needs the project's venv only (pycocotools and faster-coco-eval from requirements.txt); the files
go to a temporary directory unless ``--workdir`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from pycocotools import mask as mask_util

from machine import cpu_model  # bench/, on sys.path as this script's folder

REPO = pathlib.Path(__file__).resolve().parents[1]
# The 80 category ids of COCO 2017 detection (1..90 with gaps).
CATEGORY_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
                24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47,
                48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70,
                72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]
# (height, width, share): COCO's commonest sizes; the rest long side 640, short side 320-640.
IMAGE_SIZES = [(480, 640, 0.30), (427, 640, 0.18), (640, 480, 0.08), (640, 427, 0.07),
               (426, 640, 0.06), (424, 640, 0.05), (425, 640, 0.04), (612, 612, 0.02)]
AREA_SHARES = (0.41, 0.34, 0.24)   # small, medium, large (COCO val2017)
AREA_RANGES = ((8.0, 32.0 ** 2), (32.0 ** 2, 96.0 ** 2), (96.0 ** 2, None))
INSTANCES_MEAN = 7.3
CROWD_SHARE = 0.01
DETECTIONS_PER_IMAGE = 100
VERTICES = 16
# Polygon area / box area of `_polygon`: pi / 4 * E[r**2], r ~ U(0.85, 1).
POLYGON_FILL = np.pi / 4 * (1 - 0.85 ** 3) / (3 * 0.15)


def _class_shares() -> np.ndarray:
  rest = 1.0 / np.arange(1, len(CATEGORY_IDS)) ** 0.8
  return np.concatenate([[0.30], 0.70 * rest / rest.sum()])


def _image_size(rng) -> tuple[int, int]:
  shares = np.array([s for _, _, s in IMAGE_SIZES])
  k = rng.choice(len(IMAGE_SIZES) + 1, p=np.append(shares, 1 - shares.sum()))
  if k < len(IMAGE_SIZES):
    return IMAGE_SIZES[k][:2]
  short = int(rng.integers(320, 641))
  return (short, 640) if rng.random() < 0.75 else (640, short)


def _box(rng, h, w) -> np.ndarray:
  """An [x, y, w, h] box that fits the image, whose inscribed `_polygon` has an area of COCO's
  mix (COCO's area ranges are those of the masks)."""
  low, high = AREA_RANGES[rng.choice(3, p=np.array(AREA_SHARES) / sum(AREA_SHARES))]
  high = min(high or 0.4 * h * w, 0.4 * h * w)
  area = float(np.exp(rng.uniform(np.log(low), np.log(max(high, low * 1.01))))) / POLYGON_FILL
  aspect = float(np.exp(rng.normal(0, 0.5)))     # width / height
  bw = min(np.sqrt(area * aspect), w - 1.0)
  bh = min(area / bw, h - 1.0)
  return np.array([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh])


def _polygon(rng, box, jitter=0.0) -> list[float]:
  """An ellipse-like polygon inscribed in the [x, y, w, h] box: flat [x0, y0, ...]."""
  x, y, bw, bh = box
  angles = (np.arange(VERTICES) + rng.uniform(-0.3, 0.3, VERTICES)) * 2 * np.pi / VERTICES
  radius = rng.uniform(0.85, 1.0, VERTICES) * (1 + rng.normal(0, jitter, VERTICES))
  xs = x + bw / 2 * (1 + radius * np.cos(angles))
  ys = y + bh / 2 * (1 + radius * np.sin(angles))
  return [round(float(v), 2) for xy in zip(xs, ys) for v in xy]


def _polygon_area(polygon) -> float:
  xs, ys = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
  return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _uncompressed_rle(box, h, w) -> dict:
  """COCO's crowd format: column-major run lengths of an elliptic region."""
  x, y, bw, bh = box
  yy, xx = np.mgrid[:h, :w]
  inside = (((xx + 0.5 - x - bw / 2) / (bw / 2)) ** 2
            + ((yy + 0.5 - y - bh / 2) / (bh / 2)) ** 2 <= 1)
  flat = inside.T.reshape(-1).astype(np.int8)
  changes = np.flatnonzero(np.diff(flat)) + 1
  edges = np.concatenate([[0], changes, [flat.size]])
  runs = np.diff(edges).tolist()
  if flat[0]:
    runs = [0] + runs
  return {'size': [h, w], 'counts': [int(r) for r in runs]}


def make_case(num_images: int, seed: int = 0) -> tuple[dict, list]:
  """(COCO annotation dict, results list) of `num_images` synthetic images."""
  rng = np.random.default_rng(seed)
  shares = _class_shares()
  images, annotations, results = [], [], []
  for image_index in range(num_images):
    image_id = 1000 + image_index
    h, w = _image_size(rng)
    images.append({'id': image_id, 'height': h, 'width': w, 'file_name': f'{image_id:012d}.jpg'})
    count = int(rng.negative_binomial(3, 3 / (3 + INSTANCES_MEAN)))
    objects = []
    for _ in range(count):
      category = int(CATEGORY_IDS[rng.choice(len(CATEGORY_IDS), p=shares)])
      box = _box(rng, h, w)
      crowd = rng.random() < CROWD_SHARE
      if crowd:
        segmentation = _uncompressed_rle(box, h, w)
        area = float(np.sum(segmentation['counts'][1::2]))
      else:
        segmentation = [_polygon(rng, box)]
        area = _polygon_area(segmentation[0])
        objects.append((category, box))
      annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                          'category_id': category, 'iscrowd': int(crowd), 'area': area,
                          'bbox': [round(float(v), 2) for v in box],
                          'segmentation': segmentation})
    # ~100 detections: found objects (a duplicate now and then), near misses, false positives.
    boxes, scores, categories, jitters = [], [], [], []
    for category, box in objects:
      for found in range(int(rng.choice([0, 1, 1, 1, 2], p=[0.15, 0.3, 0.25, 0.15, 0.15]))):
        quality = rng.uniform(0.02, 0.15 if found == 0 else 0.3)
        x, y, bw, bh = box
        noise = rng.normal(0, quality, 4)
        boxes.append([x + noise[0] * bw, y + noise[1] * bh, bw * np.exp(noise[2]),
                      bh * np.exp(noise[3])])
        scores.append(float(np.clip(rng.beta(5, 2) - quality, 0.05, 1.0)))
        categories.append(category if rng.random() > 0.05 else int(rng.choice(CATEGORY_IDS)))
        jitters.append(quality)
    present = [c for c, _ in objects] or [1]
    while len(boxes) < DETECTIONS_PER_IMAGE:
      boxes.append(_box(rng, h, w))
      scores.append(float(rng.uniform(0.05, 0.5) ** 2 + 0.05))
      categories.append(int(rng.choice(present)) if rng.random() < 0.5
                        else int(CATEGORY_IDS[rng.choice(len(CATEGORY_IDS), p=shares)]))
      jitters.append(0.1)
    boxes = np.clip(np.asarray(boxes[:DETECTIONS_PER_IMAGE], np.float64), 0, None)
    boxes[:, 2] = np.minimum(boxes[:, 2], w - boxes[:, 0])
    boxes[:, 3] = np.minimum(boxes[:, 3], h - boxes[:, 1])
    polygons = [_polygon(rng, b, jitter=j) for b, j in zip(boxes, jitters)]
    rles = mask_util.frPyObjects(polygons, h, w)
    for box, score, category, rle in zip(boxes, scores, categories, rles):
      results.append({'image_id': image_id, 'category_id': category,
                      'bbox': [round(float(v), 3) for v in box], 'score': round(score, 5),
                      'segmentation': {'size': [h, w], 'counts': rle['counts'].decode('ascii')}})
  categories = [{'id': c, 'name': f'class{c}', 'supercategory': 'thing'} for c in CATEGORY_IDS]
  ground_truth = {'info': {'description': f'bench/coco_eval_scale.py synthetic (seed {seed})'},
                  'licenses': [], 'images': images, 'annotations': annotations,
                  'categories': categories}
  return ground_truth, results


def worker(engine: str, annotations: str, results_path: str) -> dict:
  """One engine, the evaluate command's path; what the parent prints."""
  from maskrcnn_jax import evaluate  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.evaluation import coco  # pylint: disable=import-outside-toplevel
  times = {}
  start = time.perf_counter()
  ground_truth = evaluate.read_json(annotations)
  results = evaluate.read_json(results_path)
  times['read'] = time.perf_counter() - start
  start = time.perf_counter()
  indexed = coco.index_ground_truth(ground_truth, engine)
  times['index'] = time.perf_counter() - start
  start = time.perf_counter()
  metrics = coco.coco_metrics(indexed, results)  # bbox and segm, one loadRes (the loop's call)
  times['metrics'] = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
  return {'engine': engine, 'times': times, 'peak_rss_mib': peak, 'metrics': metrics}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=5000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--engines', default='pycocotools,faster_coco_eval')
  parser.add_argument('--workdir', help='Keep the JSON files here (default: a temporary dir).')
  parser.add_argument('--worker', help=argparse.SUPPRESS)  # engine, in the subprocess
  parser.add_argument('--annotations', help=argparse.SUPPRESS)
  parser.add_argument('--results', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.annotations, args.results)))
    return

  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(args.workdir or tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ground_truth, results = make_case(args.num_images, args.seed)
    made = time.perf_counter() - start
    annotations_path, results_path = workdir / 'instances.json', workdir / 'results.json'
    with open(annotations_path, 'w') as f:
      json.dump(ground_truth, f)
    with open(results_path, 'w') as f:
      json.dump(results, f)
    anns = ground_truth['annotations']
    areas = np.array([a['area'] for a in anns if not a['iscrowd']])
    print(f'{args.num_images} images, {len(anns)} annotations '
          f'({len(anns) / args.num_images:.2f} per image, {sum(a["iscrowd"] for a in anns)} '
          f'crowd; small/medium/large {np.mean(areas < 32 ** 2):.0%}/'
          f'{np.mean((areas >= 32 ** 2) & (areas < 96 ** 2)):.0%}/'
          f'{np.mean(areas >= 96 ** 2):.0%}), '
          f'{len(results)} results ({len(results) / args.num_images:.0f} per image); made in '
          f'{made:.0f} s; files {annotations_path.stat().st_size / 2 ** 20:.1f} MiB + '
          f'{results_path.stat().st_size / 2 ** 20:.1f} MiB')
    del ground_truth, results, anns
    print(f'{os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}')
    rows = []
    for engine in args.engines.split(','):
      done = subprocess.run(
          [sys.executable, __file__, f'--worker={engine}', f'--annotations={annotations_path}',
           f'--results={results_path}'], capture_output=True, text=True, check=False,
          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
      if done.returncode != 0:
        sys.exit(f'{engine} failed:\n{done.stderr}')
      rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

  reference = rows[0]
  header = ('| engine | read JSON s | index GT s | bbox + segm s | index + metrics s | '
            'peak RSS MiB | bbox AP | segm AP | max diff of the 24 stats | speed-up |')
  print(header)
  print('|' + '---|' * (header.count('|') - 1))
  base = reference['times']['index'] + reference['times']['metrics']
  for row in rows:
    t = row['times']
    total = t['index'] + t['metrics']
    diff = max(abs(row['metrics'][k] - reference['metrics'][k]) for k in reference['metrics'])
    print(f"| {row['engine']} | {t['read']:.1f} | {t['index']:.1f} | {t['metrics']:.1f} | "
          f"{total:.1f} | {row['peak_rss_mib']:.0f} | {row['metrics']['bbox/AP']:.4f} | "
          f"{row['metrics']['segm/AP']:.4f} | {diff:.1e} | {base / total:.2f}x |")


if __name__ == '__main__':
  main()
