"""The train step with the toy model: freezing, loss scaling, accumulation, data parallelism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from maskrcnn_jax.train import metrics as metrics_lib
from maskrcnn_jax.train import precision
from maskrcnn_jax.train import step as step_lib


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_frozen_parameters_unchanged_after_training_steps():
  _, state, fn = helpers.setup(freeze_at=2)
  before = _leaves(state.params)
  after, m = helpers.run_steps(state, fn, [helpers.batch(seed=i) for i in range(3)])
  after = _leaves(after.params)
  for name, value in before.items():
    frozen = "'conv1'" in name or "'layer1'" in name  # stem + res2 (freeze_at 2)
    if frozen:
      np.testing.assert_array_equal(after[name], value, err_msg=name)
    else:
      assert not np.array_equal(after[name], value), name
  # Frozen batch norm lives in batch_stats and is never touched either.
  assert float(m.compute()['learning_rate']) == pytest.approx(0.1)


def test_loss_scale_state_machine():
  s = precision.LossScale.create(True, 8.0, growth_interval=3)
  s = s.update(jnp.asarray(False))
  assert float(s.scale) == 4.0 and int(s.good_steps) == 0
  for _ in range(2):
    s = s.update(jnp.asarray(True))
  assert float(s.scale) == 4.0 and int(s.good_steps) == 2
  s = s.update(jnp.asarray(True))
  assert float(s.scale) == 8.0 and int(s.good_steps) == 0
  fixed = precision.LossScale.create(False, 8.0)
  assert float(fixed.update(jnp.asarray(False)).scale) == 1.0


def test_float16_overflow_skips_the_update_and_halves_the_scale_then_grows():
  _, state, fn = helpers.setup(freeze_at=0, dtype=jnp.float16, dynamic_scale=True,
                               initial_scale=2.0 ** 12, growth_interval=2)
  bad = helpers.batch(seed=0)
  bad['gt_boxes'] = bad['gt_boxes'].copy()
  bad['gt_boxes'][0, 0, 0] = np.inf  # injected overflow: infinite loss and gradients
  s1, m = helpers.run_steps(state, fn, [bad])
  assert int(s1.step) == 1
  assert float(s1.loss_scale.scale) == 2.0 ** 11
  assert float(m.compute()['update_skipped']) == 1.0
  assert float(m.compute()['loss_scale']) == 2.0 ** 12
  for name, value in _leaves(state.params).items():
    np.testing.assert_array_equal(_leaves(s1.params)[name], value, err_msg=name)
  for name, value in _leaves(state.opt_state).items():
    np.testing.assert_array_equal(_leaves(s1.opt_state)[name], value, err_msg=name)
  # Two finite steps (the growth interval) double the scale again; the params now move.
  s3, m = helpers.run_steps(s1, fn, [helpers.batch(seed=1), helpers.batch(seed=2)])
  assert float(s3.loss_scale.scale) == 2.0 ** 12
  assert int(s3.loss_scale.good_steps) == 0
  assert float(m.compute()['update_skipped']) == 0.0
  assert np.all(np.isfinite(_leaves(s3.params)["['box_head']['kernel']"]))
  assert not np.array_equal(_leaves(s3.params)["['box_head']['kernel']"],
                            _leaves(state.params)["['box_head']['kernel']"])


def test_float32_non_finite_loss_is_reported_with_its_step():
  _, state, fn = helpers.setup()
  bad = helpers.batch(seed=5)
  bad['gt_boxes'] = bad['gt_boxes'].copy()
  bad['gt_boxes'][1, 0, 2] = np.nan
  p = jax.pmap(fn, axis_name='batch', devices=jax.local_devices()[:1])
  rep = step_lib.replicate(state, jax.local_devices()[:1])
  acc = None
  for b in [helpers.batch(seed=1), helpers.batch(seed=2), bad, helpers.batch(seed=3)]:
    rep, m = p(rep, step_lib.shard(b, step_lib.TRAIN_KEYS, 1))
    acc = m if acc is None else acc.merge(m)  # on the device, as the loop merges
  from maskrcnn_jax.train import loop  # pylint: disable=import-outside-toplevel
  acc = loop._to_host(acc)  # pylint: disable=protected-access
  assert metrics_lib.first_nonfinite_step(acc) == 2

  class Manager:  # what the loop's check reads of the checkpoint manager
    directory = 'workdir/checkpoints'

    @staticmethod
    def latest_step():
      return 2

  message = r'not finite at step 2 .*latest checkpoint, step 2 .*saved from finite losses'
  with pytest.raises(loop.NonFiniteLossError, match=message):
    loop._check_finite(acc, 'float32', Manager)  # pylint: disable=protected-access
  loop._check_finite(acc, 'float16', Manager)  # float16: skipped updates, not an error

  class NoCheckpoint(Manager):
    @staticmethod
    def latest_step():
      return None

  with pytest.raises(loop.NonFiniteLossError, match=r'step 2 .*No checkpoint was saved before it '
                     r'\(a rerun starts from scratch\)\. Try a lower train\.learning_rate'):
    loop._check_finite(acc, 'float32', NoCheckpoint)  # pylint: disable=protected-access


def test_gradient_accumulation_equals_the_large_batch_update():
  """MultiSteps over 2 batches of 2 == one step on the batch of 4 (toy loss: per-example mean)."""
  big = helpers.batch(batch_size=4, seed=7)
  halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
  _, s_big, fn_big = helpers.setup(momentum=0.9, l2_weight_decay=1e-4)
  _, s_acc, fn_acc = helpers.setup(momentum=0.9, l2_weight_decay=1e-4,
                                   gradient_accumulation_steps=2)
  out_big, _ = helpers.run_steps(s_big, fn_big, [big])
  out_acc, m = helpers.run_steps(s_acc, fn_acc, halves)
  assert int(out_acc.step) == 2
  a, b = _leaves(out_big.params), _leaves(out_acc.params)
  for name in a:
    np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_same_update_on_one_and_four_devices():
  helpers.run_on_fake_devices('data_parallel_check.py', timeout=240)