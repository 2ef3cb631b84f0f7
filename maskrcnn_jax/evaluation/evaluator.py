"""Inference over the evaluation split and COCO metrics of one set of model variables.

`evaluate_split` runs the pmapped inference step over `maskrcnn_jax.data.eval_iterator` (each
host its share), gathers the detections on the first process, converts them to COCO results
(`coco.detections_to_results`), writes ``<workdir>/coco_results_step<step>.json`` and returns the
pycocotools metrics (also appended to ``<workdir>/eval_metrics.jsonl``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from maskrcnn_jax.evaluation import coco

METRICS_FILE = 'eval_metrics.jsonl'
HOST_KEYS = ('image_ids', 'original_sizes', 'scales', 'example_valid')


def results_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, f'coco_results_step{int(step)}.json')


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def evaluated_steps(workdir: str) -> set[int]:
  """Steps that already have a line in ``eval_metrics.jsonl``."""
  import json  # pylint: disable=import-outside-toplevel
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


def _shard(batch: Mapping[str, np.ndarray], keys, num_devices: int) -> dict[str, np.ndarray]:
  """(B, ...) host arrays -> (num_devices, B / num_devices, ...)."""
  return {k: batch[k].reshape((num_devices, -1) + batch[k].shape[1:]) for k in keys}


def _gather_hosts(tree):
  """Stacks every process's NumPy tree along a new leading axis, flattened into the batch axis."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  gathered = multihost_utils.process_allgather(tree, tiled=False)
  return jax.tree_util.tree_map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]), gathered)


def predict(infer_fn: Callable, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
            class_to_category: Mapping[int, int], num_devices: int) -> list[dict[str, Any]]:
  """COCO results of every valid example (on process 0; [] elsewhere).

  infer_fn: the pmapped inference step (variables, {images, image_sizes}) -> detections with a
  leading device axis; variables replicated over the local devices.
  """
  results = []
  pending = None

  def finish(item):
    out, meta = item
    out = jax.tree_util.tree_map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]),
                                 jax.device_get(out))
    out, meta = _gather_hosts((out, meta))
    if jax.process_index() == 0:
      results.extend(coco.detections_to_results(out, meta, class_to_category))

  for batch in batches:
    out = infer_fn(variables, _shard(batch, ('images', 'image_sizes'), num_devices))
    # Host post-processing of the previous batch overlaps the device work of this one.
    if pending is not None:
      finish(pending)
    pending = (out, {k: np.asarray(batch[k]) for k in HOST_KEYS})
  if pending is not None:
    finish(pending)
  return results


def evaluate_split(config, workdir: str, step: int, infer_fn: Callable, variables: Any,
                   num_devices: int) -> dict[str, float] | None:
  """Evaluates on config.data.eval_split (config.eval.num_samples examples) at `step`.

  Returns the metrics (with 'step') on process 0, None elsewhere.
  """
  from maskrcnn_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  start = time.time()
  source = pipeline.source_from_config(config, config.data.eval_split)
  num = int(config.eval.num_samples)
  batch_size = int(config.eval.per_device_batch_size) * num_devices
  batches = pipeline.eval_iterator(config, batch_size, num_examples=num, source=source)
  results = predict(infer_fn, variables, batches, coco.class_to_category_map(source.metadata),
                    num_devices)
  if jax.process_index() != 0:
    return None
  seconds = time.time() - start
  ground_truth = coco.ground_truth_from_source(source, num)
  coco.write_results(results_path(workdir, step), results)
  metrics = coco.coco_metrics(ground_truth, results,
                              image_ids=[im['id'] for im in ground_truth['images']])
  line = coco.append_metrics_line(metrics_path(workdir), step, metrics)
  logging.info('evaluation at step %d: %d images, %d detections, %.1f s (inference + '
               'post-processing), bbox AP %.4f, segm AP %.4f', step,
               len(ground_truth['images']), len(results), seconds, metrics['bbox/AP'],
               metrics['segm/AP'])
  return line
