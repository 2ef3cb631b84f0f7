"""Checkpoints of the unreplicated `TrainState` with an Orbax CheckpointManager.

Layout: ``<workdir>/checkpoints/<step>/``. Saves are asynchronous (the device-to-host copy happens
before `save` returns, the file writing in the background) and the manager keeps the last
``max_to_keep``. Restoring always goes through an abstract target (``jax.eval_shape`` of the
state), so the restored tree has exactly the structure, shapes and dtypes the code expects, and
a checkpoint from an incompatible config fails loudly.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from maskrcnn_jax.weights import transfer


class NoCheckpointError(FileNotFoundError):
  """The workdir holds no checkpoint (or not the requested step)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, max_to_keep: int = 5, save_interval_steps: int = 1,
                   asynchronous: bool = True) -> ocp.CheckpointManager:
  """A manager over ``<workdir>/checkpoints``; ``save_interval_steps`` filters `save` calls."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      enable_async_checkpointing=asynchronous, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
  """Saves an unreplicated state at `step` (asynchronously); False if the interval skipped it."""
  return manager.save(int(step), args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
  """Restores `step` (default: the latest) against `abstract_state` (a tree of ShapeDtypeStructs).

  Raises NoCheckpointError naming the directory when there is nothing to restore.
  """
  steps = manager.all_steps()
  if not steps:
    raise NoCheckpointError(f'no checkpoint in {manager.directory}')
  if step is None or step < 0:
    step = manager.latest_step()
  elif step not in steps:
    raise NoCheckpointError(f'no checkpoint for step {step} in {manager.directory} '
                            f'(available: {sorted(steps)})')
  return manager.restore(int(step), args=ocp.args.StandardRestore(abstract_state))


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps with a committed checkpoint in ``<workdir>/checkpoints`` (sorted), read from the
  directory names without creating anything."""
  return transfer.committed_steps(checkpoint_dir(workdir))


def restore_variables(workdir: str, abstract_variables: Any, step: int | None = None
                      ) -> tuple[int, dict[str, Any]]:
  """(step, {'params', 'batch_stats'}) of a checkpoint, without the optimizer state.

  Only the model's variables are read (`maskrcnn_jax.weights.read_checkpoint_variables`), so the
  checkpoint of a run with any optimizer settings restores into a model of the same
  architecture; a checkpoint of another architecture is a `WeightImportError` naming the
  parameters and shapes (`maskrcnn_jax.weights.from_variables`). `abstract_variables`: the
  ShapeDtypeStructs of the model's variables (``jax.eval_shape`` of its init); `step`: None or
  < 0 for the latest. Raises NoCheckpointError naming the directory and the steps available.
  """
  steps = checkpoint_steps(workdir)
  if not steps:
    raise NoCheckpointError(f'no checkpoint in {checkpoint_dir(workdir)}')
  if step is None or step < 0:
    step = steps[-1]
  elif step not in steps:
    raise NoCheckpointError(f'no checkpoint for step {step} in {checkpoint_dir(workdir)} '
                            f'(available: {steps})')
  path = os.path.join(checkpoint_dir(workdir), str(step), 'default')
  variables = transfer.from_variables(transfer.read_checkpoint_variables(path),
                                      abstract_variables, source_name=f'checkpoint {path}')
  return int(step), {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs of a (possibly lazily built) tree, for `restore`."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, 'shape') else x, tree)
