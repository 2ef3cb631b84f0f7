"""The two COCOeval engines: faster-coco-eval gives pycocotools' 12 + 12 stats; a ground truth
indexed once serves many evaluations; engine errors; empty results and image subsets.

The engines agree to ~1e-16, not bit for bit: pycocotools' accumulate divides tp by
``tp + fp + np.spacing(1)`` and faster-coco-eval's C++ by ``tp + fp``, so a precision of 1 is
0.9999999999999998 in pycocotools; recall and scores are identical.
"""

import copy

import numpy as np
import pytest
from pycocotools import mask as mask_util

from maskrcnn_jax.evaluation import coco
from maskrcnn_jax.evaluation import evaluator
from maskrcnn_jax.settings import ConfigError

TOL = 1e-6


def _both(ground_truth, results, **kwargs):
  return [coco.coco_metrics(ground_truth, results, engine=e, **kwargs) for e in coco.ENGINES]


def _assert_same(reference, faster, keys=coco.METRIC_KEYS):
  assert list(reference) == list(faster) == list(keys)
  differences = {k: abs(reference[k] - faster[k]) for k in keys}
  assert max(differences.values()) <= TOL, differences


def test_faster_coco_eval_equals_pycocotools_on_the_golden_case(golden):
  ground_truth, results, expected, _ = golden
  reference, faster = _both(ground_truth, results)
  _assert_same(reference, faster)
  assert max(abs(reference[k] - faster[k]) for k in coco.METRIC_KEYS) < 1e-15


def test_faster_coco_eval_equals_pycocotools_on_coco_sample(sample_case):
  ground_truth, results = sample_case
  reference, faster = _both(ground_truth, results)
  _assert_same(reference, faster)
  # The case is not trivial: partial scores, every area range present.
  assert 0.1 < reference['bbox/AP'] < 0.9 and 0.1 < reference['segm/AP'] < 0.9
  assert min(reference.values()) >= 0
  # Annotation ids of coco_sample are large and sparse; 0-based ones give the same stats.
  zero_based = copy.deepcopy(ground_truth)
  for i, ann in enumerate(zero_based['annotations']):
    ann['id'] = i
  for metrics in _both(zero_based, results):
    _assert_same(reference, metrics)


def test_raw_precision_arrays_differ_only_by_pycocotools_epsilon(golden):
  """Where the two differ and why: the precision curves, cell by cell."""
  ground_truth, results, _, _ = golden
  evals = {}
  for engine in coco.ENGINES:
    indexed = coco.index_ground_truth(ground_truth, engine)
    # pylint: disable-next=protected-access
    evaluation = coco._cocoeval(indexed, coco._load_results(indexed, results), 'segm')
    evaluation.evaluate()
    evaluation.accumulate()
    evals[engine] = evaluation.eval
  reference, faster = evals['pycocotools'], evals['faster_coco_eval']
  np.testing.assert_array_equal(reference['recall'], faster['recall'])
  np.testing.assert_array_equal(reference['scores'], faster['scores'])
  p, q = np.asarray(reference['precision']), np.asarray(faster['precision'])
  assert (p == -1).sum() == (q == -1).sum()
  assert np.abs(p - q).max() <= 2 * np.spacing(1)


@pytest.mark.parametrize('engine', coco.ENGINES)
def test_ground_truth_indexed_once_serves_many_evaluations(golden, sample_case, engine):
  ground_truth, results, expected, _ = golden
  before = copy.deepcopy(ground_truth)
  results_before = copy.deepcopy(results)
  indexed = coco.index_ground_truth(ground_truth, engine)
  assert indexed.engine == engine and indexed.image_ids == (1, 2, 3, 4, 5)
  first = coco.coco_metrics(indexed, results)
  assert coco.coco_metrics(indexed, results[: len(results) // 2]) != first
  assert coco.coco_metrics(indexed, []) != first
  assert coco.coco_metrics(indexed, results, iou_types=('segm',)) == {
      k: v for k, v in first.items() if k.startswith('segm/')}
  assert coco.coco_metrics(indexed, results) == first
  assert max(abs(first[k] - expected[k]) for k in expected) <= 1e-9
  # Neither the caller's ground truth nor its results were modified.
  assert ground_truth == before and results == results_before


def test_engine_errors(golden):
  ground_truth, results, _, _ = golden
  with pytest.raises(ConfigError, match=r"'eval.engine' = 'cocoapi'.*pycocotools"):
    coco.coco_metrics(ground_truth, results, engine='cocoapi')
  with pytest.raises(ConfigError, match="'eval.engine'"):
    coco.index_ground_truth(ground_truth, 'fast')
  with pytest.raises(ConfigError, match="'eval.engine'"):
    coco.check_engine('')
  assert coco.check_engine('faster_coco_eval') == 'faster_coco_eval'
  indexed = coco.index_ground_truth(ground_truth, 'faster_coco_eval')
  with pytest.raises(ValueError, match="indexed by 'faster_coco_eval'"):
    coco.coco_metrics(indexed, results, engine='pycocotools')
  with pytest.raises(ValueError, match='iou_types'):
    coco.coco_metrics(indexed, results, iou_types=('keypoints',))
  with pytest.raises(ValueError, match='iou_types'):
    coco.coco_metrics(indexed, results, iou_types='bbox')


def test_empty_results_are_cocoevals_empty_detection_set(golden, sample_case):
  """0 where there are objects, -1 for an area range without any (both engines)."""
  for ground_truth in (golden[0], sample_case[0]):
    reference, faster = _both(ground_truth, [])
    assert reference == faster == {k: 0.0 for k in coco.METRIC_KEYS}
  no_large = copy.deepcopy(golden[0])
  no_large['annotations'] = [a for a in no_large['annotations'] if a['area'] < 96 ** 2]
  reference, faster = _both(no_large, [])
  assert reference == faster
  assert reference['bbox/APl'] == reference['segm/ARl'] == -1.0
  assert reference['bbox/AP'] == reference['segm/APs'] == 0.0


def test_images_without_results_and_without_objects(golden):
  """Image 3 has objects and no result: 0. Image 4 has no object: -1 (nothing to find)."""
  ground_truth, results, _, _ = golden
  assert not [r for r in results if r['image_id'] == 3]
  for metrics in _both(ground_truth, results, image_ids=[3]):
    assert metrics['bbox/AP'] == metrics['segm/AR100'] == 0.0
  for metrics in _both(ground_truth, results, image_ids=[4]):
    assert set(metrics.values()) == {-1.0}


def test_detections_on_crowd_regions_are_ignored(golden):
  """A detection matched to a crowd region is neither a true nor a false positive. It still
  takes one of the image's maxDets slots (COCOeval keeps the top maxDets of an image and category
  before matching), so only AR1 may change when such detections are removed."""
  ground_truth, results, _, _ = golden
  crowds = [a for a in ground_truth['annotations'] if a['iscrowd']]
  on_crowd = []
  for i, r in enumerate(results):
    for a in crowds:
      if (r['image_id'], r['category_id']) == (a['image_id'], a['category_id']):
        # iscrowd=1: the fraction of the detection inside the region.
        if mask_util.iou([r['bbox']], [a['bbox']], [1])[0, 0] > 0.5:
          on_crowd.append(i)
  assert len(on_crowd) == 3
  kept = [r for i, r in enumerate(results) if i not in on_crowd]
  for engine in coco.ENGINES:
    with_them = coco.coco_metrics(ground_truth, results, engine=engine)
    without = coco.coco_metrics(ground_truth, kept, engine=engine)
    assert {k for k in with_them if with_them[k] != without[k]} <= {'bbox/AR1', 'segm/AR1'}
    assert with_them['segm/AP'] == without['segm/AP'] > 0
    # As ordinary objects the same regions count: as misses, their detections as matches or
    # false positives.
    not_crowd = copy.deepcopy(ground_truth)
    for a in not_crowd['annotations']:
      a['iscrowd'] = 0
    assert coco.coco_metrics(not_crowd, results, engine=engine) != with_them


class _FakeSource:
  """The part of `maskrcnn_jax.data.pipeline.Source` that the ground truth reads."""

  def __init__(self, records, categories):
    self.records, self.metadata = records, {'categories': categories}

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


@pytest.mark.parametrize('engine', coco.ENGINES)
def test_split_ground_truth(engine):
  rle = mask_util.encode(np.asfortranarray(np.pad(np.ones((4, 6), np.uint8), ((2, 4), (1, 3)))))
  record = {'image_id': 7, 'height': 10, 'width': 10, 'file_name': b'7.png',
            'objects': {'bbox': np.array([[0.2, 0.1, 0.6, 0.7]]), 'category_id': [3],
                        'is_crowd': [False], 'area': [24.0], 'mask': [rle['counts']]}}
  source = _FakeSource([record, dict(record, image_id=8)], [{'id': 3, 'name': 'c'}])
  indexed = evaluator.split_ground_truth(source, 1, engine)
  assert indexed.engine == engine and indexed.image_ids == (7,)
  result = {'image_id': 7, 'category_id': 3, 'bbox': [1, 2, 6, 4], 'score': 0.9,
            'segmentation': {'size': [10, 10], 'counts': rle['counts'].decode()}}
  metrics = coco.coco_metrics(indexed, [result])
  assert metrics['bbox/AP'] == pytest.approx(1.0) and metrics['segm/AP'] == pytest.approx(1.0)
  with pytest.raises(ConfigError, match="'eval.engine'"):
    evaluator.split_ground_truth(source, 1, 'nope')


@pytest.mark.parametrize('engine', coco.ENGINES)
def test_evaluate_split_with_a_ground_truth_built_once(tmp_path, engine):
  """The loop's path: the ground truth indexed once, two evaluations, their metrics lines."""
  rle = mask_util.encode(np.asfortranarray(np.pad(np.ones((4, 6), np.uint8), ((2, 4), (1, 3)))))
  record = {'image_id': 7, 'height': 10, 'width': 10, 'file_name': '7.png',
            'objects': {'bbox': np.array([[0.2, 0.1, 0.6, 0.7]]), 'category_id': [3],
                        'is_crowd': [False], 'area': [24.0], 'mask': [rle['counts']]}}
  source = _FakeSource([record], [{'id': 3, 'name': 'c'}])
  source.metadata['class_index_to_category_id'] = {'1': 3}
  ground_truth = evaluator.split_ground_truth(source, -1, engine)
  batch = {'images': np.zeros((1, 16, 16, 3), np.uint8), 'image_sizes': np.array([[10, 10]]),
           'image_ids': np.array([7]), 'original_sizes': np.array([[10, 10]]),
           'scales': np.array([1.0], np.float32), 'example_valid': np.array([True])}

  def infer_fn(box):
    def infer(variables, inputs):
      del variables, inputs
      return {'boxes': np.array([[[box]]], np.float32), 'scores': np.array([[[0.9]]]),
              'classes': np.array([[[1]]], np.int32), 'masks': np.ones((1, 1, 1, 28, 28)),
              'valid': np.array([[[True]]])}
    return infer

  lines = [evaluator.evaluate_split(source, [batch], infer_fn=infer_fn(box), variables=None,
                                    num_devices=1, num_examples=-1, workdir=str(tmp_path),
                                    step=step, ground_truth=ground_truth)
           for step, box in ((10, [1, 2, 7, 6]), (20, [5, 5, 10, 10]))]
  assert lines[0]['step'] == 10 and lines[0]['bbox/AP'] == pytest.approx(1.0)
  assert lines[0]['segm/AP'] == pytest.approx(1.0)
  assert lines[1]['step'] == 20 and lines[1]['bbox/AP'] == 0.0
  assert evaluator.evaluated_steps(str(tmp_path)) == {10, 20}
  assert (tmp_path / 'coco_results_step20.json').exists()
  with pytest.raises(ValueError, match='indexed by'):
    evaluator.evaluate_split(source, [batch], infer_fn=infer_fn([1, 2, 7, 6]), variables=None,
                             num_devices=1, num_examples=-1, workdir=str(tmp_path), step=30,
                             ground_truth=ground_truth,
                             engine=[e for e in coco.ENGINES if e != engine][0])
