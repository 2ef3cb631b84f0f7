"""Fixtures of the evaluation tests: the committed golden case (tools/make_eval_golden.py) and
coco_sample's annotations with deterministic perturbed-ground-truth results (no TFDS needed)."""

import copy
import json
import pathlib

import numpy as np
import pytest
from pycocotools import mask as mask_util

HERE = pathlib.Path(__file__).resolve().parent
GOLDENS = HERE / 'goldens'
SAMPLE_JSON = HERE.parents[0] / 'data' / 'coco_sample' / 'annotations' / 'instances_val2017.json'


@pytest.fixture(scope='session')
def golden():
  """(ground truth dict, results list, expected {'bbox/AP': ...}, the whole expected file)."""
  with open(GOLDENS / 'instances.json') as f:
    ground_truth = json.load(f)
  with open(GOLDENS / 'results.json') as f:
    results = json.load(f)
  with open(GOLDENS / 'expected_stats.json') as f:
    expected = json.load(f)
  return ground_truth, results, expected['stats'], expected


def _perturbed_results(ground_truth, seed=0, copies=3, false_positives=4):
  """Each non-crowd object found `copies` times (box jittered, the mask the jittered box
  rasterised, the category sometimes wrong) plus false positives per image: RLE masks."""
  rng = np.random.default_rng(seed)
  images = {im['id']: im for im in ground_truth['images']}
  categories = [c['id'] for c in ground_truth['categories']]
  results = []

  def add(image_id, category_id, box, score):
    im = images[image_id]
    box = np.clip(box, 0, [im['width'], im['height'], im['width'], im['height']])
    rle = mask_util.frPyObjects(np.asarray([box], np.float64), im['height'], im['width'])[0]
    results.append({'image_id': image_id, 'category_id': int(category_id),
                    'bbox': [round(float(v), 2) for v in box], 'score': round(float(score), 4),
                    'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode()}})

  for ann in ground_truth['annotations']:
    if ann['iscrowd']:
      continue
    x, y, w, h = ann['bbox']
    for _ in range(copies):
      jitter = rng.normal(0, 0.1, 4)
      box = [x + jitter[0] * w, y + jitter[1] * h, w * (1 + jitter[2]), h * (1 + jitter[3])]
      category = ann['category_id'] if rng.random() > 0.1 else rng.choice(categories)
      add(ann['image_id'], category, box, rng.random())
  for im in ground_truth['images']:
    for _ in range(false_positives):
      w, h = rng.uniform(5, im['width'] / 2), rng.uniform(5, im['height'] / 2)
      add(im['id'], rng.choice(categories),
          [rng.uniform(0, im['width'] - w), rng.uniform(0, im['height'] - h), w, h],
          rng.random() * 0.5)
  return results


@pytest.fixture(scope='session')
def sample_case():
  """(coco_sample's annotation dict, perturbed-ground-truth results)."""
  with open(SAMPLE_JSON) as f:
    ground_truth = json.load(f)
  return ground_truth, _perturbed_results(ground_truth)


@pytest.fixture
def fresh():
  """Deep copies, so that a test may edit its case."""
  return copy.deepcopy
