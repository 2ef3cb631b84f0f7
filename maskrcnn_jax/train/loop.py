"""The training and evaluation loop: train, eval and train_and_eval (the reference's modes).

`run(config, workdir)` is what ``maskrcnn_jax.main`` calls. A run is fully determined by its
config and the latest checkpoint in ``<workdir>/checkpoints``: rerunning the same command resumes
from that checkpoint, and the input pipeline continues from the checkpoint's step
(``train_iterator(start_step=step)``), so an interrupted run finishes with the same parameters as
an uninterrupted one. Only this module, `main` and the ``build_*`` functions read the config.

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

import json
import logging
import os
import time
from typing import Any, NamedTuple

import flax.jax_utils
import jax

from maskrcnn_jax.train import checkpoint as ckpt
from maskrcnn_jax.train import metrics as metrics_lib
from maskrcnn_jax.train import optimizer as opt_lib
from maskrcnn_jax.train import precision
from maskrcnn_jax.train import state as state_lib
from maskrcnn_jax.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite (float32 / bfloat16)."""


class TrainResult(NamedTuple):
  """What `train` returns: the final unreplicated state and the last evaluation's metrics line
  (None in train mode)."""
  state: state_lib.TrainState
  eval_metrics: dict[str, Any] | None


# ------------------------------------------------------------------------------ builders
def build_model(config):
  """The Mask R-CNN module of config.model."""
  from maskrcnn_jax import modeling  # pylint: disable=import-outside-toplevel
  return modeling.build_model(config.model)


def build_frozen_mask(config, params):
  """params-shaped bools, True for the parameters frozen by config.model.backbone.freeze_at."""
  from maskrcnn_jax import modeling  # pylint: disable=import-outside-toplevel
  return modeling.frozen_param_mask(params, int(config.model.backbone.freeze_at))


def build_optimizer(config, params):
  """(optax transformation, learning-rate schedule) of config.train for these params."""
  return opt_lib.make_optimizer(opt_lib.settings_from_config(config.train), params,
                                build_frozen_mask(config, params))


def build_loss_scale(config) -> precision.LossScale:
  return precision.LossScale.create(
      config.model.precision == 'float16', float(config.train.loss_scale_initial),
      int(config.train.loss_scale_growth_interval))


class Experiment:
  """The model, optimizer, steps and checkpoint manager of one config (built once per run)."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.model = build_model(config)
    self.dtype = precision.DTYPES[config.model.precision]
    self.num_devices = jax.local_device_count()
    self.accumulation = int(config.train.gradient_accumulation_steps)
    key = jax.random.PRNGKey(int(config.seed))
    self.init_key, self.step_key = jax.random.split(key)
    image_size = tuple(config.data.image_size)
    variables = jax.eval_shape(
        lambda k: state_lib.init_variables(self.model, k, image_size), self.init_key)
    self.tx, self.schedule = build_optimizer(config, variables['params'])
    self.loss_scale = build_loss_scale(config)
    self.frozen_mask = build_frozen_mask(config, variables['params'])
    self.abstract_state = jax.eval_shape(self._fresh_state, self.init_key)
    self.manager = ckpt.create_manager(workdir, int(config.train.max_checkpoints_to_keep))
    mean, std = tuple(config.data.pixel_mean), tuple(config.data.pixel_std)
    self.train_step = step_lib.pmap_train_step(step_lib.make_train_step(
        self.model, self.tx, self.schedule, self.step_key, mean, std, self.dtype,
        mutable_batch_stats=bool(config.model.backbone.finetune_bn),
        accumulation_steps=self.accumulation,
        l2_weight_decay=float(config.train.l2_weight_decay),
        trainable_mask=jax.tree_util.tree_map(lambda f: not f, self.frozen_mask)))
    self.infer_step = step_lib.make_infer_step(self.model, mean, std, self.dtype)

  def _fresh_state(self, key) -> state_lib.TrainState:
    variables = state_lib.init_variables(self.model, key, tuple(self.config.data.image_size))
    return state_lib.create_train_state(variables, self.tx, self.loss_scale)

  def initial_state(self) -> state_lib.TrainState:
    """The latest checkpoint's state, or a freshly initialised one (unreplicated)."""
    if self.manager.latest_step() is not None:
      step = self.manager.latest_step()
      logging.info('resuming from %s step %d', self.manager.directory, step)
      return ckpt.restore(self.manager, self.abstract_state, step)
    logging.info('no checkpoint in %s: initialising (seed %d)', self.manager.directory,
                 self.config.seed)
    variables = self.initial_variables()
    return jax.jit(lambda v: state_lib.create_train_state(v, self.tx, self.loss_scale))(variables)

  def initial_variables(self) -> dict:
    """Fresh variables, with config.init's torchvision weights put in when it names any."""
    variables = state_lib.init_variables(self.model, self.init_key,
                                         tuple(self.config.data.image_size))
    init = self.config.init
    if init.torchvision_maskrcnn or init.torchvision_backbone:
      from maskrcnn_jax import weights  # pylint: disable=import-outside-toplevel
      logging.info('loading torchvision weights: %s',
                   init.torchvision_maskrcnn or init.torchvision_backbone)
      variables = weights.load_pretrained(
          variables, self.config.model, init.torchvision_maskrcnn, init.torchvision_backbone,
          init.torchvision_backbone_prefix)
    return variables

  def save(self, state_replicated, step: int) -> None:
    # NumPy arrays: Orbax writes them from the first process only, the right thing for a state
    # that every host holds identically.
    state = jax.device_get(flax.jax_utils.unreplicate(state_replicated))
    ckpt.save(self.manager, step, state, force=True)

  def evaluate(self, variables_replicated, step: int, writer=None) -> dict[str, float] | None:
    from maskrcnn_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
    line = evaluator.evaluate_split(self.config, self.workdir, step, self.infer_step,
                                    variables_replicated, self.num_devices)
    if line is not None and writer is not None:
      writer.write_scalars(step, {f'eval/{k}': v for k, v in line.items() if k != 'step'})
      writer.flush()
    return line


# ------------------------------------------------------------------------------ helpers
def _writer(workdir: str):
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def _device_batches(config, batch_size: int, start_step: int, num_devices: int):
  """Sharded training batches (num_devices, per-device, ...) prefetched to the devices."""
  from maskrcnn_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  host = pipeline.train_iterator(config, batch_size, start_step=start_step)
  sharded = ({k: b[k].reshape((num_devices, -1) + b[k].shape[1:]) for k in step_lib.TRAIN_KEYS}
             for b in host)
  return flax.jax_utils.prefetch_to_device(sharded, 2, axis_name=step_lib.AXIS)


def _check_finite(collection, precision_name: str, manager) -> None:
  if collection is None or precision_name == 'float16':
    return  # float16 overflows are skipped updates, not errors
  bad = metrics_lib.first_nonfinite_step(collection)
  if bad is not None:
    # Every checkpoint is saved only after the steps before it were checked, so the latest one
    # predates the bad step.
    raise NonFiniteLossError(
        f'the training loss is not finite at step {bad} (the update from {bad} to {bad + 1} '
        f'batches); stopping. The latest checkpoint, step {manager.latest_step()} in '
        f'{manager.directory}, was saved before it and is intact.')


def _save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


# ------------------------------------------------------------------------------ modes
def train(config, workdir: str, evaluate_every: bool = False) -> TrainResult:
  """Trains to config.train.total_steps (resuming), optionally evaluating as train_and_eval."""
  from clu import periodic_actions  # pylint: disable=import-outside-toplevel
  os.makedirs(workdir, exist_ok=True)
  _save_config(config, workdir)
  exp = Experiment(config, workdir)
  k = exp.accumulation
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
  state = exp.initial_state()
  start = int(state.step)
  writer.write_scalars(start, {'effective_batch_size': float(global_batch * k)})
  state = step_lib.replicate(state)
  done_evals = set()
  if evaluate_every:
    from maskrcnn_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
    done_evals = evaluated_steps = evaluator.evaluated_steps(workdir)
    # Killed between a checkpoint at an evaluation boundary and its evaluation: do it now.
    if 0 < start < total and start % eval_every == 0 and start not in evaluated_steps:
      exp.evaluate(state.variables, start, writer)

  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=log_every)
  batches = _device_batches(config, per_host, start, exp.num_devices) if start < total else None
  collection = None
  last_time, last_step = time.time(), start
  try:
    for step in range(start, total):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, m = exp.train_step(state, next(batches))
      m = jax.tree_util.tree_map(lambda x: x[0], m)  # replicated: keep device 0's copy
      collection = m if collection is None else collection.merge(m)
      done = step + 1
      report(done)
      if done % log_every == 0 or done == total:
        _check_finite(collection, config.model.precision, exp.manager)
        scalars = metrics_lib.scalars(collection)
        now = time.time()
        scalars['images_per_sec'] = (done - last_step) * global_batch / max(now - last_time, 1e-9)
        last_time, last_step = now, done
        writer.write_scalars(done, scalars)
        collection = None
      if done % ckpt_every == 0 or done == total:
        _check_finite(collection, config.model.precision, exp.manager)
        exp.save(state, done)
      if evaluate_every and done % eval_every == 0 and done != total:
        exp.evaluate(state.variables, done, writer)
  finally:
    # Also on an error: the checkpoint being written completes, so the last one is intact.
    exp.manager.wait_until_finished()
  last_eval = None
  if evaluate_every and total not in done_evals:
    last_eval = exp.evaluate(state.variables, total, writer)
  writer.flush()
  final = flax.jax_utils.unreplicate(state)
  exp.manager.close()
  return TrainResult(final, last_eval)


def evaluate(config, workdir: str) -> dict[str, float] | None:
  """eval mode: evaluates config.eval.checkpoint_step (-1: the latest checkpoint), or, in a
  workdir without checkpoints, the weights named by config.init.torchvision_maskrcnn (step 0)."""
  _check_has_checkpoint(config, workdir)
  exp = Experiment(config, workdir)
  if exp.manager.latest_step() is None:
    step, variables = 0, exp.initial_variables()
  else:
    step = int(config.eval.checkpoint_step)
    state = ckpt.restore(exp.manager, exp.abstract_state, None if step < 0 else step)
    step, variables = int(state.step), state.variables
  replicated = step_lib.replicate(variables)
  line = exp.evaluate(replicated, step, _writer(workdir))
  exp.manager.close()
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


def check_datasets(config) -> None:
  """Fails fast with DatasetNotPreparedError when a split the mode reads is missing."""
  from maskrcnn_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  splits = {'train': [config.data.train_split], 'eval': [config.data.eval_split],
            'train_and_eval': [config.data.train_split, config.data.eval_split]}[config.mode]
  for split in dict.fromkeys(splits):
    try:
      pipeline.source_from_config(config, split)
    except KeyError as e:  # prepared, but without this split
      raise pipeline.DatasetNotPreparedError(e.args[0]) from None


def run(config, workdir: str):
  """Dispatches on config.mode: 'train', 'eval' or 'train_and_eval'."""
  if config.mode == 'eval':
    _check_has_checkpoint(config, workdir)
  check_datasets(config)
  if config.mode == 'train':
    return train(config, workdir).eval_metrics
  if config.mode == 'eval':
    return evaluate(config, workdir)
  if config.mode == 'train_and_eval':
    return train(config, workdir, evaluate_every=True).eval_metrics
  raise ValueError(f'unknown mode {config.mode!r}')
