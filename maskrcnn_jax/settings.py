"""The typed settings read from a config: the config schema.

A value is written in one place only, the config file (``configs/*.py``). The modules, the input
pipeline and the optimizer take frozen settings dataclasses whose fields are named exactly like
the config keys and carry their own check (`setting`); `from_config` builds one from its config
section and raises `ConfigError` naming the dotted key at fault (e.g. ``model.rpn.fg_fraction``),
also for a key of the section that no field reads. No JAX here: ``main`` validates a config
before anything heavy is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import ml_collections

PRECISIONS = ('float32', 'bfloat16', 'float16')
KERNEL_GRADS = ('xla', 'matmul')  # maskrcnn_jax.ops.conv
# config.model.inference_products and train_products (modeling.layers.Conv)
PRODUCTS = ('float32', 'bfloat16')
MASK_TRAIN_SLOTS = ('fixed', 'bucketed')  # config.model.mask.train_slots (MaskRCNN.losses)
RESNET_DEPTHS = (18, 34, 50, 101)
ANCHOR_CONVENTIONS = ('reference', 'torchvision')
RPN_BOX_NORMALIZERS = ('positives_per_level', 'sampled')
ROI_BOX_NORMALIZERS = ('foreground', 'sampled')
LOSS_NORMALIZATIONS = ('per_device', 'global')  # config.train.loss_normalization
EVAL_ENGINES = ('pycocotools', 'faster_coco_eval')  # config.eval.engine


class ConfigError(ValueError):
  """A config value is missing or out of range; the message names the dotted key."""


# ------------------------------------------------------------------------------ checks
class _Invalid(ValueError):
  """Raised by a check with the requirement the value fails."""


Check = Callable[[Any], Any]


def integer(low: int | None = None, high: int | None = None) -> Check:
  def check(v):
    if not isinstance(v, int) or isinstance(v, bool):
      raise _Invalid('must be an integer')
    if low is not None and v < low:
      raise _Invalid(f'must be >= {low}')
    if high is not None and v > high:
      raise _Invalid(f'must be <= {high}')
    return int(v)
  return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False) -> Check:
  def check(v):
    if not isinstance(v, (int, float)) or isinstance(v, bool):
      raise _Invalid('must be a number')
    if low is not None and not (v > low if low_open else v >= low):
      raise _Invalid(f'must be {">" if low_open else ">="} {low}')
    if high is not None and v > high:
      raise _Invalid(f'must be <= {high}')
    return float(v)
  return check


def boolean(v):
  if not isinstance(v, bool):
    raise _Invalid('must be True or False')
  return v


def choice(*options) -> Check:
  def check(v):
    if v not in options:
      raise _Invalid(f'must be one of {list(options)}')
    return v
  return check


def sequence(item: Check | None = None, length: int | None = None,
             nonempty: bool = False) -> Check:
  """A tuple (a list is accepted); ``item`` checks and converts each entry."""
  def check(v):
    if not isinstance(v, (tuple, list)):
      raise _Invalid('must be a tuple or list')
    if length is not None and len(v) != length:
      raise _Invalid(f'must have {length} entries')
    if nonempty and not v:
      raise _Invalid('must not be empty')
    return tuple(item(x) for x in v) if item else tuple(v)
  return check


def string(v):
  if not isinstance(v, str):
    raise _Invalid('must be a string')
  return v


UNIT = number(0.0, 1.0)
POSITIVE = number(0.0, low_open=True)
NONNEGATIVE = number(0.0)


def setting(check: Check):
  """A settings field: no default (the config holds the value), checked by ``check``."""
  return dataclasses.field(metadata={'check': check})


def subsection(cls):
  """A settings field holding the settings dataclass ``cls`` of a nested config section."""
  return dataclasses.field(metadata={'section': cls})


def read_key(config, key: str, check: Check, prefix: str = '') -> Any:
  """The checked value at the dotted ``key`` of ``config``; errors name ``prefix.key``."""
  name = f'{prefix}.{key}' if prefix else key
  node = config
  for part in key.split('.'):
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or part not in node:
      raise ConfigError(f'config key {name!r} is missing')
    node = node[part]
  try:
    return check(node)
  except _Invalid as e:
    raise ConfigError(f'config key {name!r} = {node!r}: {e}') from None


def require(condition: bool, key: str, value: Any, requirement: str) -> None:
  if not condition:
    raise ConfigError(f'config key {key!r} = {value!r}: {requirement}')


def from_config(cls, section, prefix: str, strict: bool = True):
  """An instance of the settings dataclass ``cls`` from its config ``section``.

  Every field is read from the key of its name and checked (a `subsection` field from its
  nested section, recursively); ``strict``: a key of the section that no field reads is an error
  too (a typo or a leftover). The class's ``relations()`` (optional) yields ``(field, ok,
  requirement)`` for checks across its fields; ``field`` may be dotted (``'roi.canonical_level'``).
  """
  if section is None:
    raise ConfigError(f'config key {prefix!r} is missing')
  fields = dataclasses.fields(cls)
  values = {}
  for f in fields:
    if 'section' in f.metadata:
      values[f.name] = from_config(f.metadata['section'], section.get(f.name),
                                   f'{prefix}.{f.name}')
    else:
      values[f.name] = read_key(section, f.name, f.metadata['check'], prefix)
  if strict:
    unused = sorted(set(section.keys()) - {f.name for f in fields})
    if unused:
      raise ConfigError(f'config key {prefix}.{unused[0]!r} is not read by anything: remove it')
  obj = cls(**values)
  for name, ok, requirement in getattr(obj, 'relations', lambda: ())():
    value = functools.reduce(getattr, name.split('.'), obj)
    require(ok, f'{prefix}.{name}', value, requirement)
  return obj


# ------------------------------------------------------------------------------ model settings
@dataclasses.dataclass(frozen=True)
class BackboneSettings:
  """``config.model.backbone``: the ResNet's keyword arguments
  (:class:`maskrcnn_jax.modeling.resnet.ResNet`)."""
  depth: int = setting(choice(*RESNET_DEPTHS))
  freeze_at: int = setting(integer(0, 5))  # stages 1..freeze_at frozen (2 = stem + res2)
  finetune_bn: bool = setting(boolean)
  bn_epsilon: float = setting(POSITIVE)
  bn_momentum: float = setting(UNIT)
  stop_frozen_gradients: bool = setting(boolean)


@dataclasses.dataclass(frozen=True)
class AnchorSettings:
  """``config.model.anchors``: the anchor shapes per level and their grid."""
  convention: str = setting(choice(*ANCHOR_CONVENTIONS))
  num_scales: int = setting(integer(1))
  anchor_scale: float = setting(POSITIVE)
  aspect_ratios: tuple = setting(sequence(nonempty=True))
  sizes: tuple = setting(sequence(POSITIVE))
  offset: float = setting(UNIT)
  round_half_extents: bool = setting(boolean)

  def relations(self) -> Iterator[tuple[str, bool, str]]:
    if self.convention == 'reference':
      yield ('aspect_ratios', all(isinstance(r, (tuple, list)) and len(r) == 2 and min(r) > 0
                                  for r in self.aspect_ratios),
             "must be positive (x_scale, y_scale) pairs with convention 'reference'")
    else:
      yield ('aspect_ratios', all(isinstance(r, (int, float)) and r > 0
                                  for r in self.aspect_ratios),
             "must be positive h/w ratios with convention 'torchvision'")


@dataclasses.dataclass(frozen=True)
class RPNSettings:
  """``config.model.rpn``: anchor labelling and sampling, proposal selection, loss."""
  positive_overlap: float = setting(UNIT)
  negative_overlap: float = setting(UNIT)
  allow_low_quality_matches: bool = setting(boolean)
  low_quality_ties: bool = setting(boolean)  # all tying anchors (torchvision) or the first
  batch_size_per_image: int = setting(integer(1))
  fg_fraction: float = setting(UNIT)
  min_size: float = setting(NONNEGATIVE)
  train_pre_nms_topk: int = setting(integer(1))
  train_post_nms_topk: int = setting(integer(1))
  train_nms_threshold: float = setting(UNIT)
  test_pre_nms_topk: int = setting(integer(1))
  test_post_nms_topk: int = setting(integer(1))
  test_nms_threshold: float = setting(UNIT)
  box_weights: tuple[float, ...] = setting(sequence(number(), length=4))
  huber_delta: float = setting(POSITIVE)
  box_loss_weight: float = setting(NONNEGATIVE)
  # 'positives_per_level' (the reference) or 'sampled' (torchvision: / batch * batch_size)
  box_loss_normalizer: str = setting(choice(*RPN_BOX_NORMALIZERS))

  def relations(self):
    yield ('negative_overlap', self.negative_overlap <= self.positive_overlap,
           'must be <= model.rpn.positive_overlap')


@dataclasses.dataclass(frozen=True)
class RoISettings:
  """``config.model.roi``: RoI sampling, pooling, the box head and its loss."""
  batch_size_per_image: int = setting(integer(1))
  fg_fraction: float = setting(UNIT)
  fg_threshold: float = setting(UNIT)
  bg_threshold_hi: float = setting(UNIT)
  bg_threshold_lo: float = setting(UNIT)
  add_gt_as_proposals: bool = setting(boolean)
  box_weights: tuple[float, ...] = setting(sequence(number(), length=4))
  pooler_size: int = setting(integer(1))
  sampling_ratio: int = setting(integer(1))
  aligned: bool = setting(boolean)
  canonical_size: float = setting(POSITIVE)
  canonical_level: int = setting(integer(1))
  level_mapping_eps: float = setting(NONNEGATIVE)
  mlp_head_dim: int = setting(integer(1))
  huber_delta: float = setting(POSITIVE)
  box_loss_weight: float = setting(NONNEGATIVE)
  # 'foreground' (the reference: / 4 * foreground RoIs) or 'sampled' (torchvision: / RoI slots)
  box_loss_normalizer: str = setting(choice(*ROI_BOX_NORMALIZERS))

  def relations(self):
    yield ('bg_threshold_lo', self.bg_threshold_lo <= self.bg_threshold_hi,
           'must be <= model.roi.bg_threshold_hi')


@dataclasses.dataclass(frozen=True)
class MaskSettings:
  """``config.model.mask``: the mask head and its loss. (The margin of the stored ground-truth
  crops belongs to the batch contract: `maskrcnn_jax.data.spec.MASK_PADDING`.)"""
  pooler_size: int = setting(integer(1))
  resolution: int = setting(integer(1))
  num_convs: int = setting(integer(0))
  conv_dim: int = setting(integer(1))
  loss_weight: float = setting(NONNEGATIVE)
  predictor_init_std: float = setting(NONNEGATIVE)  # 0 = MSRA fill (the reference)
  binarize_targets: bool = setting(boolean)  # >= 0.5 (the reference) or soft (torchvision)
  train_slots: str = setting(choice('auto', *MASK_TRAIN_SLOTS))  # MaskRCNN.losses

  def relations(self):
    yield ('resolution', self.resolution == 2 * self.pooler_size,
           'must be 2 * model.mask.pooler_size (one 2x2 deconvolution)')


@dataclasses.dataclass(frozen=True)
class TestSettings:
  """``config.model.test``: detection post-processing."""
  __test__ = False  # not a pytest class
  detections_per_image: int = setting(integer(1))
  nms_threshold: float = setting(UNIT)
  score_threshold: float = setting(UNIT)
  pre_nms_topk: int = setting(integer(1))
  min_box_size: float = setting(NONNEGATIVE)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """``config.model``: its scalars and one settings object per section (`SECTIONS`)."""
  num_classes: int = setting(integer(2))
  precision: str = setting(choice(*PRECISIONS))
  # The convolutions' kernel-gradient algorithm (maskrcnn_jax.ops.conv): 'auto' = 'matmul' on
  # the CPU backend, 'xla' elsewhere.
  conv_kernel_grad: str = setting(choice('auto', *KERNEL_GRADS))
  inference_products: str = setting(choice(*PRODUCTS))
  train_products: str = setting(choice(*PRODUCTS))
  min_level: int = setting(integer(2, 5))
  max_level: int = setting(integer(5, 7))
  fpn_channels: int = setting(integer(1))
  backbone: BackboneSettings = subsection(BackboneSettings)
  anchors: AnchorSettings = subsection(AnchorSettings)
  rpn: RPNSettings = subsection(RPNSettings)
  roi: RoISettings = subsection(RoISettings)
  mask: MaskSettings = subsection(MaskSettings)
  test: TestSettings = subsection(TestSettings)

  def relations(self):
    yield ('min_level', self.min_level < self.max_level, 'must be < model.max_level')
    yield ('roi.canonical_level', self.min_level <= self.roi.canonical_level <= self.max_level,
           'must be in [model.min_level, model.max_level]')
    if self.anchors.convention == 'torchvision':
      yield ('anchors.sizes', len(self.anchors.sizes) == self.max_level - self.min_level + 1,
             'must have one size per level (model.min_level..max_level)')

  @classmethod
  def from_config(cls, model_config) -> 'ModelSettings':
    return from_config(cls, model_config, 'model')


# config.model's sections: name -> settings class.
SECTIONS = {f.name: f.metadata['section'] for f in dataclasses.fields(ModelSettings)
            if 'section' in f.metadata}


# ------------------------------------------------------------------------------ input pipeline
@dataclasses.dataclass(frozen=True)
class InputSettings:
  """The input pipeline's part of ``config.data`` (:mod:`maskrcnn_jax.data.pipeline`); the
  dataset itself (tfds_name, tfds_data_dir, splits) is the pipeline's `Source`."""
  image_size: tuple[int, int] = setting(sequence(integer(1), length=2))
  max_instances: int = setting(integer(1))
  gt_mask_size: int = setting(integer(4))
  augment_hflip: bool = setting(boolean)
  skip_crowd_during_training: bool = setting(boolean)
  keep_images_without_annotations_in_training: bool = setting(boolean)
  num_workers: int = setting(integer(0))  # decoding threads; 0 = one per CPU core
  prefetch_batches: int = setting(integer(0))

  @classmethod
  def from_config(cls, data_config) -> 'InputSettings':
    return from_config(cls, data_config, 'data', strict=False)


# ------------------------------------------------------------------------------ optimizer
def _increasing_steps(v):
  steps = sequence(integer(1))(v)
  if list(steps) != sorted(set(steps)):
    raise _Invalid('must be strictly increasing positive integers')
  return steps


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """The optimizer's part of ``config.train``
  (:func:`maskrcnn_jax.train.optimizer.make_optimizer`)."""
  learning_rate: float = setting(POSITIVE)
  warmup_steps: int = setting(integer(0))
  warmup_learning_rate: float = setting(NONNEGATIVE)
  learning_rate_steps: tuple[int, ...] = setting(_increasing_steps)
  learning_rate_decay_factors: tuple[float, ...] = setting(sequence(POSITIVE))
  momentum: float = setting(UNIT)
  l2_weight_decay: float = setting(NONNEGATIVE)
  bias_grad_multiplier: float = setting(NONNEGATIVE)
  gradient_clip_norm: float = setting(number())  # <= 0 disables
  gradient_accumulation_steps: int = setting(integer(1))

  def relations(self):
    yield ('learning_rate_decay_factors',
           len(self.learning_rate_decay_factors) == len(self.learning_rate_steps),
           f'must have {len(self.learning_rate_steps)} entries (one per learning_rate_steps)')

  @classmethod
  def from_config(cls, train_config) -> 'OptimizerSettings':
    return from_config(cls, train_config, 'train', strict=False)
