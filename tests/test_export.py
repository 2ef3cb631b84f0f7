"""Tests of maskrcnn_jax.export: the serialized artifact equals the in-process inference.

A workdir is made in-process (configs/tiny_smoke.py, perturbed initial variables saved as a
checkpoint, a category table with ids != class indices); the command line exports it for cpu and
cuda; a fresh Python process that imports only jax and numpy deserializes the artifact and runs it
on fixed canvas batches, and its outputs are compared with `Predictor.detections` here. A second
model, whose box classifier always says background, gives a batch without detections.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from maskrcnn_jax import export
from maskrcnn_jax import inference
from maskrcnn_jax.configs import load_config
from maskrcnn_jax.train import checkpoint as ckpt
from maskrcnn_jax.train import experiment

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGES = REPO / 'tests' / 'data' / 'coco_sample' / 'val2017'
STEP = 2
BATCH = 2
ENV = dict(os.environ, JAX_PLATFORMS='cpu')
# Category ids differ from class indices; every third class has no name.
METADATA = {'categories': [{'id': 1000 + i, 'name': f'thing{i}'} for i in range(1, 91)
                           if i % 3],
            'class_index_to_category_id': {str(i): 1000 + i for i in range(1, 91)}}

# Runs in a fresh interpreter: jax and numpy only. argv[1]: JSON [[artifact, inputs.npz,
# outputs.npz], ...].
FRESH = """
import json, sys
import jax, numpy as np
for artifact, inputs, outputs in json.loads(sys.argv[1]):
  with open(artifact, 'rb') as f:
    exported = jax.export.deserialize(f.read())
  batch = np.load(inputs)
  out = exported.call(batch['images'], batch['image_sizes'])
  np.savez(outputs, **{k: np.asarray(v) for k, v in out.items()})
assert not [m for m in sys.modules if m.split('.')[0] == 'maskrcnn_jax'], 'maskrcnn_jax imported'
print('platform', jax.default_backend(), 'platforms', exported.platforms)
"""


def _perturbed(variables, seed):
  """The box and mask heads perturbed, so that classes and scores vary between detections; the
  backbone keeps its initialisation (a perturbed backbone's huge activations make float32
  round-off, e.g. of constant folding, visible in the mask probabilities)."""
  params = dict(variables['params'])
  for name in ('box_head', 'mask_head'):
    leaves, tree = jax.tree_util.tree_flatten(params[name])
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), len(name)), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    params[name] = jax.tree_util.tree_unflatten(tree, leaves)
  return {'params': params, 'batch_stats': variables['batch_stats']}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """(path, config, variables) of a workdir with a checkpoint at STEP and a category table."""
  config = load_config(REPO / 'configs' / 'tiny_smoke.py')
  exp = experiment.build_experiment(config)
  variables = _perturbed(exp.initial_variables(), 7)
  path = tmp_path_factory.mktemp('export_workdir')
  with open(path / 'config.json', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  inference.write_categories(str(path), METADATA)
  manager = ckpt.create_manager(str(path))
  ckpt.save(manager, STEP, jax.device_get(exp.create_state(variables).replace(
      step=np.int32(STEP))), force=True)
  manager.wait_until_finished()
  manager.close()
  return str(path), config, variables


@pytest.fixture(scope='module')
def images():
  """Three real images of different sizes (two batches of BATCH, the second padded)."""
  return [inference.load_image(p) for p in sorted(IMAGES.iterdir())[:3]]


@pytest.fixture(scope='module')
def predictor(workdir):
  return inference.Predictor.from_workdir(workdir[0], batch_size=BATCH)


@pytest.fixture(scope='module')
def empty_predictor(workdir):
  """The workdir's model with the background logit raised by 1e4: no class scores above 0."""
  _, config, variables = workdir
  params = jax.tree_util.tree_map(np.asarray, variables['params'])
  bias = params['box_head']['class_logits']['bias'].copy()
  bias[0] += 1e4
  params['box_head']['class_logits']['bias'] = bias
  return inference.Predictor(config, {'params': params, 'batch_stats': variables['batch_stats']},
                             metadata=METADATA, batch_size=1)


@pytest.fixture(scope='module')
def artifact(workdir, tmp_path_factory):
  """The command line's export of the workdir for cpu and cuda: (path, stdout)."""
  out = tmp_path_factory.mktemp('export') / 'model.jax'
  proc = subprocess.run(
      [sys.executable, '-m', 'maskrcnn_jax.export', f'--workdir={workdir[0]}', f'--out={out}',
       f'--batch_size={BATCH}', '--platforms=cpu,cuda'],
      cwd=REPO, capture_output=True, text=True, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(out), proc.stdout


@pytest.fixture(scope='module')
def fresh(artifact, images, predictor, empty_predictor, tmp_path_factory):
  """Both artifacts run by a fresh process on fixed batches: {name: (inputs, outputs)}."""
  tmp = tmp_path_factory.mktemp('fresh')
  empty_path = str(tmp / 'empty.jax')
  export.save(empty_predictor, empty_path)
  black = Image.fromarray(np.zeros((40, 50, 3), np.uint8))
  cases = {'model': (artifact[0], predictor.canvas_batch(images[:BATCH])),
           'empty': (empty_path, empty_predictor.canvas_batch([black]))}
  jobs = []
  for name, (path, batch) in cases.items():
    np.savez(tmp / f'{name}_in.npz', images=batch['images'], image_sizes=batch['image_sizes'])
    jobs.append([path, str(tmp / f'{name}_in.npz'), str(tmp / f'{name}_out.npz')])
  proc = subprocess.run([sys.executable, '-c', FRESH, json.dumps(jobs)], cwd=tmp,
                        capture_output=True, text=True, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'platform cpu' in proc.stdout
  return {name: (batch, dict(np.load(job[2])))
          for (name, (_, batch)), job in zip(cases.items(), jobs)}


def _assert_same_detections(got, want):
  assert sorted(got) == sorted(want) == ['boxes', 'classes', 'masks', 'scores', 'valid']
  for k in want:
    assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
  np.testing.assert_array_equal(got['valid'], want['valid'])
  np.testing.assert_array_equal(got['classes'], want['classes'])
  np.testing.assert_allclose(got['boxes'], want['boxes'], rtol=0, atol=1e-4)
  np.testing.assert_allclose(got['scores'], want['scores'], rtol=0, atol=1e-5)
  np.testing.assert_allclose(got['masks'], want['masks'], rtol=0, atol=1e-5)


def test_fresh_process_equals_in_process(fresh, predictor, images):
  batch, got = fresh['model']
  want, _ = predictor.detections(images[:BATCH])
  np.testing.assert_array_equal(batch['image_sizes'], predictor.canvas_batch(images[:BATCH])[
      'image_sizes'])
  _assert_same_detections(got, want)
  assert got['valid'].sum() > 0
  assert got['masks'].shape[2:] == (14, 14)  # the config's mask resolution


def test_no_detections_in_both(fresh, empty_predictor):
  batch, got = fresh['empty']
  want, _ = empty_predictor.detections([Image.fromarray(np.zeros((40, 50, 3), np.uint8))])
  assert not got['valid'].any() and not want['valid'].any()
  _assert_same_detections(got, want)
  assert empty_predictor.predict(np.zeros((40, 50, 3), np.uint8))[0]['boxes'].shape == (0, 4)


def test_load_predict_equals_predictor(artifact, predictor, images):
  loaded = export.load(artifact[0])
  assert loaded.canvas == predictor.canvas and loaded.batch_size == BATCH
  assert loaded.exported.platforms == ('cpu', 'cuda')
  for threshold in (0.0, 0.06):
    got = loaded.predict(images, score_threshold=threshold)
    want = predictor.predict(images, score_threshold=threshold)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
      assert g['image_size'] == w['image_size']
      np.testing.assert_array_equal(g['category_ids'], w['category_ids'])
      assert g['category_names'] == w['category_names']
      np.testing.assert_allclose(g['boxes'], w['boxes'], rtol=0, atol=1e-4)
      np.testing.assert_allclose(g['scores'], w['scores'], rtol=0, atol=1e-5)
      assert g['masks'].shape == w['masks'].shape and g['masks'].dtype == bool
      # Pasting thresholds at 0.5: a 1e-6 difference may flip a pixel that sits on it.
      assert np.count_nonzero(g['masks'] != w['masks']) <= 1e-4 * g['masks'].size
  assert sum(len(r['scores']) for r in got) > 0
  assert set(got[0]['category_ids']) <= {1000 + i for i in range(1, 91)}


def test_description(artifact, workdir):
  path, stdout = artifact
  _, config, _ = workdir
  with open(export.description_path(path)) as f:
    d = json.load(f)
  assert path in stdout and export.description_path(path) in stdout
  assert d['format'] == export.FORMAT and d['jax_version'] == jax.__version__
  assert d['platforms'] == ['cpu', 'cuda'] and d['canvas'] == [64, 64] and d['batch_size'] == 2
  assert d['inputs'] == [
      {'name': 'images', 'shape': [2, 64, 64, 3], 'dtype': 'uint8', 'doc': d['inputs'][0]['doc']},
      {'name': 'image_sizes', 'shape': [2, 2], 'dtype': 'int32', 'doc': d['inputs'][1]['doc']}]
  shapes = {o['name']: (o['shape'], o['dtype']) for o in d['outputs']}
  assert shapes == {'boxes': ([2, 10, 4], 'float32'), 'classes': ([2, 10], 'int32'),
                    'masks': ([2, 10, 14, 14], 'float32'), 'scores': ([2, 10], 'float32'),
                    'valid': ([2, 10], 'bool')}
  assert [o['name'] for o in d['outputs']] == sorted(shapes)  # the flat order of out_avals
  norm = d['normalization']
  assert norm['inside'] and norm['pixel_mean'] == list(config.data.pixel_mean)
  assert norm['pixel_std'] == list(config.data.pixel_std)
  assert d['classes'][0] == {'index': 1, 'category_id': 1001, 'name': 'thing1'}
  assert d['classes'][2] == {'index': 3, 'category_id': 1003, 'name': None}
  assert len(d['classes']) == 90
  assert d['source'] == {'workdir': os.path.abspath(workdir[0]), 'step': STEP}
  assert d['config'] == json.loads(config.to_json_best_effort())


def test_errors(workdir, empty_predictor, tmp_path):
  with pytest.raises(export.ExportError, match='unknown: gpu'):
    export.parse_platforms('cpu,gpu')
  with pytest.raises(export.ExportError, match='one or more'):
    export.parse_platforms(' , ')
  with pytest.raises(export.ExportError, match='repeated'):
    export.parse_platforms('cpu,CPU')
  assert export.parse_platforms(' CUDA, cpu') == ('cuda', 'cpu')
  with pytest.raises(FileNotFoundError, match='nothing.jax'):
    export.load(tmp_path / 'nothing.jax')
  # An artifact for another platform is refused at load, naming what it holds.
  export.save(empty_predictor, str(tmp_path / 'cuda.jax'), platforms=('cuda',))
  with pytest.raises(export.ExportError, match='exported for cuda; this process runs on cpu'):
    export.load(tmp_path / 'cuda.jax')
  description = json.loads((tmp_path / 'cuda.jax.json').read_text())
  (tmp_path / 'cuda.jax.json').write_text(json.dumps(dict(description, format='other/9')))
  with pytest.raises(export.ExportError, match="format 'other/9'"):
    export.load(tmp_path / 'cuda.jax')
  # The command line: one line on stderr.
  cases = [(['--workdir=' + str(workdir[0]), '--platforms=cpu,gpu'], 2, 'unknown: gpu'),
           (['--workdir=' + str(tmp_path / 'none')], 1, 'config.json not found'),
           (['--workdir=' + str(workdir[0]), '--step=99'], 1, 'available: [2]')]
  for args, code, message in cases:
    proc = subprocess.run(
        [sys.executable, '-m', 'maskrcnn_jax.export', *args, f'--out={tmp_path / "x.jax"}'],
        cwd=REPO, capture_output=True, text=True, env=ENV)
    assert proc.returncode == code, (args, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and message in last, (args, proc.stderr[-2000:])
  assert not (tmp_path / 'x.jax').exists()
