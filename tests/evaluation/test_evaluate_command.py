"""The evaluate command's inputs: every unusable file is one line ``error: FILE: ...`` and exit
status 1; empty results, box-only results and unknown categories are scored as COCOeval does."""

import json
import sys

import pytest

from maskrcnn_jax import evaluate
from maskrcnn_jax.evaluation import coco


def _write(tmp_path, name, value):
  path = tmp_path / name
  path.write_text(value if isinstance(value, str) else json.dumps(value))
  return str(path)


def _run(tmp_path, capsys, ground_truth, results, *extra):
  """(exit status, stdout, stderr, metrics written or None)."""
  output = tmp_path / 'metrics.json'
  if output.exists():
    output.unlink()
  argv = [f'--annotations={_write(tmp_path, "gt.json", ground_truth)}',
          f'--results={_write(tmp_path, "results.json", results)}', f'--output={output}',
          *extra]
  status = evaluate.main(argv)
  out, err = capsys.readouterr()
  metrics = json.loads(output.read_text()) if output.exists() else None
  return status, out, err, metrics


def _one_error_line(err, *fragments):
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def test_results_for_an_image_not_in_the_annotations(golden, fresh, tmp_path, capsys):
  ground_truth, results, _, _ = golden
  results = fresh(results)
  results[5]['image_id'] = 424242
  status, _, err, metrics = _run(tmp_path, capsys, ground_truth, results)
  assert status == 1 and metrics is None
  _one_error_line(err, 'results.json', 'result 5', 'image_id 424242', 'not an image')
  results[7]['image_id'] = 515151
  _, _, err, _ = _run(tmp_path, capsys, ground_truth, results)
  _one_error_line(err, 'image_id 424242', '2 such image ids: 424242, 515151')


def test_empty_results_list(golden, tmp_path, capsys):
  status, out, _, metrics = _run(tmp_path, capsys, golden[0], [])
  assert status == 0 and metrics == {k: 0.0 for k in coco.METRIC_KEYS}
  assert '0 results on 0 of 5 images' in out


def test_results_without_masks(golden, fresh, tmp_path, capsys):
  ground_truth, results, expected, _ = golden
  boxes_only = [{k: v for k, v in r.items() if k != 'segmentation'} for r in fresh(results)]
  status, _, err, _ = _run(tmp_path, capsys, ground_truth, boxes_only)
  assert status == 1
  _one_error_line(err, 'results.json', 'result 0', "no 'segmentation'", 'segm')
  # Box-only results score bbox.
  status, _, _, metrics = _run(tmp_path, capsys, ground_truth, boxes_only, '--iou_types=bbox')
  assert status == 0
  assert metrics == pytest.approx({k: v for k, v in expected.items() if k.startswith('bbox/')},
                                  abs=1e-9)
  # Masks on some results only.
  some = fresh(results)
  del some[3]['segmentation']
  _, _, err, _ = _run(tmp_path, capsys, ground_truth, some)
  _one_error_line(err, 'result 3', "no 'segmentation'")


def test_results_without_boxes_take_them_from_the_masks(golden, fresh, tmp_path, capsys):
  """pycocotools' rule: results with masks and no box anywhere are boxed by toBbox."""
  ground_truth, results, _, _ = golden
  masks_only = [{k: v for k, v in r.items() if k != 'bbox'} for r in fresh(results)]
  status, _, _, metrics = _run(tmp_path, capsys, ground_truth, masks_only)
  assert status == 0 and set(metrics) == set(coco.METRIC_KEYS)
  mixed = fresh(results)
  del mixed[2]['bbox']
  status, _, err, _ = _run(tmp_path, capsys, ground_truth, mixed)
  assert status == 1
  _one_error_line(err, 'result 2', "has no 'bbox'", 'in every result or in none')


@pytest.mark.parametrize('text, fragment', [
    ('{"images": [', 'not valid JSON'),
    ('[{"image_id": 1,}]', 'not valid JSON'),
    ('', 'not valid JSON (Expecting value at line 1 column 1)'),
    (b'\xff\xfe', 'not UTF-8'),
])
def test_bad_json_files(golden, tmp_path, capsys, text, fragment):
  ground_truth, results, _, _ = golden
  bad = tmp_path / 'bad.json'
  if isinstance(text, bytes):
    bad.write_bytes(text)
  else:
    bad.write_text(text)
  for argv in ([f'--annotations={bad}', f'--results={_write(tmp_path, "r.json", results)}'],
               [f'--annotations={_write(tmp_path, "g.json", ground_truth)}', f'--results={bad}']):
    assert evaluate.main(argv) == 1
    _one_error_line(capsys.readouterr().err, f'{bad}: ', fragment)


def test_missing_files_and_wrong_shapes(golden, tmp_path, capsys):
  ground_truth, results, _, _ = golden
  missing = tmp_path / 'nowhere.json'
  assert evaluate.main([f'--annotations={missing}', '--results=r.json']) == 1
  _one_error_line(capsys.readouterr().err, f'{missing}: no such file')
  # Annotations given as results, results as annotations.
  status, _, err, _ = _run(tmp_path, capsys, ground_truth, ground_truth)
  assert status == 1
  _one_error_line(err, 'results.json: must be a list', 'not a dict')
  status, _, err, _ = _run(tmp_path, capsys, results, results)
  assert status == 1
  _one_error_line(err, 'gt.json: must be a COCO annotation object', 'not a list')
  # Annotations that COCOeval cannot read.
  broken = json.loads(json.dumps(ground_truth))
  del broken['annotations'][4]['iscrowd']
  _, _, err, _ = _run(tmp_path, capsys, broken, results)
  _one_error_line(err, 'gt.json: annotation 4', "no 'iscrowd'")
  broken = json.loads(json.dumps(ground_truth))
  del broken['annotations'][4]['segmentation']
  _, _, err, _ = _run(tmp_path, capsys, broken, results)
  _one_error_line(err, 'gt.json', "no 'segmentation'", '--iou_types=bbox')
  status, _, _, metrics = _run(tmp_path, capsys, broken, results, '--iou_types=bbox')
  assert status == 0 and len(metrics) == 12
  broken = json.loads(json.dumps(ground_truth))
  broken['images'].append(dict(broken['images'][0]))
  _, _, err, _ = _run(tmp_path, capsys, broken, results)
  _one_error_line(err, 'gt.json: image id 1 appears twice')


def test_bad_results_entries(golden, fresh, tmp_path, capsys):
  ground_truth, results, _, _ = golden
  cases = [
      (lambda r: r[4].update(segmentation={'size': [10, 10], 'counts': 'abc'}),
       ['result 4', 'mask size [10, 10] is not the image size']),
      (lambda r: r[1].pop('score'), ["result 1 has no 'score'"]),
      (lambda r: r[1].update(score=float('nan')), ['result 1', 'not a finite number']),
      (lambda r: r[6].update(bbox=[1, 2, 3]), ['result 6', 'is not [x, y, width, height]']),
      (lambda r: r.append('nonsense'), ['is not an object']),
      (lambda r: r[0].update(image_id=[1]), ['result 0: image_id [1] is not an image']),
      (lambda r: r[0].update(category_id='1'), ['result 0', 'category_id']),
  ]
  for edit, fragments in cases:
    broken = fresh(results)
    edit(broken)
    status, _, err, _ = _run(tmp_path, capsys, ground_truth, broken)
    assert status == 1, fragments
    _one_error_line(err, 'results.json: ', *fragments)


def test_unknown_categories_are_ignored_with_a_warning(golden, fresh, tmp_path, capsys):
  ground_truth, results, expected, _ = golden
  assert any(r['category_id'] == 99 for r in results)
  status, _, err, metrics = _run(tmp_path, capsys, ground_truth, results)
  assert status == 0 and metrics == pytest.approx(expected, abs=1e-9)
  assert err.startswith('warning: 1 results have category ids') and '99' in err
  kept = [r for r in fresh(results) if r['category_id'] != 99]
  assert _run(tmp_path, capsys, ground_truth, kept)[3] == metrics


def test_usage_errors(golden, tmp_path, capsys):
  paths = [f'--annotations={tmp_path / "g.json"}', f'--results={tmp_path / "r.json"}']
  for extra in (['--engine=cocoapi'], ['--iou_types=bbox,keypoints'], ['--iou_types=']):
    with pytest.raises(SystemExit) as raised:
      evaluate.main(paths + extra)
    assert raised.value.code == 2
    assert 'error: argument' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    evaluate.main(['--results=r.json'])


def test_missing_engine_package_is_a_clear_error(golden, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, 'faster_coco_eval', None)  # import raises ImportError
  status, _, err, _ = _run(tmp_path, capsys, golden[0], golden[1], '--engine=faster_coco_eval')
  assert status == 1
  _one_error_line(err, '--engine=faster_coco_eval', 'faster-coco-eval package is not installed')
