"""Fine-tuning from weights with another number of classes: a checkpoint of ours on the real
coco_sample, and a 91-class torchvision-layout state dict on a small shapes dataset.

The source is a configs/tiny_smoke.py model with 81 classes (seed 1) saved as the loop saves it;
the run is the same architecture with the 91 classes coco_sample's category ids need, started
through `loop.Run.initial_state` in a fresh workdir (config.init.checkpoint), trained a few steps
with the experiment's own pmapped train step on one fixed batch: the loss falls. A workdir with a
checkpoint of its own resumes it and ignores init.checkpoint.
"""

import pathlib

import flax.jax_utils
import jax
import numpy as np
import pytest

from maskrcnn_jax import settings
from maskrcnn_jax.configs import load_config, validate_config
from maskrcnn_jax.train import checkpoint as ckpt
from maskrcnn_jax.train import experiment
from maskrcnn_jax.train import loop
from maskrcnn_jax.train import metrics as metrics_lib
from maskrcnn_jax.train import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 5


def _config(num_classes, data_dir, seed=0, checkpoint=''):
  config = load_config(ROOT / 'configs/tiny_smoke.py')
  config.seed = seed
  config.init.checkpoint = checkpoint
  config.model.num_classes = num_classes
  config.data.tfds_data_dir = data_dir
  config.data.train_split = 'validation'  # coco_sample's only split
  config.data.num_workers = 1
  config.train.warmup_steps = 0
  config.train.learning_rate_steps = (100,)
  config.train.total_steps = 100
  config.train.gradient_clip_norm = 10.0
  return config


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_class_layer(name):
  return any(f"['{layer}']" in name for layer in ('class_logits', 'box_deltas', 'mask_logits'))


def _train_on_one_batch(job, config, state, source):
  """STEPS updates of the run's own pmapped train step on the first batch of `source`: (the
  replicated state, the total loss of each step)."""
  batch = next(experiment.build_train_iterator(
      config, int(config.train.per_device_batch_size) * job.exp.num_devices, source=source))
  sharded = step_lib.shard(batch, step_lib.TRAIN_KEYS, job.exp.num_devices)
  replicated = step_lib.replicate(state, job.exp.devices)
  losses = []
  for _ in range(STEPS):
    replicated, m = job.exp.train_step(replicated, sharded)
    losses.append(metrics_lib.scalars(jax.tree_util.tree_map(lambda x: x[0], m))['total_loss'])
  return replicated, losses


def test_finetune_81_to_91_classes_on_coco_sample(sample_data_dir, sample_source, tmp_path):
  # The source: 81 classes, saved as the training loop saves its state.
  source_config = _config(81, sample_data_dir, seed=1)
  source_exp = experiment.build_experiment(source_config, jax.local_devices()[:1])
  source_vars = jax.device_get(source_exp.initial_variables())
  manager = ckpt.create_manager(str(tmp_path / 'source'))
  ckpt.save(manager, 7, jax.device_get(source_exp.create_state(source_vars)), force=True)
  manager.wait_until_finished()
  manager.close()

  # coco_sample's category ids go up to 90: 81 classes are too few, 91 enough.
  name = f'{source_config.data.tfds_name} {source_config.data.train_split}'
  with pytest.raises(settings.ConfigError, match=r"'model.num_classes' = 81 .* >= 91"):
    experiment.check_num_classes(source_config, sample_source.metadata, name)
  config = _config(91, sample_data_dir, checkpoint=str(tmp_path / 'source'))
  validate_config(config)
  experiment.check_num_classes(config, sample_source.metadata, name)

  job = loop.Run(config, str(tmp_path / 'finetune'))
  state = jax.device_get(job.initial_state())
  assert int(state.step) == 0
  got, src = _leaves(state.params), _leaves(source_vars['params'])
  assert got.keys() == src.keys()
  for k in got:
    if _is_class_layer(k):
      assert got[k].shape[-1] in (91, 364) and src[k].shape[-1] in (81, 324), k
    else:
      np.testing.assert_array_equal(got[k], src[k], err_msg=k)
  for k, v in _leaves(state.batch_stats).items():
    np.testing.assert_array_equal(v, _leaves(source_vars['batch_stats'])[k], err_msg=k)

  # A few steps of the run's own train step on one fixed coco_sample batch.
  replicated, losses = _train_on_one_batch(job, config, state, sample_source)
  assert np.isfinite(losses).all(), losses
  assert losses[-1] < 0.9 * losses[0], losses

  # The workdir now has a checkpoint of its own: resuming ignores init.checkpoint.
  job.save(replicated, STEPS)
  job.manager.wait_until_finished()
  job.manager.close()
  trained = jax.device_get(flax.jax_utils.unreplicate(replicated))
  resumed = loop.Run(config, str(tmp_path / 'finetune'))
  again = jax.device_get(resumed.initial_state())
  resumed.manager.close()
  assert int(again.step) == STEPS
  kernel = lambda s: np.asarray(s.params['fpn']['output_p2']['kernel'])
  np.testing.assert_array_equal(kernel(again), kernel(trained))
  assert not np.array_equal(kernel(again), source_vars['params']['fpn']['output_p2']['kernel'])


def _module(path: pathlib.Path):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_finetune_torchvision_91_classes_to_a_4_class_dataset(tmp_path, caplog):
  """A 91-class torchvision-layout state dict (synthetic values) into a 4-class model on a small
  shapes dataset (3 categories): the class layers are skipped and logged, training runs and the
  loss falls."""
  import logging  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.data import prepare, shapes  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.weights import synthetic  # pylint: disable=import-outside-toplevel
  raw, data_dir = tmp_path / 'raw', tmp_path / 'tfds'
  shapes.main(['--output', str(raw), '--num_train', '8', '--num_val', '2', '--image_size', '96'])
  prepare.prepare(str(data_dir), manual_dir=str(raw), name='shapes', show_progress=False)
  init_tests = _module(ROOT / 'tests' / 'weights' / 'test_finetune_init.py')
  names = init_tests._torchvision_names_and_shapes  # pylint: disable=protected-access
  source = tmp_path / 'maskrcnn_91.npz'
  np.savez(source, **synthetic.synthetic_torchvision_state_dict(
      names(_config(91, str(data_dir)), 91), seed=3))

  config = _config(4, str(data_dir))
  config.data.tfds_name = 'coco_instances/shapes'
  config.data.train_split = 'train'
  config.init.torchvision_maskrcnn = str(source)
  config.train.learning_rate = 0.002  # synthetic weights: a gentle start
  validate_config(config)
  train_source = experiment.build_source(config, 'train')
  experiment.check_num_classes(config, train_source.metadata, 'shapes train')
  with caplog.at_level(logging.INFO, logger='maskrcnn_jax.weights.transfer'):
    job = loop.Run(config, str(tmp_path / 'finetune'))
    state = job.initial_state()
  skipped = [r.getMessage() for r in caplog.records if 'class-dependent' in r.getMessage()]
  assert len(skipped) == 6 and all('91 -> 4 classes' in line for line in skipped), skipped
  _, losses = _train_on_one_batch(job, config, state, train_source)
  job.manager.close()
  assert np.isfinite(losses).all(), losses
  assert losses[-1] < 0.9 * losses[0], losses
