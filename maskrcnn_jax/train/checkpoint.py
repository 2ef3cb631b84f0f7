"""Checkpoints of the unreplicated `TrainState` with an Orbax CheckpointManager, verified.

Layout: ``<workdir>/checkpoints/<step>/`` with two items: ``default`` (the state) and ``meta`` (a
JSON record: a fingerprint of every array, the config the checkpoint was made with, the device
and process counts). Saves are asynchronous (the device-to-host copy and the fingerprint happen
before `save` returns, the file writing in the background) and the manager keeps the last
``max_to_keep``. Restoring always goes through an abstract target (``jax.eval_shape`` of the
state), so the restored tree has exactly the structure, shapes and dtypes the code expects.

Integrity: `restore_latest` tries the newest checkpoint first and verifies every restored array
against the fingerprint recorded at save time (flipped bytes restore silently otherwise); a
checkpoint that fails to restore or to verify is reported in one line (step, reason), moved to
``<workdir>/checkpoints_unusable/`` (never deleted) and the previous one is tried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from maskrcnn_jax.weights import transfer

STATE_ITEM, META_ITEM = 'default', 'meta'
UNUSABLE_DIR = 'checkpoints_unusable'


class NoCheckpointError(FileNotFoundError):
  """The workdir holds no checkpoint (or not the requested step)."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint does not restore, or its arrays differ from the fingerprint it was saved with."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (disk full, a filesystem error)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, max_to_keep: int = 5, save_interval_steps: int = 1,
                   asynchronous: bool = True) -> ocp.CheckpointManager:
  """A manager over ``<workdir>/checkpoints``; ``save_interval_steps`` filters `save` calls."""
  # The preservation policy replaces CheckpointManagerOptions.max_to_keep (deprecated by Orbax).
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(int(max_to_keep)),
      save_interval_steps=save_interval_steps, enable_async_checkpointing=asynchronous,
      create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=(STATE_ITEM, META_ITEM))


# ------------------------------------------------------------------------------ fingerprints
def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def fingerprint(tree: Any) -> dict[str, str]:
  """{'params/backbone/...': digest} of every array leaf of `tree` (host or device arrays): a
  BLAKE2b digest of its dtype, shape and bytes. Paths are the names of the nested keys and
  fields joined by '/', so a state and the variables read back from it share them."""
  digests = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest = hashlib.blake2b(f'{array.dtype.str}{array.shape}'.encode(), digest_size=16)
    digest.update(array.reshape(-1).view(np.uint8))
    digests['/'.join(_key_name(k) for k in path)] = digest.hexdigest()
  return digests


def verify(tree: Any, recorded: dict[str, str], *, prefixes: tuple[str, ...] = ()) -> None:
  """Raises CorruptCheckpointError naming the first array of `tree` whose fingerprint differs
  from `recorded` (only the paths under `prefixes`, when given)."""
  def wanted(name):
    return not prefixes or name.split('/', 1)[0] in prefixes
  got = {k: v for k, v in fingerprint(tree).items() if wanted(k)}
  expected = {k: v for k, v in recorded.items() if wanted(k)}
  for name in sorted(set(got) | set(expected)):
    if got.get(name) != expected.get(name):
      what = ('missing from the checkpoint' if name not in got else
              'not in the recorded fingerprint' if name not in expected else
              'differs from the fingerprint recorded when it was saved')
      raise CorruptCheckpointError(f'array {name} {what}')


# ------------------------------------------------------------------------------ saving
def _one_line(error: BaseException, limit: int = 300) -> str:
  text = ' '.join(str(error).split()) or type(error).__name__
  text = f'{type(error).__name__}: {text}'
  return text if len(text) <= limit else text[:limit - 3] + '...'


class _UnawaitedReadErrorsInOneLine(logging.Filter):
  """asyncio's report of a task whose exception nobody awaited, as one warning line.

  When a restore fails, Orbax / TensorStore can leave sibling reads of the same corrupt
  checkpoint whose errors were never awaited; asyncio reports each when the task is collected,
  with a traceback (seen once in tens of runs, under load). The checkpoint has already been
  reported unusable in one line: this keeps the report of the sibling to one line too.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and 'exception was never retrieved' in str(record.msg):
      record.msg, record.args = ('after a failed checkpoint read, an unawaited read also failed: '
                                 '%s', (_one_line(record.exc_info[1]),))
      record.exc_info = record.exc_text = None
      record.levelno, record.levelname = logging.WARNING, 'WARNING'
    return True


def _unawaited_read_errors_in_one_line() -> None:
  """Installs `_UnawaitedReadErrorsInOneLine` on the asyncio logger (once per process)."""
  logger = logging.getLogger('asyncio')
  if not any(isinstance(f, _UnawaitedReadErrorsInOneLine) for f in logger.filters):
    logger.addFilter(_UnawaitedReadErrorsInOneLine())


def check_free_space(directory: str, num_bytes: int, step: int) -> None:
  """CheckpointSaveError before anything is written when `directory`'s filesystem has less than
  the state's size (plus 10%) free."""
  os.makedirs(directory, exist_ok=True)
  free = shutil.disk_usage(directory).free
  if free < 1.1 * num_bytes:
    raise CheckpointSaveError(
        f'no space for the checkpoint of step {step}: it needs about {num_bytes / 2**20:.1f} MiB, '
        f'{free / 2**20:.1f} MiB free in {directory}')


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False,
         meta: dict[str, Any] | None = None) -> bool:
  """Saves an unreplicated host state at `step` (asynchronously) with its fingerprint and `meta`
  (JSON: the config, device counts); False if the interval skipped it. Raises
  CheckpointSaveError (one line) when the write cannot start or an earlier write failed."""
  state = jax.device_get(state)
  num_bytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(state))
  check_free_space(str(manager.directory), num_bytes, step)
  record = dict(meta or {}, step=int(step), saved_at=time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                fingerprint=fingerprint(state))
  try:
    return manager.save(int(step), force=force, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(record)}))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointSaveError(f'saving the checkpoint of step {step} in {manager.directory} '
                              f'failed: {_one_line(e)}') from e


def check_saves(manager: ocp.CheckpointManager, wait: bool = False) -> None:
  """CheckpointSaveError when a background write has failed (`wait`: after all have ended)."""
  try:
    if wait:
      manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointSaveError(f'writing a checkpoint in {manager.directory} failed: '
                              f'{_one_line(e)}') from e


# ------------------------------------------------------------------------------ restoring
def step_dirs(workdir: str) -> list[int]:
  """Every numeric step directory in ``<workdir>/checkpoints`` (committed or not), sorted."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps with a committed checkpoint in ``<workdir>/checkpoints`` (sorted), read from the
  directory names without creating anything."""
  return transfer.committed_steps(checkpoint_dir(workdir))


def read_meta(workdir: str, step: int) -> dict[str, Any] | None:
  """The ``meta`` record of a checkpoint (None for checkpoints saved without one)."""
  path = os.path.join(checkpoint_dir(workdir), str(step), META_ITEM, 'metadata')
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CorruptCheckpointError(f'{path}: {_one_line(e)}') from e


def _restore_step(manager, workdir: str, step: int, abstract_state: Any) -> Any:
  if step not in checkpoint_steps(workdir):
    raise CorruptCheckpointError(f'incomplete (no {STATE_ITEM}/ item)')
  meta = read_meta(workdir, step)
  try:
    restored = manager.restore(int(step), args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))[STATE_ITEM]
  except Exception as e:  # pylint: disable=broad-except  # Orbax / TensorStore errors vary
    _unawaited_read_errors_in_one_line()
    raise CorruptCheckpointError(_one_line(e)) from e
  if meta is None:
    logging.warning('checkpoint step %d has no fingerprint (saved by an older version): '
                    'restored unverified', step)
  else:
    verify(restored, meta['fingerprint'])
  return restored


def _set_aside(workdir: str, step: int) -> str:
  """Moves a step directory to ``<workdir>/checkpoints_unusable/<step>[.n]`` (kept, not
  deleted); returns the new path."""
  base = os.path.join(os.path.abspath(workdir), UNUSABLE_DIR, str(step))
  target, n = base, 1
  while os.path.exists(target):
    target, n = f'{base}.{n}', n + 1
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.move(os.path.join(checkpoint_dir(workdir), str(step)), target)
  return target


def restore_latest(manager: ocp.CheckpointManager, workdir: str, abstract_state: Any
                   ) -> tuple[int, Any] | None:
  """(step, state) of the newest checkpoint that restores and verifies, None when there is none.

  Each unusable newer checkpoint is logged in one line and set aside (`UNUSABLE_DIR`), so the
  run continues from the previous one and can later save its own step again. When no
  checkpoint is usable nothing is moved and CorruptCheckpointError lists each step's reason.
  """
  steps = step_dirs(workdir)
  failures = []
  for step in reversed(steps):
    try:
      state = _restore_step(manager, workdir, step, abstract_state)
    except CorruptCheckpointError as e:
      failures.append((step, str(e)))
      logging.warning('checkpoint step %d in %s is unusable: %s', step, checkpoint_dir(workdir), e)
      continue
    if failures:
      _sync('set_aside_unusable_checkpoints')
      if jax.process_index() == 0:
        for bad, _ in failures:
          logging.warning('checkpoint step %d set aside in %s; resuming from step %d', bad,
                          _set_aside(workdir, bad), step)
      _sync('unusable_checkpoints_set_aside')
      manager.reload()
    return step, state
  if failures:
    raise CorruptCheckpointError(
        f'no checkpoint in {checkpoint_dir(workdir)} restores: ' +
        '; '.join(f'step {s}: {r}' for s, r in failures) +
        '. Move them away to start from scratch (nothing was changed)')
  return None


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def restore_variables(workdir: str, abstract_variables: Any, step: int | None = None
                      ) -> tuple[int, dict[str, Any]]:
  """(step, {'params', 'batch_stats'}) of a checkpoint, without the optimizer state, verified.

  Only the model's variables are read (`maskrcnn_jax.weights.read_checkpoint_variables`), so the
  checkpoint of a run with any optimizer settings restores into a model of the same
  architecture; a checkpoint of another architecture is a `WeightImportError` naming the
  parameters and shapes (`maskrcnn_jax.weights.from_variables`). `abstract_variables`: the
  ShapeDtypeStructs of the model's variables (``jax.eval_shape`` of its init); `step`: None or
  < 0 for the latest. Raises NoCheckpointError naming the directory and the steps available,
  CorruptCheckpointError naming the step when it does not restore or verify.
  """
  steps = checkpoint_steps(workdir)
  if not steps:
    raise NoCheckpointError(f'no checkpoint in {checkpoint_dir(workdir)}')
  if step is None or step < 0:
    step = steps[-1]
  elif step not in steps:
    raise NoCheckpointError(f'no checkpoint for step {step} in {checkpoint_dir(workdir)} '
                            f'(available: {steps})')
  path = os.path.join(checkpoint_dir(workdir), str(step), STATE_ITEM)
  try:
    meta = read_meta(workdir, step)
    raw = transfer.read_checkpoint_variables(path)
    if meta is not None:
      verify(raw, meta['fingerprint'], prefixes=tuple(raw))
  except transfer.WeightImportError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Orbax / TensorStore errors vary
    _unawaited_read_errors_in_one_line()
    others = [s for s in steps if s != step]
    raise CorruptCheckpointError(
        f'checkpoint step {step} in {checkpoint_dir(workdir)} is unusable: '
        f'{e if isinstance(e, CorruptCheckpointError) else _one_line(e)} '
        f'(other steps: {others or "none"})') from e
  variables = transfer.from_variables(raw, abstract_variables, source_name=f'checkpoint {path}')
  return int(step), {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs of a (possibly lazily built) tree, for `restore`."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, 'shape') else x, tree)
