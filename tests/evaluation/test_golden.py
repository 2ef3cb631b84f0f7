"""The evaluate command and both engines against an independent pycocotools run on the committed
case (tools/make_eval_golden.py: crowd regions as RLE and polygon, annotation id 0, an image
without results, an image without objects, polygon and RLE ground truth, RLE result masks)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from maskrcnn_jax import evaluate
from maskrcnn_jax.evaluation import coco

REPO = pathlib.Path(__file__).resolve().parents[2]
GOLDENS = pathlib.Path(__file__).resolve().parent / 'goldens'
ARGS = [f'--annotations={GOLDENS / "instances.json"}', f'--results={GOLDENS / "results.json"}']


def _check_equal(metrics, expected, keys=coco.METRIC_KEYS, tol=1e-9):
  assert list(metrics) == list(keys)
  for key in keys:
    assert abs(metrics[key] - expected[key]) <= tol, (key, metrics[key], expected[key])


def test_golden_case_covers_what_it_claims(golden):
  ground_truth, results, expected, whole = golden
  annotations = ground_truth['annotations']
  assert annotations[0]['id'] == 0 and not annotations[0]['iscrowd']
  crowds = [a for a in annotations if a['iscrowd']]
  assert {type(a['segmentation']).__name__ for a in crowds} == {'dict', 'list'}
  assert any(isinstance(a['segmentation'], dict) for a in annotations if not a['iscrowd'])
  with_results = {r['image_id'] for r in results}
  with_objects = {a['image_id'] for a in annotations}
  assert with_objects - with_results and with_results - with_objects
  assert all(isinstance(r['segmentation'], dict) and 'bbox' in r for r in results)
  assert min(expected.values()) >= 0  # every area range has objects
  # Renumbering matters here: pycocotools on the ids as given scores lower.
  assert whole['stats_with_id_0']['bbox/AP'] < expected['bbox/AP']
  assert whole['stats_with_id_0']['segm/AR100'] < expected['segm/AR100']
  sizes = sum(os.path.getsize(GOLDENS / n)
              for n in ('instances.json', 'results.json', 'expected_stats.json'))
  assert sizes < 50_000


@pytest.mark.parametrize('engine', coco.ENGINES)
def test_command_equals_pycocotools_golden(golden, tmp_path, capsys, engine):
  expected = golden[2]
  output = tmp_path / 'out' / 'metrics.json'
  assert evaluate.main(ARGS + [f'--engine={engine}', f'--output={output}']) == 0
  printed = capsys.readouterr().out
  assert 'AP50' in printed and 'bbox' in printed and 'segm' in printed
  assert f'{expected["segm/AP"]:.4f}' in printed
  _check_equal(json.loads(output.read_text()), expected)


@pytest.mark.parametrize('iou_types', ['bbox', 'segm', 'segm,bbox'])
def test_command_iou_types(golden, tmp_path, iou_types):
  output = tmp_path / 'metrics.json'
  assert evaluate.main(ARGS + [f'--iou_types={iou_types}', f'--output={output}']) == 0
  keys = [f'{t}/{s}' for t in iou_types.split(',') for s in coco.STAT_NAMES]
  _check_equal(json.loads(output.read_text()), golden[2], keys)


def test_command_in_a_subprocess_without_jax(golden, tmp_path):
  output = tmp_path / 'metrics.json'
  env = dict(os.environ, PYTHONPATH=str(REPO))
  done = subprocess.run([sys.executable, '-m', 'maskrcnn_jax.evaluate', *ARGS,
                         f'--output={output}'], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert 'metrics written to' in done.stdout
  _check_equal(json.loads(output.read_text()), golden[2])
  # The command (and the metrics) import no JAX.
  check = subprocess.run([sys.executable, '-c', 'import sys; import maskrcnn_jax.evaluate; '
                          'assert "jax" not in sys.modules, "jax imported"'],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
                         check=False)
  assert check.returncode == 0, check.stderr


@pytest.mark.parametrize('engine', coco.ENGINES)
def test_coco_metrics_equals_golden(golden, engine):
  ground_truth, results, expected, _ = golden
  _check_equal(coco.coco_metrics(ground_truth, results, engine=engine), expected)
  indexed = coco.index_ground_truth(ground_truth, engine)
  _check_equal(coco.coco_metrics(indexed, results), expected)
  _check_equal(coco.coco_metrics(indexed, results, engine=engine), expected)
