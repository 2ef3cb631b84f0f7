"""Checkpoint fingerprints, the fallback past unusable checkpoints and failing saves, on a small
state with the real Orbax manager (`maskrcnn_jax.train.checkpoint`)."""

import asyncio
import gc
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cli_runs import data_files, flip_bytes
from maskrcnn_jax.train import checkpoint as ckpt
from maskrcnn_jax.train import state as state_lib


def _state(seed=0):
  rng = np.random.default_rng(seed)
  return {'step': np.int32(seed),
          'params': {'conv': {'kernel': rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                              'bias': rng.normal(size=(8,)).astype(np.float32)}},
          'batch_stats': {'bn': {'mean': rng.normal(size=(8,)).astype(np.float32)}},
          'opt_state': (rng.normal(size=(3, 3, 4, 8)).astype(np.float32),)}


def _abstract(state):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                state)


def _save_steps(workdir, steps):
  manager = ckpt.create_manager(str(workdir), max_to_keep=10)
  for s in steps:
    ckpt.save(manager, s, _state(s), force=True, meta={'config': {'seed': 0}})
  ckpt.check_saves(manager, wait=True)
  manager.close()


def test_fingerprint_names_paths_alike_and_sees_one_bit():
  state = _state()
  digests = ckpt.fingerprint(state)
  assert set(digests) == {'step', 'params/conv/kernel', 'params/conv/bias', 'batch_stats/bn/mean',
                          'opt_state/0'}
  # A flax struct (the TrainState) and the plain dicts read back from disk share the names.
  train_state = state_lib.TrainState(step=state['step'], params=state['params'],
                                     batch_stats=state['batch_stats'],
                                     opt_state=state['opt_state'], loss_scale=())
  assert ckpt.fingerprint(train_state) == digests
  flipped = jax.tree_util.tree_map(np.copy, state)
  flipped['params']['conv']['kernel'].view(np.uint32)[1, 2, 3, 4] ^= 1
  changed = {k for k, v in ckpt.fingerprint(flipped).items() if digests[k] != v}
  assert changed == {'params/conv/kernel'}
  with pytest.raises(ckpt.CorruptCheckpointError, match='array params/conv/kernel differs'):
    ckpt.verify(flipped, digests)
  ckpt.verify(flipped, digests, prefixes=('batch_stats',))  # only the collections asked for


def test_restore_latest_verifies_and_falls_back_past_unusable_checkpoints(tmp_path, caplog):
  _save_steps(tmp_path, (1, 2, 3, 4))
  flip_bytes(data_files(tmp_path, 4)[-1])                  # restores silently, wrong bytes
  os.remove(tmp_path / 'checkpoints' / '3' / 'default' / '_METADATA')
  shutil.rmtree(tmp_path / 'checkpoints' / '2')
  os.makedirs(tmp_path / 'checkpoints' / '2')                # an empty step directory
  manager = ckpt.create_manager(str(tmp_path))
  step, state = ckpt.restore_latest(manager, str(tmp_path), _abstract(_state()))
  assert step == 1
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(_state(1))):
    np.testing.assert_array_equal(a, b)
  text = caplog.text
  assert 'checkpoint step 4' in text and 'differs from the fingerprint' in text
  assert 'checkpoint step 3' in text and '_METADATA' in text
  assert 'checkpoint step 2' in text and 'incomplete' in text
  # Set aside, not deleted; the manager forgot them, so the run can save those steps again.
  assert sorted(os.listdir(tmp_path / ckpt.UNUSABLE_DIR)) == ['2', '3', '4']
  assert manager.all_steps() == [1]
  ckpt.save(manager, 2, _state(2), force=True)
  ckpt.check_saves(manager, wait=True)
  manager.close()


def _unawaited_failure_records():
  """The records asyncio logs for a task whose OSError nobody awaited (collected afterwards)."""
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logger = logging.getLogger('asyncio')
  logger.addHandler(handler)
  try:
    async def read():
      raise OSError('short read of d/0f3a')
    loop = asyncio.new_event_loop()
    task = loop.create_task(read())
    loop.run_until_complete(asyncio.wait([task]))  # done; its exception never retrieved
    loop.close()
    del task
    gc.collect()
  finally:
    logger.removeHandler(handler)
  return records


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # as below
def test_after_a_failed_restore_unawaited_read_errors_are_one_line(tmp_path, monkeypatch):
  monkeypatch.setattr(logging.getLogger('asyncio'), 'filters', [])
  [before] = _unawaited_failure_records()
  assert before.exc_info is not None  # asyncio's own report: a multi-line traceback
  _save_steps(tmp_path, (1, 2))
  data_files(tmp_path, 2)[-1].write_bytes(b'')  # truncated: the restore fails
  manager = ckpt.create_manager(str(tmp_path))
  assert ckpt.restore_latest(manager, str(tmp_path), _abstract(_state()))[0] == 1
  manager.close()
  [after] = _unawaited_failure_records()
  assert after.exc_info is None and after.levelname == 'WARNING'
  message = logging.Formatter().format(after)
  assert '\n' not in message and 'an unawaited read also failed: OSError: short read' in message
  ckpt._unawaited_read_errors_in_one_line()  # pylint: disable=protected-access
  assert len(logging.getLogger('asyncio').filters) == 1  # installed once


def test_no_usable_checkpoint_is_an_error_that_moves_nothing(tmp_path):
  _save_steps(tmp_path, (5,))
  for path in data_files(tmp_path, 5):
    path.write_bytes(path.read_bytes()[:8])  # truncated
  manager = ckpt.create_manager(str(tmp_path))
  with pytest.raises(ckpt.CorruptCheckpointError, match=r'no checkpoint in .* restores: step 5: '):
    ckpt.restore_latest(manager, str(tmp_path), _abstract(_state()))
  assert not (tmp_path / ckpt.UNUSABLE_DIR).exists()
  assert ckpt.checkpoint_steps(str(tmp_path)) == [5]


# Orbax's background event loop, closed after the failed read, drops a callback at exit (the
# "Event loop is closed" that maskrcnn_jax.main hides from users).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_restore_variables_of_a_corrupt_step_names_it(tmp_path):
  _save_steps(tmp_path, (1, 2))
  for path in data_files(tmp_path, 2):
    flip_bytes(path)
  abstract = _abstract({'params': _state()['params'], 'batch_stats': _state()['batch_stats']})
  with pytest.raises(ckpt.CorruptCheckpointError,
                     match=r'checkpoint step 2 in .* is unusable: .*\(other steps: \[1\]\)'):
    ckpt.restore_variables(str(tmp_path), abstract, 2)
  step, variables = ckpt.restore_variables(str(tmp_path), abstract, 1)
  assert step == 1
  np.testing.assert_array_equal(variables['params']['conv']['kernel'],
                                _state(1)['params']['conv']['kernel'])


def test_a_failing_background_write_is_reported_and_the_previous_checkpoint_stays(
    tmp_path, monkeypatch):
  original = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def failing(self, x, directory):
    if x.get('step') == 2:
      raise OSError(28, 'No space left on device')
    return await original(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', failing)
  manager = ckpt.create_manager(str(tmp_path))
  ckpt.save(manager, 1, _state(1), force=True)
  ckpt.check_saves(manager, wait=True)
  ckpt.save(manager, 2, _state(2), force=True)
  with pytest.raises(ckpt.CheckpointSaveError, match='No space left on device'):
    ckpt.check_saves(manager, wait=True)
  assert ckpt.checkpoint_steps(str(tmp_path)) == [1]
  step, _ = ckpt.restore_latest(ckpt.create_manager(str(tmp_path)), str(tmp_path),
                                _abstract(_state()))
  assert step == 1


def test_too_little_free_space_fails_before_writing(tmp_path, monkeypatch):
  manager = ckpt.create_manager(str(tmp_path))
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(ckpt.shutil, 'disk_usage',
                      lambda _: usage._replace(free=1000))
  with pytest.raises(ckpt.CheckpointSaveError, match=r'no space for the checkpoint of step 3'):
    ckpt.save(manager, 3, _state(3), force=True)
  assert not os.listdir(tmp_path / 'checkpoints')


def test_the_manager_keeps_the_latest_max_to_keep(tmp_path):
  manager = ckpt.create_manager(str(tmp_path), max_to_keep=2)
  for s in (1, 2, 3, 4):
    ckpt.save(manager, s, _state(s), force=True)
  ckpt.check_saves(manager, wait=True)
  manager.close()
  assert ckpt.checkpoint_steps(str(tmp_path)) == [3, 4]
