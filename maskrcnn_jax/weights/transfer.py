"""Starting a model from trained weights: checkpoints of ours (``config.init.checkpoint``) and the
class-dependent layers that a change of ``model.num_classes`` leaves out.

Fine-tuning to other classes keeps everything a source model learnt except the three layers whose
shape depends on the number of classes K (background included): the box classifier
``box_head/class_logits`` (D, K), the box regressor ``box_head/box_deltas`` (D, 4K) and the mask
predictor ``mask_head/mask_logits`` (1, 1, C, K). In our layout the class axis is the last one of
each of their leaves (:data:`CLASS_DEPENDENT`). When the source's class count differs from the
model's (one count, the same in all three layers, every other axis equal), those leaves keep the
model's fresh initialisation and one line per leaf is logged; any other shape mismatch is an
error naming the parameter and both shapes. The torchvision importer
(:mod:`maskrcnn_jax.weights.torchvision`) applies the same rule (:func:`plan_transfer`).

Checkpoints of ours are the ``TrainState`` trees that ``maskrcnn_jax.train.checkpoint`` saves under
``<workdir>/checkpoints/<step>/default``; only ``params`` and ``batch_stats`` are read (no optimizer
state, step or loss scale), restored as NumPy arrays against the source's own shapes.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_LOG = logging.getLogger(__name__)

# (module, layer) of a params path -> multiplier of K on the last axis of its leaves.
CLASS_DEPENDENT: dict[tuple[str, str], int] = {
    ('box_head', 'class_logits'): 1,
    ('box_head', 'box_deltas'): 4,
    ('mask_head', 'mask_logits'): 1,
}
# The collections read from a checkpoint of ours.
COLLECTIONS = ('params', 'batch_stats')


class WeightImportError(ValueError):
  """The weights do not fit the model; the message names the offending keys and shapes."""


class CheckpointMismatchError(WeightImportError):
  """A checkpoint of ours does not fit the model; the message names the parameters and shapes."""


class Comparison(NamedTuple):
  """One leaf present in both the source and the target.

  Attributes:
    path: the leaf's flax path, e.g. ``('params', 'box_head', 'class_logits', 'kernel')``.
    label: how messages name the source leaf (a torchvision key, or the path).
    source_shape: the source value's shape in the flax layout.
    target_shape: the model's shape.
  """
  path: tuple[str, ...]
  label: str
  source_shape: tuple[int, ...]
  target_shape: tuple[int, ...]


def class_multiplier(path: Sequence[str]) -> int:
  """K's multiplier on the last axis of a class-dependent leaf at ``path``; 0 for the others."""
  path = tuple(path)
  return CLASS_DEPENDENT.get(path[-3:-1], 0) if len(path) >= 3 else 0


def is_class_dependent(path: Sequence[str]) -> bool:
  return class_multiplier(path) > 0


def _class_count(path, shape) -> int | None:
  m = class_multiplier(path)
  if not shape or shape[-1] % m:
    return None
  return shape[-1] // m


def plan_transfer(comparisons: Sequence[Comparison]) -> tuple[list[Comparison], list[Comparison]]:
  """Splits the leaves whose shapes differ into (skipped class-dependent ones, errors).

  A class-dependent leaf is skipped (kept freshly initialised) only when every class-dependent
  leaf of the source implies one class count, the target's imply one other count, and the leaf's
  other axes agree. Everything else that differs is an error.
  """
  source_counts, target_counts = set(), set()
  for c in comparisons:
    if is_class_dependent(c.path):
      source_counts.add(_class_count(c.path, c.source_shape))
      target_counts.add(_class_count(c.path, c.target_shape))
  transferable = (len(source_counts) == 1 and len(target_counts) == 1
                  and None not in source_counts and source_counts != target_counts)
  skipped, errors = [], []
  for c in comparisons:
    if tuple(c.source_shape) == tuple(c.target_shape):
      continue
    if (transferable and is_class_dependent(c.path)
        and tuple(c.source_shape[:-1]) == tuple(c.target_shape[:-1])):
      skipped.append(c)
    else:
      errors.append(c)
  return skipped, errors


def log_skipped(skipped: Sequence[Comparison]) -> None:
  """One line per class-dependent leaf kept freshly initialised: source shape -> target shape."""
  for c in skipped:
    m = class_multiplier(c.path)
    name = '/'.join(c.path)
    label = c.label if c.label == name else f'{c.label} ({name})'
    _LOG.info('init: class-dependent %s not loaded: source %s -> target %s (%d -> %d classes); '
              'kept freshly initialised', label, tuple(c.source_shape), tuple(c.target_shape),
              c.source_shape[-1] // m, c.target_shape[-1] // m)


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  return {tuple(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = leaf
  return out


# ------------------------------------------------------------------------------ our checkpoints
def committed_steps(steps_dir: str | pathlib.Path) -> list[int]:
  """The steps of a ``checkpoints`` directory whose save completed, sorted ([] when it does not
  exist). Orbax writes a step under a temporary name and renames it when complete, so only
  finished steps have a purely numeric name (with the item directory ``default`` inside)."""
  steps_dir = pathlib.Path(steps_dir)
  if not steps_dir.is_dir():
    return []
  return sorted(int(d.name) for d in steps_dir.iterdir()
                if d.name.isdigit() and (d / 'default').is_dir())


def checkpoint_item_dir(path: str | pathlib.Path) -> pathlib.Path:
  """The Orbax item directory (``.../<step>/default``) that ``path`` names.

  ``path`` is a workdir of ours (its latest step under ``checkpoints/``), its ``checkpoints``
  directory (the latest step), a step directory ``checkpoints/<step>`` or the item directory
  ``checkpoints/<step>/default`` itself.

  Raises:
    FileNotFoundError: naming ``path`` when it holds no checkpoint.
  """
  p = pathlib.Path(path).expanduser()
  if not p.is_dir():
    raise FileNotFoundError(f'no checkpoint directory at {p}')
  if (p / '_METADATA').is_file() or (p / 'manifest.ocdbt').is_file():
    return p
  if (p / 'default').is_dir():
    return p / 'default'
  steps_dir = p / 'checkpoints' if (p / 'checkpoints').is_dir() else p
  steps = committed_steps(steps_dir)
  if not steps:
    raise FileNotFoundError(
        f'no checkpoint under {p}: expected a workdir (<workdir>/checkpoints/<step>/default), '
        f'its checkpoints directory or a <step> directory')
  return steps_dir / str(steps[-1]) / 'default'


def read_checkpoint_variables(path: str | pathlib.Path) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` (nested dicts of NumPy arrays, the source's own
  shapes and dtypes) of the checkpoint at ``path`` (see :func:`checkpoint_item_dir`); nothing
  else of the saved train state is read."""
  # Orbax is imported here only: the importers of this package do not need it.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  item_dir = checkpoint_item_dir(path)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = checkpointer.metadata(item_dir).item_metadata
    if metadata is None:  # Orbax logged why: a missing or damaged _METADATA / array index
      raise FileNotFoundError(f'{item_dir}: its tree metadata does not read (missing or damaged '
                              'files)')
    collections = {k: metadata[k] for k in COLLECTIONS
                   if k in metadata and jax.tree_util.tree_leaves(metadata[k])}
    if 'params' not in collections:
      raise CheckpointMismatchError(f'checkpoint {item_dir} has no params')
    item = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                                  collections)
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          item)
    restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  finally:
    checkpointer.close()
  restored = {k: jax.tree_util.tree_map(np.asarray, dict(v)) for k, v in restored.items()}
  restored.setdefault('batch_stats', {})
  return restored


def from_variables(source: Mapping[str, Any], target: Mapping[str, Any], *,
                   source_name: str = 'source') -> dict:
  """``target`` (fresh variables) with every leaf replaced by the ``source`` variables' leaf at
  the same path, except the class-dependent layers when the class counts differ (kept from
  ``target``, logged one line per leaf).

  Returns:
    Variables with the structure, shapes and dtypes of ``target`` (abstract shapes are enough
    as the target when nothing is skipped).

  Raises:
    CheckpointMismatchError: naming the missing and unexpected paths and every other shape
      mismatch (path, source shape, target shape).
  """
  src = _flat({k: v for k, v in source.items() if k in COLLECTIONS})
  tgt = _flat({k: v for k, v in target.items() if k in COLLECTIONS})
  missing = sorted('/'.join(p) for p in tgt if p not in src)
  unexpected = sorted('/'.join(p) for p in src if p not in tgt)
  comparisons = [Comparison(p, '/'.join(p), tuple(np.shape(src[p])), tuple(np.shape(t)))
                 for p, t in tgt.items() if p in src]
  skipped, errors = plan_transfer(comparisons)
  problems = []
  if missing:
    problems.append(f'{len(missing)} parameters missing from it: {missing[:20]}')
  if unexpected:
    problems.append(f'{len(unexpected)} parameters the model does not have: {unexpected[:20]}')
  if errors:
    problems.append(f'{len(errors)} shape mismatches (source -> model): ' + ', '.join(
        f'{c.label} {c.source_shape} -> {c.target_shape}' for c in errors[:20]))
  if any(isinstance(tgt[c.path], jax.ShapeDtypeStruct) for c in skipped):
    problems.append('the class-dependent layers have another class count: pass fresh variables, '
                    'not abstract shapes, as the target to keep them freshly initialised')
  if problems:
    raise CheckpointMismatchError(f'{source_name} does not fit the model: ' + '; '.join(problems))
  log_skipped(skipped)
  keep = {c.path for c in skipped}
  merged = {p: (t if p in keep else jnp.asarray(src[p], t.dtype)) for p, t in tgt.items()}
  out = _unflatten(merged)
  for collection in target:
    out.setdefault(collection, target[collection] if collection not in COLLECTIONS else {})
  return out


def load_checkpoint(variables: Mapping[str, Any], path: str | pathlib.Path) -> dict:
  """Fresh model ``variables`` with the params and batch_stats of the checkpoint of ours at
  ``path`` put in (``config.init.checkpoint``; see :func:`checkpoint_item_dir` and
  :func:`from_variables`)."""
  item_dir = checkpoint_item_dir(path)
  _LOG.info('init: loading params and batch_stats of checkpoint %s', item_dir)
  return from_variables(read_checkpoint_variables(item_dir), variables,
                        source_name=f'checkpoint {item_dir}')
