"""The training and evaluation loop: train, eval and train_and_eval (the reference's modes).

`run(config, workdir)` is what ``maskrcnn_jax.main`` calls. A run is fully determined by its
config and the latest checkpoint in ``<workdir>/checkpoints``: rerunning the same command resumes
from that checkpoint, and the input pipeline continues from the checkpoint's step
(``train_iterator(start_step=step)``), so an interrupted run finishes with the same parameters as
an uninterrupted one. Only this module, `main` and the ``build_*`` functions
(:mod:`maskrcnn_jax.train.experiment`) read the config.

Steps. ``state.step`` counts batches. With gradient accumulation over k batches
(``train.gradient_accumulation_steps``), every duration in config.train (total_steps, warmup,
learning_rate_steps, checkpoint_every_steps, log_every_steps) and eval.every_steps counts
optimizer updates, and the loop trains ``k * total_steps`` batches; checkpoints and metrics are
labelled with the batch count.

train_and_eval alternates as the reference does: train eval.every_steps, evaluate, repeat, and
evaluate at the end. Evaluations already recorded in ``eval_metrics.jsonl`` are not repeated when
a run is resumed.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from typing import Any, Callable, NamedTuple

import flax.jax_utils
import jax
from jax._src import distributed as jax_distributed  # the coordination client (no public API)
import numpy as np

from maskrcnn_jax import configs
from maskrcnn_jax import inference
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.evaluation import evaluator
from maskrcnn_jax.train import benchmark
from maskrcnn_jax.train import checkpoint as ckpt
from maskrcnn_jax.train import experiment
from maskrcnn_jax.train import metrics as metrics_lib
from maskrcnn_jax.train import preemption
from maskrcnn_jax.train import progress as progress_lib
from maskrcnn_jax.train import resume
from maskrcnn_jax.train import state as state_lib
from maskrcnn_jax.train import step as step_lib
from maskrcnn_jax.train import summaries


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite (float32 / bfloat16)."""


class TrainResult(NamedTuple):
  """What `train` returns: the final unreplicated state and the last evaluation's metrics line
  (None in train mode)."""
  state: state_lib.TrainState
  eval_metrics: dict[str, Any] | None


# ------------------------------------------------------------------------------ run state
class Run:
  """An `Experiment` with its workdir: the checkpoint manager, state, saving and evaluation."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.exp = experiment.build_experiment(config)
    self.manager = ckpt.create_manager(workdir, int(config.train.max_checkpoints_to_keep))
    self.ground_truth = None  # the eval split's, indexed once per run (process 0)

  def initial_state(self) -> state_lib.TrainState:
    """The newest usable checkpoint's state (newer unusable ones set aside, each in one logged
    line), or a freshly initialised one (unreplicated)."""
    restored = ckpt.restore_latest(self.manager, self.workdir, self.exp.abstract_state)
    if restored is not None:
      step, state = restored
      logging.info('resuming from %s step %d', self.manager.directory, step)
      return state
    logging.info('no checkpoint in %s: initialising (seed %d)', self.manager.directory,
                 self.config.seed)
    init = self.config.init
    if init.torchvision_maskrcnn or init.torchvision_backbone:
      logging.info('loading torchvision weights: %s',
                   init.torchvision_maskrcnn or init.torchvision_backbone)
    return self.exp.create_state(self.exp.initial_variables())

  def save(self, state_replicated, step: int) -> None:
    # NumPy arrays: Orbax writes them from the first process only, the right thing for a state
    # that every host holds identically.
    state = jax.device_get(flax.jax_utils.unreplicate(state_replicated))
    ckpt.save(self.manager, step, state, force=True, meta={
        'config': _config_dict(self.config), 'layout': _layout()})

  def evaluate(self, variables_replicated, step: int, writer=None) -> dict[str, float] | None:
    config = self.config
    source = experiment.build_source(config, config.data.eval_split)
    if self.ground_truth is None:
      self.ground_truth = evaluator.split_ground_truth(
          source, int(config.eval.num_samples), config.eval.engine)
    batch_size = int(config.eval.per_device_batch_size) * self.exp.num_devices
    line = evaluator.evaluate_split(
        source, experiment.build_eval_iterator(config, batch_size, source=source),
        infer_fn=self.exp.infer_step, variables=variables_replicated,
        num_devices=self.exp.num_devices, num_examples=int(config.eval.num_samples),
        workdir=self.workdir, step=step, ground_truth=self.ground_truth)
    if line is not None and writer is not None:
      writer.write_scalars(step, {f'eval/{k}': v for k, v in line.items() if k != 'step'})
      writer.flush()
    return line


# ------------------------------------------------------------------------------ helpers
def _writer(workdir: str) -> summaries.ScalarWriter:
  """TensorBoard scalars in the workdir, from process 0 only (`summaries`: no TensorFlow)."""
  return summaries.ScalarWriter(workdir if jax.process_index() == 0 else None)


# How long a process waits for the others to compile a step before the run fails.
COMPILE_BARRIER_TIMEOUT_S = 1800


def _compile_on_every_process(fn: Callable, args: tuple, name: str) -> None:
  """In a multi-process run with a persistent compilation cache: compiles `fn` for `args` into
  the cache and returns once every process has (the first call then loads it from the cache).

  Why: on the CPU the first collective of a program sets up a Gloo context, and a process waits
  at most 30 s (fixed in XLA) for the others' keys; a host still compiling then fails the run
  ("Gloo context initialization failed: DEADLINE_EXCEEDED", seen with two processes on a loaded
  2-core machine). The coordination service's barrier waits as long as we choose. (The pmapped
  `Compiled` itself cannot be called: in a multi-process run it expects global-shaped inputs.)
  """
  fn.lower(*args).compile()
  jax_distributed.global_state.client.wait_at_barrier(f'maskrcnn_jax_compiled_{name}',
                                                      COMPILE_BARRIER_TIMEOUT_S * 1000)


def _compile_barrier_applies() -> bool:
  """Whether `_compile_on_every_process` runs: several processes and a compilation cache."""
  return (jax.process_count() > 1 and jax_distributed.global_state.client is not None
          and bool(jax.config.jax_compilation_cache_dir))


def _to_host(collection):
  """Device 0's copy of the replicated metrics, as NumPy (one device-to-host copy; no gather
  on the devices, unlike indexing the pmapped arrays); None stays None."""
  if collection is None:
    return None
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[0], jax.device_get(collection))


def _check_finite(collection, precision_name: str, manager) -> None:
  """NonFiniteLossError when the metrics read back (`_to_host`) saw a non-finite loss."""
  if collection is None or precision_name == 'float16':
    return  # float16 overflows are skipped updates, not errors
  bad = metrics_lib.first_nonfinite_step(collection)
  if bad is None:
    return
  # Every checkpoint is saved only after the losses of the steps before it were checked.
  latest = manager.latest_step()
  where = ('No checkpoint was saved before it (a rerun starts from scratch).' if latest is None
           else f'The latest checkpoint, step {latest} in {manager.directory}, was saved from '
                'finite losses before it.')
  raise NonFiniteLossError(
      f'the training loss is not finite at step {bad} (the update from {bad} to {bad + 1} '
      f'batches); stopping. {where} Try a lower train.learning_rate or a longer '
      'train.warmup_steps, train.gradient_clip_norm > 0, or model.precision=float32.')


def _config_dict(config) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def _layout() -> dict[str, int]:
  return resume.layout(jax.device_count(), jax.process_count())


def _save_config(config, workdir: str, start_step: int) -> None:
  """``<workdir>/config.json`` (the latest run's config) and a copy per run in
  ``<workdir>/config_history/`` (named by the start time and step), so the workdir keeps every
  config it was run with."""
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2)
  history = os.path.join(workdir, 'config_history')
  os.makedirs(history, exist_ok=True)
  stamp = time.strftime('%Y%m%dT%H%M%S')
  with open(os.path.join(history, f'{stamp}_step{start_step}.json'), 'w') as f:
    f.write(text)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(text)


def _check_resume(config, workdir: str) -> int:
  """Before anything is written: compares the command's config with the one the latest
  checkpoint recorded (or ``config.json`` for checkpoints without it; `resume.check_resume`).
  Returns the latest committed step (0 when there is none)."""
  steps = ckpt.checkpoint_steps(workdir)
  if not steps:
    return 0
  try:
    meta = ckpt.read_meta(workdir, steps[-1]) or {}
  except ckpt.CorruptCheckpointError:
    meta = {}  # restoring reports it and falls back
  recorded, source = meta.get('config'), f'checkpoint step {steps[-1]}'
  path = os.path.join(workdir, 'config.json')
  if recorded is None and os.path.isfile(path):
    with open(path) as f:
      recorded, source = json.load(f), path
  if recorded is not None:
    resume.check_resume(config, recorded, meta.get('layout'), _layout(), source)
  return steps[-1]


def _check_classes_and_save_categories(config, workdir: str, source) -> None:
  """Fails (one line) when model.num_classes does not cover the training data's classes (the
  training `source`), before anything compiles; records the category table beside the
  checkpoints (`inference.Predictor`)."""
  experiment.check_num_classes(config, source.metadata,
                               f'{config.data.tfds_name} ({config.data.train_split})')
  if jax.process_index() == 0:
    inference.write_categories(workdir, source.metadata)


def _stop(job: Run, state, step: int, signum: int, saved: bool):
  """Saves the checkpoint of `step` (unless just saved), waits for the writes and raises
  `preemption.Preempted`."""
  if not saved:
    job.save(state, step)
  ckpt.check_saves(job.manager, wait=True)
  raise preemption.Preempted(signum, step, os.path.join(job.manager.directory, str(step)))


# ------------------------------------------------------------------------------ modes
def train(config, workdir: str, evaluate_every: bool = False) -> TrainResult:
  """Trains to config.train.total_steps (resuming), optionally evaluating as train_and_eval.

  Stops cleanly on SIGTERM, SIGINT or SIGUSR1 (`preemption`): a checkpoint at the step reached,
  then `preemption.Preempted`.
  """
  os.makedirs(workdir, exist_ok=True)
  train_source = experiment.build_source(config, config.data.train_split)
  # Checks first, then writes: a refused resume leaves the workdir as it was.
  latest = _check_resume(config, workdir)
  _check_classes_and_save_categories(config, workdir, train_source)
  _save_config(config, workdir, latest)
  job = Run(config, workdir)
  exp = job.exp
  k = exp.accumulation_steps
  t = config.train
  total = int(t.total_steps) * k
  log_every = int(t.log_every_steps) * k
  ckpt_every = int(t.checkpoint_every_steps) * k
  eval_every = int(config.eval.every_steps) * k
  per_host = int(t.per_device_batch_size) * exp.num_devices
  global_batch = per_host * jax.process_count()
  logging.info('devices: %d local, %d global, %d processes; batch %d per device, %d global; '
               'gradient accumulation %d: effective batch %d', exp.num_devices,
               jax.device_count(), jax.process_count(), t.per_device_batch_size, global_batch, k,
               global_batch * k)

  writer = _writer(workdir)
  state = job.initial_state()
  start = int(state.step)
  writer.write_scalars(start, {'effective_batch_size': float(global_batch * k)})
  state = step_lib.replicate(state, exp.devices)
  progress = progress_lib.Progress(start, total)
  with preemption.StopRequests() as stops:
    done_evals = set()
    if evaluate_every:
      done_evals = evaluated_steps = evaluator.evaluated_steps(workdir)
      # Killed between a checkpoint at an evaluation boundary and its evaluation: do it now.
      if 0 < start < total and start % eval_every == 0 and start not in evaluated_steps:
        job.evaluate(state.variables, start, writer)

    batches = None
    if start < total:
      batches = step_lib.device_batches(
          experiment.build_train_iterator(config, per_host, start, source=train_source),
          step_lib.TRAIN_KEYS,
          exp.devices)
    if batches is not None and _compile_barrier_applies():
      first = next(batches)
      batches = itertools.chain([first], batches)
      _compile_on_every_process(exp.train_step, (state, first), 'train_step')
    collection = scalars = None
    last_time, last_step = time.time(), start
    try:
      for step in range(start, total):
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          state, m = exp.train_step(state, next(batches))
        # Merged on the devices (replicated, one copy per device); read back once per interval.
        collection = m if collection is None else collection.merge(m)
        done = step + 1
        progress.step_done(done)
        saved = False
        if done % log_every == 0 or done == total:
          collection = _to_host(collection)
          _check_finite(collection, config.model.precision, job.manager)
          scalars = metrics_lib.scalars(collection)
          now = time.time()
          scalars['images_per_sec'] = (done - last_step) * global_batch / max(now - last_time,
                                                                              1e-9)
          last_time, last_step = now, done
          writer.write_scalars(done, scalars)
          progress.log(done, scalars)
          collection = None
        if done % ckpt_every == 0 or done == total:
          _check_finite(_to_host(collection), config.model.precision, job.manager)
          job.save(state, done)
          saved = True
        ckpt.check_saves(job.manager)
        signum = stops.should_stop()
        if signum and done < total:
          _check_finite(_to_host(collection), config.model.precision, job.manager)
          _stop(job, state, done, signum, saved)
        if evaluate_every and done % eval_every == 0 and done != total:
          job.evaluate(state.variables, done, writer)
      ckpt.check_saves(job.manager, wait=True)
    finally:
      # Also on an error: the checkpoint being written completes, so the last one is intact.
      _finish_writes(job.manager)
    last_eval = None
    if evaluate_every and total not in done_evals:
      signum = stops.should_stop()
      if signum:  # the final checkpoint is saved; a rerun evaluates it
        raise preemption.Preempted(signum, total, os.path.join(job.manager.directory, str(total)))
      last_eval = job.evaluate(state.variables, total, writer)
  writer.close()
  final = flax.jax_utils.unreplicate(state)
  job.manager.close()
  results = evaluator.results_path(workdir, total) if last_eval else None
  progress.summary(total, checkpoints=str(job.manager.directory), last_scalars=scalars,
                   eval_line=last_eval, results=results)
  return TrainResult(final, last_eval)


def _finish_writes(manager) -> None:
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  # reported by check_saves already
    logging.debug('checkpoint writes ended with %s', e)


def evaluate(config, workdir: str) -> dict[str, float] | None:
  """eval mode: evaluates config.eval.checkpoint_step (-1: the latest checkpoint), or, in a
  workdir without checkpoints, the weights named by config.init.torchvision_maskrcnn (step 0)."""
  _check_has_checkpoint(config, workdir)
  job = Run(config, workdir)
  if job.manager.latest_step() is None:
    step, variables = 0, job.exp.initial_variables()
  else:  # the model's variables only: a run's optimizer settings need not be repeated
    step, variables = ckpt.restore_variables(workdir, job.exp.abstract_variables,
                                             int(config.eval.checkpoint_step))
  replicated = step_lib.replicate(variables, job.exp.devices)
  with _writer(workdir) as writer:
    line = job.evaluate(replicated, step, writer)
  job.manager.close()
  if line is not None:
    logging.info('metrics: %s', json.dumps(line))
  return line


def _check_has_checkpoint(config, workdir: str) -> None:
  """Fails fast, before the model is built, when eval has nothing to evaluate."""
  directory = ckpt.checkpoint_dir(workdir)
  has_checkpoint = os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))
  if not has_checkpoint and not config.init.torchvision_maskrcnn:
    raise ckpt.NoCheckpointError(
        f'no checkpoint in {directory} (and config.init.torchvision_maskrcnn names no weights)')


def check_datasets(config, splits) -> None:
  """Fails fast with DatasetNotPreparedError when one of `splits` is not prepared."""
  for split in dict.fromkeys(splits):
    try:
      experiment.build_source(config, split)
    except KeyError as e:  # prepared, but without this split
      raise pipeline.DatasetNotPreparedError(e.args[0]) from None


def _benchmark(config, workdir: str) -> dict:
  result = benchmark.run_config_benchmark(config)
  os.makedirs(workdir, exist_ok=True)
  benchmark.write_json(result, os.path.join(workdir, f'{config.mode}.json'))
  print(benchmark.summary_line(result))
  return result


class Mode(NamedTuple):
  """One entry of the mode table: what config.mode runs and the data splits it reads."""
  run: Callable[[Any, str], Any]
  splits: Callable[[Any], tuple[str, ...]]
  needs_checkpoint: bool = False


# The one mode table (config.mode -> Mode); main validates and dispatches through it.
MODES = {
    'train': Mode(lambda c, w: train(c, w).eval_metrics, lambda c: (c.data.train_split,)),
    'eval': Mode(evaluate, lambda c: (c.data.eval_split,), needs_checkpoint=True),
    'train_and_eval': Mode(lambda c, w: train(c, w, evaluate_every=True).eval_metrics,
                           lambda c: (c.data.train_split, c.data.eval_split)),
    # Throughput on synthetic data (no TensorFlow) unless config.benchmark.data = 'real'.
    'benchmark_train': Mode(_benchmark, lambda c: _real(c, c.data.train_split)),
    'benchmark_inference': Mode(_benchmark, lambda c: _real(c, c.data.eval_split)),
}


def _real(config, split: str) -> tuple[str, ...]:
  return (split,) if config.benchmark.data == 'real' else ()


def check_mode(config) -> Mode:
  """The `Mode` of config.mode; `ConfigError` naming the key otherwise."""
  if config.mode not in MODES:
    raise configs.ConfigError(f"config key 'mode' = {config.mode!r}: must be one of "
                              f'{list(MODES)}')
  return MODES[config.mode]


def run(config, workdir: str):
  """Runs config.mode from the mode table `MODES`; returns its metrics line or result."""
  mode = check_mode(config)
  if mode.needs_checkpoint:
    _check_has_checkpoint(config, workdir)
  check_datasets(config, mode.splits(config))
  return mode.run(config, workdir)
