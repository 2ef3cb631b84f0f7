"""COCO evaluation: ground truth as detections scores AP 1, coordinate and class mapping back."""

import json
import pathlib

import numpy as np
import pytest

from maskrcnn_jax.evaluation import coco

REPO = pathlib.Path(__file__).resolve().parents[2]
SAMPLE_JSON = REPO / 'tests' / 'data' / 'coco_sample' / 'annotations' / 'instances_val2017.json'


def _gt_as_results(ground_truth):
  """Every non-crowd ground-truth object as a detection of score 1."""
  return [{'image_id': a['image_id'], 'category_id': a['category_id'], 'bbox': a['bbox'],
           'score': 1.0, 'segmentation': a['segmentation']}
          for a in ground_truth['annotations'] if not a['iscrowd']]


def _check_perfect(metrics):
  assert set(metrics) == set(coco.METRIC_KEYS)
  for t in coco.IOU_TYPES:
    for name in ('AP', 'AP50', 'AP75', 'AR100'):
      assert metrics[f'{t}/{name}'] == pytest.approx(1.0), (t, name, metrics)


def test_ground_truth_rebuilt_from_records(sample_source):
  gt = coco.ground_truth_from_source(sample_source)
  with open(SAMPLE_JSON) as f:
    raw = json.load(f)
  assert sorted(i['id'] for i in gt['images']) == sorted(i['id'] for i in raw['images'])
  assert len(gt['annotations']) == len(raw['annotations'])
  assert [a['id'] for a in gt['annotations']] == list(range(1, len(gt['annotations']) + 1))
  raw_boxes = sorted(tuple(np.round(a['bbox'], 1)) for a in raw['annotations'])
  gt_boxes = sorted(tuple(np.round(a['bbox'], 1)) for a in gt['annotations'])
  np.testing.assert_allclose(gt_boxes, raw_boxes, atol=0.11)
  crowd = lambda anns: sum(a['iscrowd'] for a in anns)
  assert crowd(gt['annotations']) == crowd(raw['annotations'])


def test_ground_truth_as_detections_scores_ap_one(sample_source):
  gt = coco.ground_truth_from_source(sample_source)
  _check_perfect(coco.coco_metrics(gt, _gt_as_results(gt)))


def test_annotation_ids_starting_at_zero_do_not_change_the_result(sample_source):
  """pycocotools counts a match with ground-truth id 0 as a miss; coco_metrics renumbers."""
  with open(SAMPLE_JSON) as f:
    raw = json.load(f)
  for i, a in enumerate(raw['annotations']):
    a['id'] = i  # 0-based
  from pycocotools import mask as mask_util
  gt = coco.ground_truth_from_source(sample_source)
  # Detections from the raw JSON's objects (polygons rasterised to RLE).
  images = {im['id']: im for im in raw['images']}
  results = []
  for a in raw['annotations']:
    if a['iscrowd']:
      continue
    im = images[a['image_id']]
    rles = mask_util.frPyObjects(a['segmentation'], im['height'], im['width'])
    rle = mask_util.merge(rles) if isinstance(rles, list) else rles
    results.append({'image_id': a['image_id'], 'category_id': a['category_id'],
                    'bbox': a['bbox'], 'score': 1.0,
                    'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode()}})
  _check_perfect(coco.coco_metrics(raw, results))
  del gt


def test_no_detections_gives_zeros(sample_source):
  gt = coco.ground_truth_from_source(sample_source)
  metrics = coco.coco_metrics(gt, [])
  assert metrics == {k: 0.0 for k in coco.METRIC_KEYS}


def test_detections_mapped_to_original_coordinates_and_category_ids():
  """Canvas boxes / scale, clipped to the original image; class 1 -> category 7; RLE masks."""
  from pycocotools import mask as mask_util
  d = 2
  detections = {
      'boxes': np.array([[[10, 20, 50, 40], [-5, 0, 300, 30]]], np.float32),
      'scores': np.array([[0.9, 0.4]], np.float32),
      'classes': np.array([[1, 2]], np.int32),
      'masks': np.ones((1, d, 28, 28), np.float32),
      'valid': np.array([[True, False]]),
  }
  batch = {'image_ids': np.array([42]), 'original_sizes': np.array([[100, 120]]),
           'scales': np.array([0.5], np.float32), 'example_valid': np.array([True])}
  results = coco.detections_to_results(detections, batch, {1: 7, 2: 9})
  assert len(results) == 1
  r = results[0]
  assert r['image_id'] == 42 and r['category_id'] == 7 and r['score'] == pytest.approx(0.9)
  np.testing.assert_allclose(r['bbox'], [20, 40, 80, 40])
  mask = mask_util.decode(r['segmentation'])
  assert mask.shape == (100, 120)
  assert mask[40:80, 20:100].all() and mask.sum() == 40 * 80
  # Clipping to the original image and skipping padding examples.
  detections['valid'][:] = [[False, True]]
  r = coco.detections_to_results(detections, batch, {1: 7, 2: 9})[0]
  np.testing.assert_allclose(r['bbox'], [0, 0, 120, 60])
  assert r['category_id'] == 9
  batch['example_valid'][:] = False
  assert coco.detections_to_results(detections, batch, {1: 7, 2: 9}) == []


def test_metrics_line(tmp_path):
  path = tmp_path / 'eval_metrics.jsonl'
  metrics = {k: 0.5 for k in coco.METRIC_KEYS}
  coco.append_metrics_line(str(path), 10, metrics)
  coco.append_metrics_line(str(path), 20, metrics)
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  assert [l['step'] for l in lines] == [10, 20]
  assert set(lines[0]) == {'step', *coco.METRIC_KEYS}
