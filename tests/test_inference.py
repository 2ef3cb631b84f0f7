"""Tests of maskrcnn_jax.inference: the Predictor gives the evaluation path's detections.

A workdir is made in-process (configs/tiny_smoke.py on the prepared coco_sample, a checkpoint of
perturbed initial variables saved with gradient clipping on, as a run with that override would
be); the Predictor restores it from its recorded config alone and its records are compared with
the COCO results of `evaluator.predict` (the evaluation path) on the same six images.
"""

import json
import logging
import os
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn_jax.configs import ConfigError, load_config
from maskrcnn_jax.evaluation import coco, evaluator
from maskrcnn_jax import inference
from maskrcnn_jax.train import checkpoint as ckpt
from maskrcnn_jax.train import experiment
from maskrcnn_jax.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGES = REPO / 'tests' / 'data' / 'coco_sample' / 'val2017'
STEP = 3


def _config(data_dir):
  config = load_config(REPO / 'configs' / 'tiny_smoke.py')
  config.data.tfds_data_dir = data_dir
  config.train.gradient_clip_norm = 10.0  # an optimizer override the predictor must not need
  config.eval.num_samples = -1
  return config


@pytest.fixture(scope='module')
def workdir(sample_data_dir, tmp_path_factory):
  config = _config(sample_data_dir)
  exp = experiment.build_experiment(config)
  variables = exp.initial_variables()
  # Perturbed so that classes and scores differ between detections.
  leaves, tree = jax.tree_util.tree_flatten(variables['params'])
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  variables = {'params': jax.tree_util.tree_unflatten(tree, leaves),
               'batch_stats': variables['batch_stats']}
  path = tmp_path_factory.mktemp('predictor_workdir')
  with open(path / 'config.json', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  inference.write_categories(str(path), experiment.build_source(config, 'validation').metadata)
  manager = ckpt.create_manager(str(path))
  state = exp.create_state(variables).replace(step=np.int32(STEP))
  ckpt.save(manager, STEP, jax.device_get(state), force=True)
  manager.wait_until_finished()
  manager.close()
  return str(path), config, exp, variables


def _evaluation_results(config, exp, variables):
  source = experiment.build_source(config, 'validation')
  batches = experiment.build_eval_iterator(config, 2, source=source)
  replicated = step_lib.replicate(variables, exp.devices)
  return evaluator.predict(exp.infer_step, replicated, batches,
                           coco.class_to_category_map(source.metadata), exp.num_devices), source


def test_predictor_equals_the_evaluation_path(workdir):
  path, config, exp, variables = workdir
  want, source = _evaluation_results(config, exp, variables)
  predictor = inference.Predictor.from_workdir(path, batch_size=4)
  assert predictor.step == STEP
  ids = [int(i) for i in source.image_ids]
  annotations = REPO / 'tests' / 'data' / 'coco_sample' / 'annotations' / 'instances_val2017.json'
  files = {im['id']: im['file_name'] for im in json.load(open(annotations))['images']}
  records = predictor.predict([IMAGES / files[i] for i in ids], score_threshold=0.0)
  assert len(records) == len(ids)
  total = 0
  names = {c['id']: c['name'] for c in source.metadata['categories']}
  for image_id, record in zip(ids, records):
    expected = [r for r in want if r['image_id'] == image_id]
    n = len(expected)
    total += n
    assert record['boxes'].shape == (n, 4) and record['masks'].shape[0] == n
    np.testing.assert_allclose([r['score'] for r in expected], record['scores'], atol=1e-5)
    np.testing.assert_array_equal([r['category_id'] for r in expected], record['category_ids'])
    assert record['category_names'] == [names.get(r['category_id']) for r in expected]
    xywh = np.concatenate([record['boxes'][:, :2], record['boxes'][:, 2:] - record['boxes'][:, :2]],
                          axis=1)
    np.testing.assert_allclose(xywh, [r['bbox'] for r in expected], atol=2e-3)
    h, w = record['image_size']
    assert record['masks'].shape[1:] == (h, w) and record['masks'].dtype == bool
    for k, r in enumerate(expected):
      got = mask_util.encode(np.asfortranarray(record['masks'][k].astype(np.uint8)))
      assert got['counts'].decode('ascii') == r['segmentation']['counts'], (image_id, k)
  assert total > 0


def test_score_threshold_and_input_kinds(workdir):
  path = workdir[0]
  predictor = inference.Predictor.from_workdir(path)
  file = sorted(IMAGES.iterdir())[0]
  array = np.asarray(Image.open(file).convert('RGB'))
  by_path, by_array, by_pil = (predictor.predict(x, score_threshold=0.0)[0]
                               for x in (file, array, Image.fromarray(array)))
  for other in (by_array, by_pil):
    np.testing.assert_array_equal(by_path['boxes'], other['boxes'])
    np.testing.assert_array_equal(by_path['masks'], other['masks'])
  threshold = float(np.median(by_path['scores']))
  kept = predictor.predict(file, score_threshold=threshold)[0]
  assert np.all(kept['scores'] >= threshold)
  assert len(kept['scores']) == int(np.sum(by_path['scores'] >= threshold))
  with pytest.raises(ValueError, match='uint8'):
    predictor.predict(array.astype(np.float32))


def test_bfloat16_inference_products_reach_the_predictor(workdir):
  """model.inference_products='bfloat16' (in the config, or the `inference_products` argument
  that the predict and export commands' --inference_products sets) builds the predictor's model
  with bfloat16 products (tests/ops/test_conv.py checks their numbers); the same parameters go
  into it and it predicts. A bad value is a one-line error naming the key."""
  path, config, _, variables = workdir
  assert inference.Predictor(config, variables).model.products == 'float32'
  bf16 = config.copy_and_resolve_references()
  bf16.model.inference_products = 'bfloat16'
  assert inference.Predictor(bf16, variables).model.products == 'bfloat16'
  predictor = inference.Predictor.from_workdir(path, inference_products='bfloat16')
  assert predictor.model.products == 'bfloat16'
  assert predictor.config.model.inference_products == 'bfloat16'
  [record] = predictor.predict(sorted(IMAGES.iterdir())[0], score_threshold=0.0)
  assert len(record['scores']) > 0 and np.all(np.isfinite(record['boxes']))
  with pytest.raises(ConfigError, match='model.inference_products'):
    inference.Predictor(config, variables, inference_products='int8')


def test_recorded_config_fills_keys_added_since(workdir, tmp_path, caplog):
  path = workdir[0]
  recorded = json.load(open(os.path.join(path, 'config.json')))
  del recorded['model']['rpn']['low_quality_ties']
  recorded['model']['rpn']['a_key_removed_since'] = 1
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(recorded, f)
  with caplog.at_level(logging.INFO):
    config = inference.recorded_config(str(tmp_path))
  assert config.model.rpn.low_quality_ties is False  # today's default
  assert tuple(config.data.image_size) == (64, 64)
  assert 'model.rpn.low_quality_ties' in caplog.text
  assert 'model.rpn.a_key_removed_since' in caplog.text
  with pytest.raises(FileNotFoundError, match='config.json'):
    inference.recorded_config(str(tmp_path / 'nothing'))


def test_missing_step_names_the_available_ones(workdir):
  with pytest.raises(ckpt.NoCheckpointError, match=r'available: \[3\]'):
    inference.Predictor.from_workdir(workdir[0], step=5)


def test_predict_command_writes_the_evaluation_results(workdir, tmp_path):
  """`python -m maskrcnn_jax.predict` on the six images: predictions.json holds the evaluation
  path's results (ids from the COCO file names), plus one picture per image."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  path, config, exp, variables = workdir
  want, _ = _evaluation_results(config, exp, variables)
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'maskrcnn_jax.predict', f'--workdir={path}', f'--images={IMAGES}',
       f'--out={out}', '--score_threshold=0', '--batch_size=4'],
      cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '6 images' in proc.stdout and str(out) in proc.stdout
  got = json.load(open(out / 'predictions.json'))
  assert len(got) == len(want) > 0
  key = lambda r: (r['image_id'], -r['score'], r['category_id'])
  for g, w in zip(sorted(got, key=key), sorted(want, key=key)):
    assert g['file_name'] == f"{g['image_id']:012d}.jpg"
    assert (g['image_id'], g['category_id']) == (w['image_id'], w['category_id'])
    # Scores are rounded to 5 decimals: equal up to one unit of the last, since the two paths'
    # float32 scores may straddle a rounding boundary (0.99032 vs 0.99033 on jax 0.12).
    assert abs(g['score'] - w['score']) <= 1.5e-5
    np.testing.assert_allclose(g['bbox'], w['bbox'], atol=2e-3)
    assert g['segmentation'] == w['segmentation']
  pictures = sorted(p.name for p in out.iterdir() if p.suffix == '.png')
  assert pictures == sorted(f.stem + '.png' for f in IMAGES.iterdir())
  assert Image.open(out / pictures[0]).size == Image.open(IMAGES / (pictures[0][:-4] + '.jpg')).size
