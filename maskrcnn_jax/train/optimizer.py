"""The reference's optimizer: SGD with momentum, linear warmup + step decay, L2, bias x2, freezing.

NVIDIA TF2 Mask R-CNN (`mask_rcnn_model.py`, `learning_rates.py`), reproduced as one optax chain:

1. L2 weight decay. The reference adds ``l2_weight_decay * sum(tf.nn.l2_loss(w))`` to the loss,
   with ``tf.nn.l2_loss(w) = sum(w**2) / 2``, over every trainable variable whose name contains
   none of "batch_normalization", "bias", "beta". Its gradient is ``l2_weight_decay * w``; here
   it is added to the gradients of the weights (`weight_decay_mask`: conv and dense kernels)
   instead of being differentiated through the model, which is the same update and keeps the
   L2 term out of the float16 loss scaling.
2. Optional clipping of the global gradient norm (``global_gradient_clip_ratio``; off = <= 0).
3. Biases and batch-norm betas (flax names both ``bias``): gradient x ``bias_grad_multiplier``
   (2, Detectron's convention, which the reference follows).
4. Frozen parameters (conv1 and res2 by default, `maskrcnn_jax.modeling.frozen_param_mask`) get a
   zero update and carry no momentum (``optax.multi_transform`` with ``set_to_zero``).
5. SGD with momentum 0.9 (TF MomentumOptimizer: ``v = m v + g; w -= lr v``, i.e. ``optax.sgd``).

The learning rate ramps linearly from ``warmup_learning_rate`` at step 0 to ``learning_rate`` at
``warmup_steps``, then is multiplied by ``decay_factors[i]`` from ``boundaries[i]`` on (the
reference's `step_learning_rate_with_linear_warmup`). Gradient accumulation wraps the whole chain
in ``optax.MultiSteps``, whose inner count (and so the schedule) advances once per applied update.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from maskrcnn_jax.settings import OptimizerSettings

Params = Any


def learning_rate_schedule(learning_rate: float, warmup_steps: int, warmup_learning_rate: float,
                           boundaries: Sequence[int], decay_factors: Sequence[float]
                           ) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Linear warmup then piecewise-constant decay, as a function of the update count.

  lr(s) = warmup_lr + (lr - warmup_lr) * s / warmup_steps for s < warmup_steps; afterwards
  lr * decay_factors[i] where i is the last boundary <= s (lr before the first boundary).
  """
  if len(boundaries) != len(decay_factors):
    raise ValueError('boundaries and decay_factors must have the same length')
  boundaries = tuple(int(b) for b in boundaries)
  factors = (1.0,) + tuple(float(f) for f in decay_factors)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    index = jnp.sum(step >= jnp.asarray(boundaries, jnp.float32)) if boundaries else 0
    decayed = learning_rate * jnp.asarray(factors, jnp.float32)[index]
    if warmup_steps <= 0:
      return decayed
    warm = warmup_learning_rate + (learning_rate - warmup_learning_rate) * step / warmup_steps
    return jnp.where(step < warmup_steps, warm, decayed)

  return schedule


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def weight_decay_mask(params: Params) -> Params:
  """True for the leaves the reference's L2 covers: convolution and dense ``kernel``s.

  Excluded: ``bias`` (biases and batch-norm betas) and batch-norm ``scale`` (gamma), as the
  reference's name patterns "bias", "beta", "batch_normalization".
  """
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) == 'kernel', params)


def bias_mask(params: Params) -> Params:
  """True for biases and batch-norm betas (flax calls both ``bias``)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) == 'bias', params)


def add_weight_decay(weight_decay: float) -> optax.GradientTransformation:
  """g + weight_decay * w on kernels (`weight_decay_mask`): the gradient of the reference's L2.

  The leaves are chosen by name inside the update, so the transformation also works on the
  partial trees ``optax.multi_transform`` hands to its branches.
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('add_weight_decay needs params')
    updates = jax.tree_util.tree_map_with_path(
        lambda p, g, w: g + weight_decay * w if _leaf_name(p) == 'kernel' else g, updates, params)
    return updates, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def scale_biases(factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of biases and batch-norm betas (leaves named ``bias``) by factor."""

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree_util.tree_map_with_path(
        lambda p, g: g * factor if _leaf_name(p) == 'bias' else g, updates)
    return updates, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def make_optimizer(settings: OptimizerSettings, params: Params, frozen_mask: Params
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """The optax transformation and its learning-rate schedule (a function of the update count).

  params: the ``params`` collection (only its structure is read). frozen_mask: same structure,
  True for frozen leaves.
  """
  s = settings
  schedule = learning_rate_schedule(s.learning_rate, s.warmup_steps, s.warmup_learning_rate,
                                    s.learning_rate_steps, s.learning_rate_decay_factors)
  parts = []
  if s.l2_weight_decay > 0:
    parts.append(add_weight_decay(s.l2_weight_decay))
  if s.gradient_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(s.gradient_clip_norm))
  if s.bias_grad_multiplier != 1.0:
    parts.append(scale_biases(s.bias_grad_multiplier))
  parts.append(optax.sgd(schedule, momentum=s.momentum))
  trainable = optax.chain(*parts)
  labels = jax.tree_util.tree_map(lambda f: 'frozen' if f else 'trainable', frozen_mask)
  tx = optax.multi_transform({'trainable': trainable, 'frozen': optax.set_to_zero()}, labels)
  if s.gradient_accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=s.gradient_accumulation_steps)
  return tx, schedule

