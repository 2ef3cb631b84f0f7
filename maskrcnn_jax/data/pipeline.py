"""Training and evaluation input pipelines over the `coco_instances` TFDS dataset.

Random access, not a stream: the dataset is read with ``tfds`` array_record data sources and every
example of the run has a fixed global position. With global batch G = batch_size * process_count,
host p fills slot j of step s from position ``q = s * G + p * batch_size + j``; position q is record
``perm_e[q mod n]`` of epoch ``e = q // n``, where ``perm_e`` is a permutation of the trainable
records seeded by (seed, e), and the flip of position q is drawn from a generator seeded by
(seed, q). A run restarted at step s therefore yields exactly the batches an uninterrupted run
would from step s on, without reading the skipped examples (`train_iterator(..., start_step=s)`).

Examples are decoded and preprocessed (`preprocess.process_example`) by a pool of threads writing
into preallocated batch arrays; JPEG decoding, PIL resizing and NumPy copies release the GIL.
Batches are produced in order, ``prefetch_batches`` ahead of the consumer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import logging
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np

from maskrcnn_jax.settings import InputSettings
from maskrcnn_jax.data import preprocess
from maskrcnn_jax.data import spec

Batch = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------ dataset
class DatasetNotPreparedError(FileNotFoundError):
  """The TFDS dataset named in the config has not been (completely) prepared."""


def _builder(name: str, data_dir: str | None):
  """The prepared TFDS builder `name` ('coco_instances[/config][:version]') under data_dir."""
  # TensorFlow boundary: only reading a prepared dataset imports TFDS (and TensorFlow).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.data import coco_builder  # pylint: disable=g-import-not-at-top,unused-import
  data_dir = data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception:  # a config made from paths is not registered: read it from its files
    root = os.path.join(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR),
                        *name.replace(':', '/').split('/'))
    candidates = sorted(
        (d for d in ([root] + [os.path.join(root, v) for v in (os.listdir(root)
                                                               if os.path.isdir(root) else [])])
         if os.path.isfile(os.path.join(d, 'dataset_info.json'))),
        key=lambda d: [int(x) if x.isdigit() else 0 for x in os.path.basename(d).split('.')])
    if not candidates:
      raise DatasetNotPreparedError(
          f'dataset {name!r} is not prepared under {data_dir or "the TFDS default data_dir"}; '
          'build it with `python -m maskrcnn_jax.data.prepare` (docs/data.md)') from None
    builder = tfds.builder_from_directory(candidates[-1])
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f'dataset {name!r} is not prepared under {builder.data_dir}; build it with '
        '`python -m maskrcnn_jax.data.prepare` (docs/data.md)')
  return builder


class Source:
  """One split of a prepared dataset: random-access records (image left encoded) + metadata.

  ``source[i]`` is record i (a dict as in `coco_builder`, sequences as lists); ``metadata`` is the
  dataset's metadata.json (category table, per-split image ids and object counts).
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # TF boundary
    builder = _builder(name, data_dir)
    if split not in builder.info.splits:
      raise KeyError(f'dataset {name!r} has no split {split!r} '
                     f'(it has {sorted(builder.info.splits)})')
    self.name, self.split, self.data_dir = name, split, builder.data_dir
    self.records = builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
    with open(os.path.join(builder.data_dir, 'metadata.json')) as f:
      self.metadata: dict[str, Any] = json.load(f)
    split_md = self.metadata['splits'][split]
    self.image_ids = np.asarray(split_md['image_ids'], np.int64)
    self.num_objects = np.asarray(split_md['num_objects'], np.int64)
    self.num_crowd_objects = np.asarray(split_md['num_crowd_objects'], np.int64)
    if len(self.records) != len(self.image_ids):
      raise ValueError(f'{self.data_dir}: {len(self.records)} records but the metadata lists '
                       f'{len(self.image_ids)} images')

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.records[int(index)]
    # Record order is image-id order (disable_shuffling); a mismatch means a foreign dataset.
    if int(record['image_id']) != self.image_ids[index]:
      raise ValueError(f'{self.data_dir}: record {index} is image id {record["image_id"]}, '
                       f'the metadata says {self.image_ids[index]}')
    return record


# ------------------------------------------------------------------------------------ sampling
def trainable_indices(source: Source, skip_crowd: bool, keep_empty: bool) -> np.ndarray:
  """Record indices used for training: those with ground truth, unless keep_empty. (K,) int64."""
  usable = source.num_objects - (source.num_crowd_objects if skip_crowd else 0)
  return np.flatnonzero((usable > 0) | keep_empty).astype(np.int64)


def objects_over_cap(split_metadata: dict[str, Any], max_instances: int, skip_crowd: bool
                     ) -> tuple[int, int]:
  """(images, objects) beyond max_instances objects per image in one split of the metadata.

  split_metadata: ``metadata['splits'][split]`` (its per-record ``num_objects`` and
  ``num_crowd_objects``). Objects are counted as `preprocess.process_example` keeps them: without
  crowd objects when skip_crowd (training), all of them otherwise; each image keeps its first
  max_instances (annotation-id order) and drops the rest, the objects counted here.
  """
  counts = np.asarray(split_metadata['num_objects'], np.int64)
  if skip_crowd:
    counts = counts - np.asarray(split_metadata['num_crowd_objects'], np.int64)
  excess = np.maximum(counts - int(max_instances), 0)
  return int(np.count_nonzero(excess)), int(excess.sum())


class TrainSampler:
  """Maps global example positions to (record index, flip) deterministically (see module doc)."""

  def __init__(self, indices: np.ndarray, seed: int, hflip: bool):
    if len(indices) == 0:
      raise ValueError('no training examples (every image lacks usable annotations)')
    self.indices, self.seed, self.hflip = np.asarray(indices), int(seed), hflip
    self._perms = collections.OrderedDict()

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      rng = np.random.default_rng([self.seed, 0, epoch])
      self._perms[epoch] = self.indices[rng.permutation(len(self.indices))]
      while len(self._perms) > 2:
        self._perms.popitem(last=False)
    return self._perms[epoch]

  def __call__(self, position: int) -> tuple[int, bool]:
    epoch, offset = divmod(int(position), len(self.indices))
    flip = self.hflip and bool(np.random.default_rng([self.seed, 1, int(position)]).random() < 0.5)
    return int(self._perm(epoch)[offset]), flip


# ------------------------------------------------------------------------------------ execution
def _batches(plans: Iterator[list[tuple[int, bool] | None]], make_batch: Callable[[], Batch],
             fill: Callable[[Batch, int, int, bool], None], num_workers: int,
             prefetch_batches: int) -> Iterator[Batch]:
  """Runs `fill` for every slot of every planned batch on a thread pool; yields in order.

  plans: per batch, one (record index, flip) or None (an empty, invalid slot) per slot.
  """
  pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers), 'maskrcnn_data')
  pending = collections.deque()
  plans = iter(plans)
  try:
    exhausted = False
    while True:
      while not exhausted and len(pending) <= prefetch_batches:
        plan = next(plans, None)
        if plan is None:
          exhausted = True
          break
        batch = make_batch()
        futures = [pool.submit(fill, batch, slot, *item)
                   for slot, item in enumerate(plan) if item is not None]
        pending.append((batch, futures))
      if not pending:
        return
      batch, futures = pending.popleft()
      for future in futures:
        future.result()  # re-raises a worker's exception here, in order
      yield batch
  finally:
    try:
      pool.shutdown(wait=False, cancel_futures=True)
    except Exception:  # pylint: disable=broad-except
      pass  # a generator finalised at interpreter exit finds concurrent.futures half torn down


def _process_info(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return int(process_index), int(process_count)


def _num_workers(num_workers: int) -> int:
  return num_workers if num_workers > 0 else (os.cpu_count() or 1)


def _fill_fn(source: Source, settings: InputSettings, skip_crowd: bool):
  def fill(batch: Batch, slot: int, index: int, flip: bool) -> None:
    preprocess.process_example(source[index], batch, slot, canvas=tuple(settings.image_size),
                               gt_mask_size=settings.gt_mask_size, flip=flip,
                               skip_crowd=skip_crowd)
  return fill


def _empty_batch(settings: InputSettings, batch_size: int) -> Callable[[], Batch]:
  return functools.partial(spec.empty_batch, batch_size, tuple(settings.image_size),
                           settings.max_instances, settings.gt_mask_size)


def train_iterator(source: Source, settings: InputSettings, batch_size: int,
                   start_step: int = 0, *, seed: int, process_index: int | None = None,
                   process_count: int | None = None, num_workers: int | None = None
                   ) -> Iterator[Batch]:
  """Infinite iterator of this host's training batches of `source`, from `start_step` on.

  batch_size: examples per batch on this host (per-device batch x local devices). seed: of the
  shuffle and the flips (the run's seed). process_index / process_count default to jax's;
  num_workers to ``settings.num_workers``. Batches follow `spec.batch_spec`; example_valid is
  all True. Logs a warning once (process 0) when images hold more objects than
  ``settings.max_instances``, with how many objects are dropped (`objects_over_cap`).
  """
  process_index, process_count = _process_info(process_index, process_count)
  skip_crowd = settings.skip_crowd_during_training
  images, objects = objects_over_cap(source.metadata['splits'][source.split],
                                     settings.max_instances, skip_crowd)
  if objects and process_index == 0:
    logging.warning('%s %s: training drops %d objects of %d images beyond data.max_instances = %d '
                    '(each image keeps its first %d)', source.name, source.split, objects, images,
                    settings.max_instances, settings.max_instances)
  sampler = TrainSampler(
      trainable_indices(source, skip_crowd, settings.keep_images_without_annotations_in_training),
      seed, settings.augment_hflip)
  global_batch = batch_size * process_count

  def plans():
    step = int(start_step)
    while True:
      first = step * global_batch + process_index * batch_size
      yield [sampler(first + j) for j in range(batch_size)]
      step += 1

  workers = settings.num_workers if num_workers is None else num_workers
  return _batches(plans(), _empty_batch(settings, batch_size),
                  _fill_fn(source, settings, skip_crowd), _num_workers(workers),
                  settings.prefetch_batches)


def num_eval_batches(num_examples: int, batch_size: int, process_count: int) -> int:
  """Batches per host to cover num_examples (the same on every host)."""
  per_host = -(-num_examples // process_count)
  return -(-per_host // batch_size)


def eval_iterator(source: Source, settings: InputSettings, batch_size: int,
                  num_examples: int = -1, *, process_index: int | None = None,
                  process_count: int | None = None, num_workers: int | None = None
                  ) -> Iterator[Batch]:
  """One pass over the evaluation `source`, this host's share.

  Host p takes records p, p + P, p + 2P... of the first num_examples (-1 = all) in image-id
  order; no flip, crowd objects kept (gt_is_crowd). Every host yields `num_eval_batches` batches;
  slots past the end are zero with example_valid False, so batch shapes never change.
  """
  process_index, process_count = _process_info(process_index, process_count)
  total = len(source) if num_examples < 0 else min(num_examples, len(source))
  mine = list(range(process_index, total, process_count))
  count = num_eval_batches(total, batch_size, process_count)

  def plans():
    for b in range(count):
      chunk = mine[b * batch_size:(b + 1) * batch_size]
      yield [(i, False) for i in chunk] + [None] * (batch_size - len(chunk))

  workers = settings.num_workers if num_workers is None else num_workers
  return _batches(plans(), _empty_batch(settings, batch_size),
                  _fill_fn(source, settings, skip_crowd=False), _num_workers(workers),
                  settings.prefetch_batches)
