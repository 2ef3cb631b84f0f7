"""Inference over the evaluation split and COCO metrics of one set of model variables.

`evaluate_split` runs the pmapped inference step over the evaluation batches (each host its
share, `maskrcnn_jax.data.pipeline.eval_iterator`), gathers the detections on the first process,
converts them to COCO results (`coco.detections_to_results`), writes
``<workdir>/coco_results_step<step>.json`` and returns the COCO metrics (also appended to
``<workdir>/eval_metrics.jsonl``). The ground truth of the split can be indexed once per run
(`split_ground_truth`, by the engine of ``config.eval.engine``) and passed to every evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from maskrcnn_jax.data.spec import INFER_KEYS
from maskrcnn_jax.evaluation import coco
from maskrcnn_jax.train.progress import hms
from maskrcnn_jax.train.step import shard

METRICS_FILE = 'eval_metrics.jsonl'
HOST_KEYS = ('image_ids', 'original_sizes', 'scales', 'example_valid')


def results_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, f'coco_results_step{int(step)}.json')


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def evaluated_steps(workdir: str) -> set[int]:
  """Steps that already have a line in ``eval_metrics.jsonl``."""
  path = metrics_path(workdir)
  if not os.path.exists(path):
    return set()
  steps = set()
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        steps.add(int(json.loads(line)['step']))
  return steps


def _gather_hosts(tree):
  """Stacks every process's NumPy tree along a new leading axis, flattened into the batch axis."""
  if jax.process_count() == 1:
    return tree
  gathered = multihost_utils.process_allgather(tree, tiled=False)
  return jax.tree_util.tree_map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]), gathered)


def predict(infer_fn: Callable, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
            class_to_category: Mapping[int, int], num_devices: int,
            total: int | None = None) -> list[dict[str, Any]]:
  """COCO results of every valid example (on process 0; [] elsewhere).

  infer_fn: the pmapped inference step (variables, {images, image_sizes}) -> detections with a
  leading device axis; variables replicated over the local devices. total: the number of images,
  for the progress lines (about every 10% or every minute, process 0) with elapsed time and ETA.
  """
  results = []
  pending = None
  done, start, last_log = 0, time.time(), time.time()

  def finish(item):
    out, meta = item
    out = jax.tree_util.tree_map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]),
                                 jax.device_get(out))
    out, meta = _gather_hosts((out, meta))
    if jax.process_index() != 0:
      return
    results.extend(coco.detections_to_results(out, meta, class_to_category))
    nonlocal done, last_log
    before, done = done, done + int(np.sum(meta['example_valid']))
    now = time.time()
    if total and done < total and (done * 10 // total > before * 10 // total or
                                   now - last_log > 60):
      last_log, elapsed = now, now - start
      logging.info('evaluation: %d/%d images | elapsed %s | ETA %s', done, total, hms(elapsed),
                   hms(elapsed * (total - done) / max(done, 1)))

  for batch in batches:
    out = infer_fn(variables, shard(batch, INFER_KEYS, num_devices))
    # Host post-processing of the previous batch overlaps the device work of this one.
    if pending is not None:
      finish(pending)
    pending = (out, {k: np.asarray(batch[k]) for k in HOST_KEYS})
  if pending is not None:
    finish(pending)
  return results


def split_ground_truth(source, num_examples: int, engine: str = 'pycocotools'
                       ) -> coco.GroundTruth | None:
  """The ground truth of the first `num_examples` (-1 = all) of the evaluation `source`, indexed
  by `engine` (`coco.ENGINES`), on process 0 (None elsewhere, where no metrics are computed).
  Built once per run, it serves every `evaluate_split` of that run."""
  coco.check_engine(engine)
  if jax.process_index() != 0:
    return None
  start = time.time()
  ground_truth = coco.index_ground_truth(coco.ground_truth_from_source(source, num_examples),
                                         engine)
  logging.info('evaluation ground truth: %d images indexed by %s in %.1f s',
               len(ground_truth.image_sizes), engine, time.time() - start)
  return ground_truth


def evaluate_split(source, batches: Iterable[Mapping[str, np.ndarray]], *, infer_fn: Callable,
                   variables: Any, num_devices: int, num_examples: int, workdir: str,
                   step: int, ground_truth: coco.GroundTruth | None = None,
                   engine: str | None = None) -> dict[str, float] | None:
  """Evaluates the first `num_examples` (-1 = all) of the evaluation `source` at `step`.

  Args:
    source: the evaluation split (`maskrcnn_jax.data.pipeline.Source`): ground truth and the
      class -> category table.
    batches: this host's evaluation batches of those examples (``eval_iterator``).
    infer_fn, variables, num_devices: as `predict`.
    workdir, step: where the results JSON and the metrics line go, and their step.
    ground_truth: `split_ground_truth(source, num_examples, engine)` built once by the caller;
      None builds it here.
    engine: `coco.ENGINES`; None: the ground truth's, or 'pycocotools' when it is built here.

  Returns the metrics (with 'step') on process 0, None elsewhere.
  """
  start = time.time()
  total = len(source) if num_examples < 0 else min(int(num_examples), len(source))
  results = predict(infer_fn, variables, batches, coco.class_to_category_map(source.metadata),
                    num_devices, total)
  if jax.process_index() != 0:
    return None
  seconds = time.time() - start
  if ground_truth is None:
    ground_truth = split_ground_truth(source, num_examples, engine or 'pycocotools')
  coco.write_results(results_path(workdir, step), results)
  start = time.time()
  metrics = coco.coco_metrics(ground_truth, results, image_ids=ground_truth.image_ids,
                              engine=engine)
  line = coco.append_metrics_line(metrics_path(workdir), step, metrics)
  logging.info('evaluation at step %d: %d images, %d detections, %.1f s (inference + '
               'post-processing), %.1f s (%s), bbox AP %.4f, segm AP %.4f', step,
               len(ground_truth.image_sizes), len(results), seconds, time.time() - start,
               ground_truth.engine, metrics['bbox/AP'], metrics['segm/AP'])
  return line
