"""The experiment builder: one config (and the devices) -> everything a run computes with.

`build_experiment(config)` gives the model, the optimizer and its schedule, the loss scale, the
frozen-parameter mask, the abstract variables and train state, the random keys, and the pmapped
train and inference steps. The training loop, evaluation, the benchmarks (`bench/`,
:mod:`maskrcnn_jax.train.benchmark`) and inference all start from it, so the model they run is
the same by construction. The other ``build_*`` functions here are the only readers of the
config besides ``main`` and the loop; everything they build takes explicit arguments.

Random keys: ``PRNGKey(config.seed)`` is split into the initialisation key and the step key;
step s on device d samples with ``fold_in(fold_in(step_key, s), d)`` (``train.loss_normalization
= 'per_device'``); with 'global', every device gets ``fold_in(step_key, s)`` and the model folds
in each image's index in the global batch (:func:`maskrcnn_jax.train.step.train_step`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax

from maskrcnn_jax import settings
from maskrcnn_jax import modeling
from maskrcnn_jax import weights
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.train import optimizer as opt_lib
from maskrcnn_jax.train import precision
from maskrcnn_jax.train import state as state_lib
from maskrcnn_jax.train import step as step_lib


def build_model(config, inference: bool = False) -> modeling.MaskRCNN:
  """The Mask R-CNN module of config.model (``inference``: the inference step's, with
  model.inference_products; otherwise model.train_products)."""
  return modeling.build_model(config.model, inference)


def build_frozen_mask(config, params) -> Any:
  """params-shaped bools, True for the parameters frozen by config.model.backbone.freeze_at."""
  return modeling.frozen_param_mask(params, int(config.model.backbone.freeze_at))


def build_optimizer(config, params) -> tuple[Any, Callable]:
  """(optax transformation, learning-rate schedule) of config.train for these params."""
  return opt_lib.make_optimizer(settings.OptimizerSettings.from_config(config.train), params,
                                build_frozen_mask(config, params))


def build_loss_normalization(config) -> str:
  """config.train.loss_normalization: 'per_device' or 'global' (`step_lib.train_step`)."""
  return settings.read_key(config, 'train.loss_normalization',
                           settings.choice(*settings.LOSS_NORMALIZATIONS))


def build_loss_scale(config) -> precision.LossScale:
  return precision.LossScale.create(
      config.model.precision == 'float16', float(config.train.loss_scale_initial),
      int(config.train.loss_scale_growth_interval))


def build_initial_variables(config, model, key) -> dict:
  """Fresh variables of `model`, with the weights of config.init put in: the params and
  batch_stats of a checkpoint of ours (init.checkpoint) or torchvision state dicts. A source
  with another model.num_classes fills all but the class-dependent layers (box classifier, box
  regressor, mask predictor), which keep this fresh initialisation (one log line per tensor);
  any other mismatch raises `weights.WeightImportError` naming the parameter and both shapes."""
  init = config.init
  if init.checkpoint and (init.torchvision_maskrcnn or init.torchvision_backbone):
    # validate_config says so too; this guards configs changed after validation.
    raise settings.ConfigError('config keys \'init.checkpoint\' and \'init.torchvision_*\' are '
                               'both set: give only one')
  variables = modeling.init_variables(model, key, tuple(config.data.image_size))
  if init.checkpoint:
    return weights.load_checkpoint(variables, init.checkpoint)
  if not (init.torchvision_maskrcnn or init.torchvision_backbone):
    return variables
  b = config.model.backbone
  return weights.load_pretrained(
      variables, maskrcnn_path=init.torchvision_maskrcnn, backbone_path=init.torchvision_backbone,
      backbone_prefix=init.torchvision_backbone_prefix, depth=int(b.depth),
      finetune_bn=bool(b.finetune_bn), pooler_size=int(config.model.roi.pooler_size),
      min_level=int(config.model.min_level))


def required_num_classes(metadata) -> int:
  """The smallest model.num_classes a prepared dataset needs: its largest class index + 1 (the
  metadata's ``class_index_to_category_id`` table; the largest category id + 1 without one, as
  `maskrcnn_jax.evaluation.coco.class_to_category_map` reads it)."""
  table = metadata.get('class_index_to_category_id')
  indices = ([int(k) for k in table] if table else
             [int(c['id']) for c in metadata.get('categories', [])])
  return max(indices, default=0) + 1


def check_num_classes(config, metadata, dataset_name: str) -> None:
  """Raises `settings.ConfigError` (one line) when config.model.num_classes is too small for the
  classes of a prepared dataset (`Source.metadata`; see `required_num_classes`)."""
  have, need = int(config.model.num_classes), required_num_classes(metadata)
  if have < need:
    raise settings.ConfigError(
        f'config key \'model.num_classes\' = {have} is too small for dataset {dataset_name}: its '
        f'largest class index is {need - 1}, so it needs model.num_classes >= {need}')


def input_settings(config) -> settings.InputSettings:
  return settings.InputSettings.from_config(config.data)


def build_source(config, split: str):
  """The prepared TFDS `Source` of config.data for `split` (TensorFlow is imported there)."""
  return pipeline.Source(config.data.tfds_name, split, config.data.tfds_data_dir or None)


def build_train_iterator(config, batch_size: int, start_step: int = 0, *, source=None,
                         seed: int | None = None, **kwargs) -> Iterator[dict]:
  """This host's training batches of config.data.train_split from `start_step` (resumable);
  `kwargs` go to :func:`maskrcnn_jax.data.pipeline.train_iterator`."""
  source = source or build_source(config, config.data.train_split)
  return pipeline.train_iterator(source, input_settings(config), batch_size, start_step,
                                 seed=int(config.seed) if seed is None else seed, **kwargs)


def build_eval_iterator(config, batch_size: int, *, source=None, **kwargs) -> Iterator[dict]:
  """One pass over config.eval.num_samples examples of config.data.eval_split."""
  source = source or build_source(config, config.data.eval_split)
  return pipeline.eval_iterator(source, input_settings(config), batch_size,
                                int(config.eval.num_samples), **kwargs)


@dataclasses.dataclass
class Experiment:
  """What `build_experiment` builds (see the module docstring).

  Attributes:
    config: the config it was built from.
    model: the flax module.
    devices: the local devices the steps are mapped over.
    tx, schedule: optimizer and learning rate as a function of the update count.
    loss_scale: the initial `LossScale` (dynamic with float16).
    frozen_mask: params-shaped bools, True for frozen parameters.
    abstract_variables, abstract_state: ShapeDtypeStruct trees (restore targets).
    init_key, step_key: the run's keys.
    train_step: pmapped (state, batch) -> (state, metrics), the state donated.
    infer_step: pmapped (variables, batch) -> detections.
  """
  config: Any
  model: modeling.MaskRCNN
  devices: Sequence[Any]
  tx: Any
  schedule: Callable
  loss_scale: precision.LossScale
  frozen_mask: Any
  abstract_variables: Any
  abstract_state: state_lib.TrainState
  init_key: jax.Array
  step_key: jax.Array
  train_step: Callable
  infer_step: Callable

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def accumulation_steps(self) -> int:
    return int(self.config.train.gradient_accumulation_steps)

  def initial_variables(self) -> dict:
    """Fresh variables (init_key), with config.init's torchvision weights put in."""
    return build_initial_variables(self.config, self.model, self.init_key)

  def create_state(self, variables) -> state_lib.TrainState:
    """The step-0 train state of these variables (unreplicated)."""
    return jax.jit(lambda v: state_lib.create_train_state(v, self.tx, self.loss_scale))(variables)


def build_experiment(config, devices: Sequence[Any] | None = None) -> Experiment:
  """The `Experiment` of `config` on `devices` (default: every device of every process).

  By default the steps are pmapped over all devices (``jax.pmap(devices=None)``): in a
  multi-process run the collectives (the gradient average, the metrics) then span every process,
  and `Experiment.devices` (what this process replicates the state onto and feeds) are its local
  devices. An explicit `devices` list (a subset, single process only) maps over those alone: pmap
  with ``devices=`` is local to each process, so its collectives would not cross processes.
  """
  if devices is None:
    devices, pmap_devices = jax.local_devices(), None
  else:
    if jax.process_count() > 1:
      raise ValueError('build_experiment(devices=...) in a multi-process run: the steps would '
                       'average gradients within each process only; leave devices=None')
    devices = pmap_devices = list(devices)
  model = build_model(config)
  init_key, step_key = jax.random.split(jax.random.PRNGKey(int(config.seed)))
  image_size = tuple(config.data.image_size)
  abstract_variables = jax.eval_shape(
      lambda k: modeling.init_variables(model, k, image_size), init_key)
  params = abstract_variables['params']
  tx, schedule = build_optimizer(config, params)
  loss_scale = build_loss_scale(config)
  frozen_mask = build_frozen_mask(config, params)
  abstract_state = jax.eval_shape(
      lambda v: state_lib.create_train_state(v, tx, loss_scale), abstract_variables)
  dtype = modeling.DTYPES[config.model.precision]
  mean, std = tuple(config.data.pixel_mean), tuple(config.data.pixel_std)
  train_fn = step_lib.make_train_step(
      model, tx, schedule, step_key, mean, std, dtype,
      mutable_batch_stats=bool(config.model.backbone.finetune_bn),
      accumulation_steps=int(config.train.gradient_accumulation_steps),
      l2_weight_decay=float(config.train.l2_weight_decay),
      trainable_mask=jax.tree_util.tree_map(lambda f: not f, frozen_mask),
      loss_normalization=build_loss_normalization(config))
  infer_fn = step_lib.make_infer_step(build_model(config, inference=True), mean, std, dtype)
  return Experiment(
      config=config, model=model, devices=devices, tx=tx, schedule=schedule,
      loss_scale=loss_scale, frozen_mask=frozen_mask, abstract_variables=abstract_variables,
      abstract_state=abstract_state, init_key=init_key, step_key=step_key,
      train_step=step_lib.pmap_train_step(train_fn, pmap_devices),
      infer_step=step_lib.pmap_infer_step(infer_fn, pmap_devices))
