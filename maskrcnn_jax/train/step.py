"""Per-device train and inference steps.

Both are pure functions of their array arguments with everything else bound by
``functools.partial`` (see `make_train_step`). Collectives name the axis ``'batch'`` and nothing
else depends on how the step is mapped over devices, so the same function runs under
``jax.pmap(axis_name='batch')`` (the loop) or under ``jax.jit(jax.shard_map(...))`` over a mesh
axis of that name, the state replicated (``P()``) and the batch split (``P('batch')``), with the
same results (``tests/train/test_shard_map.py``). The gradients are averaged across devices
exactly once (``lax.pmean``), as Horovod's allreduce in the reference. What is averaged is chosen
by ``train.loss_normalization``:
``'per_device'`` (the reference): each device's loss is normalised over its own batch;
``'global'``: over the global batch (the model's ``batch_axis``), so the update is the same
however the batch is split over devices (see `train_step`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from maskrcnn_jax.data.spec import INFER_KEYS, TRAIN_KEYS, GroundTruth
from maskrcnn_jax.modeling import LOSS_KEYS, normalize_images
from maskrcnn_jax.settings import LOSS_NORMALIZATIONS
from maskrcnn_jax.train import metrics as metrics_lib
from maskrcnn_jax.train import precision
from maskrcnn_jax.train.state import TrainState

AXIS = 'batch'
__all__ = ['AXIS', 'INFER_KEYS', 'TRAIN_KEYS', 'device_batches', 'infer_step', 'make_infer_step',
           'make_train_step', 'pmap_infer_step', 'pmap_train_step', 'replicate', 'shard',
           'train_step']


def _normalize(batch, mean, std, dtype):
  return normalize_images(batch['images'], batch['image_sizes'], mean, std, dtype)


def l2_loss(params, weight_decay: float) -> jnp.ndarray:
  """The reference's L2 term 0.5 * weight_decay * sum(w**2) over kernels (for reporting)."""
  total = jnp.zeros((), jnp.float32)
  for path, w in jax.tree_util.tree_leaves_with_path(params):
    if str(getattr(path[-1], 'key', path[-1])) == 'kernel':
      total += jnp.sum(jnp.square(w.astype(jnp.float32)))
  return 0.5 * weight_decay * total


def train_step(state: TrainState, batch: dict[str, jnp.ndarray], *, model, tx,
               schedule: Callable, key: jax.Array, pixel_mean: Sequence[float],
               pixel_std: Sequence[float], dtype, mutable_batch_stats: bool,
               accumulation_steps: int = 1, l2_weight_decay: float = 0.0,
               trainable_mask: Any = None, loss_normalization: str = 'per_device'
               ) -> tuple[TrainState, metrics_lib.TrainMetrics]:
  """One training step on this device's share of the batch.

  Args:
    state: the (replicated) `TrainState`.
    batch: this device's batch (`TRAIN_KEYS` of the batch contract, per-device batch size b):
      images (b, H, W, 3) uint8, image_sizes (b, 2) int32, gt_boxes (b, N, 4) float32 xyxy,
      gt_classes (b, N) int32, gt_masks (b, N, S, S) uint8, gt_valid, gt_is_crowd (b, N) bool.
    model: the flax module; its train forward (``train=True``, ``batch_axis``) returns the loss
      dict (`LOSS_KEYS` and the counters ``num_positive_anchors``, ``num_foreground_rois``).
    tx, schedule: the optimizer and its learning rate as a function of the update count.
    key: base PRNG key; with 'per_device', step s on device d samples with
      fold_in(fold_in(key, s), d); with 'global', every device gets fold_in(key, s) and the model
      folds in each image's index in the global batch.
    pixel_mean, pixel_std, dtype: image normalisation and compute dtype.
    mutable_batch_stats: True with trainable batch norm (``finetune_bn``).
    accumulation_steps: k of optax.MultiSteps (the learning rate reported is that of update
      step // k).
    l2_weight_decay: only for the reported ``l2_loss`` (the optimizer applies the decay).
    trainable_mask: params-shaped bools; gradients of False leaves are left out of grad_norm.
    loss_normalization: 'per_device' (the reference under Horovod): each device normalises its
      losses over its own batch, so the update depends on how the batch is split. 'global':
      each normaliser is its mean over the devices (`MaskRCNN.losses` with ``batch_axis``) and
      the sampling keys are those of the images' global indices, so the one average of the
      gradients is the gradient of the global batch's loss (sum of numerators / sum of
      normalisers), the same on 1 device x 4 images as on 4 devices x 1 (up to float
      rounding). Not covered: per-device batch statistics with ``finetune_bn``, and gradient
      accumulation, whose micro-batches are normalised one by one.

  Returns:
    The new state and a `TrainMetrics` collection (already reduced over devices). Its loss
    terms are averages over devices (and over the steps merged): with 'per_device' the mean of
    the devices' losses, each over its own share of the batch; with 'global' the loss of the
    global batch.
  """
  step = state.step
  if loss_normalization == 'global':
    rng, batch_axis = jax.random.fold_in(key, step), AXIS
  else:
    rng = jax.random.fold_in(jax.random.fold_in(key, step), lax.axis_index(AXIS))
    batch_axis = None
  images = _normalize(batch, pixel_mean, pixel_std, dtype)
  scale = state.loss_scale.scale

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    args = (variables, images, batch['image_sizes'], GroundTruth.from_batch(batch))
    kwargs = dict(train=True, batch_axis=batch_axis, rngs={'sampling': rng})
    if mutable_batch_stats:
      out, updated = model.apply(*args, mutable=['batch_stats'], **kwargs)
      batch_stats = updated['batch_stats']
    else:
      out = model.apply(*args, **kwargs)
      batch_stats = state.batch_stats
    # float16: scale the loss so that small gradients survive the backward pass.
    return out['total_loss'].astype(jnp.float32) * scale, (out, batch_stats)

  # The gradient of this device's loss alone. Under jax.shard_map (check_vma) a replicated input
  # is invariant over AXIS and its gradient would come back already summed over the devices;
  # marked varying it does not, and the pmean below averages as under pmap (a no-op there).
  device_params = lax.pcast(state.params, AXIS, to='varying')
  grads, (out, batch_stats) = jax.grad(loss_fn, has_aux=True)(device_params)
  # The one cross-device reduction of the gradients.
  grads = lax.pmean(grads, AXIS)
  grads = jax.tree_util.tree_map(lambda g: g / scale, grads)
  if mutable_batch_stats:
    # Per-device statistics as the reference, averaged so that the replicas stay identical.
    batch_stats = lax.pmean(batch_stats, AXIS)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  finite = precision.all_finite(grads)
  skipped = jnp.zeros((), jnp.bool_)
  if state.loss_scale.dynamic:
    # Overflow: keep the old parameters and optimizer state (the step still counts, as the
    # reference's global step does) and lower the scale.
    skipped = ~finite
    new_state = jax.tree_util.tree_map(
        lambda new, old: jnp.where(finite, new, old), new_state.replace(step=state.step),
        state).replace(step=step + 1)
  new_state = new_state.replace(loss_scale=state.loss_scale.update(finite))

  if trainable_mask is not None:
    norm_grads = jax.tree_util.tree_map(lambda g, t: g if t else jnp.zeros((), g.dtype),
                                        grads, trainable_mask)
  else:
    norm_grads = grads
  b = batch['images'].shape[0]
  outputs = {k: out[k].astype(jnp.float32) for k in LOSS_KEYS}
  outputs.update(
      l2_loss=l2_loss(state.params, l2_weight_decay),
      grad_norm=optax.tree.norm(norm_grads),
      num_positive_anchors=out['num_positive_anchors'].astype(jnp.float32) / b,
      num_foreground_rois=out['num_foreground_rois'].astype(jnp.float32) / b,
      update_skipped=skipped.astype(jnp.float32),
      learning_rate=schedule(step // accumulation_steps),
      loss_scale=scale,
      step=step)
  collection = metrics_lib.TrainMetrics.gather_from_model_output(axis_name=AXIS, **outputs)
  return new_state, collection


def make_train_step(model, tx, schedule, key, pixel_mean, pixel_std, dtype,
                    mutable_batch_stats: bool, accumulation_steps: int = 1,
                    l2_weight_decay: float = 0.0, trainable_mask=None,
                    loss_normalization: str = 'per_device') -> Callable:
  """The per-device train step with everything but (state, batch) bound."""
  if loss_normalization not in LOSS_NORMALIZATIONS:
    raise ValueError(f'loss_normalization {loss_normalization!r} is not one of '
                     f'{list(LOSS_NORMALIZATIONS)}')
  return functools.partial(
      train_step, model=model, tx=tx, schedule=schedule, key=key,
      pixel_mean=tuple(pixel_mean), pixel_std=tuple(pixel_std), dtype=dtype,
      mutable_batch_stats=mutable_batch_stats, accumulation_steps=accumulation_steps,
      l2_weight_decay=l2_weight_decay, trainable_mask=trainable_mask,
      loss_normalization=loss_normalization)


def replicate(tree, devices=None):
  """Copies a tree to every local device along a leading axis, sharded like pmap's outputs.

  The mesh axis is named `AXIS`, as the one of ``jax.pmap(axis_name=AXIS)`` outputs: a state
  replicated under another name would make the second step recompile (different input sharding).
  """
  return flax.jax_utils.replicate(tree, devices, axis_name=AXIS)


def shard(batch, keys: Sequence[str], num_devices: int) -> dict[str, np.ndarray]:
  """(B, ...) host arrays of ``keys`` -> (num_devices, B / num_devices, ...): the one place a
  host batch is split over the local devices."""
  return {k: np.asarray(batch[k]).reshape((num_devices, -1) + np.shape(batch[k])[1:])
          for k in keys}


def device_batches(host_batches: Iterator, keys: Sequence[str], devices: Sequence[Any],
                   prefetch: int = 2) -> Iterator:
  """Host batches sharded over `devices` and put there ``prefetch`` batches ahead."""
  sharded = (shard(b, keys, len(devices)) for b in host_batches)
  return flax.jax_utils.prefetch_to_device(sharded, prefetch, list(devices), axis_name=AXIS)


def pmap_train_step(step_fn: Callable, devices: Sequence[Any] | None = None) -> Callable:
  """``jax.pmap`` over the local devices (or `devices`), donating the state."""
  return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,), devices=devices)


def infer_step(variables, batch, *, model, pixel_mean, pixel_std, dtype) -> dict[str, Any]:
  """Detections for this device's batch: images (b, H, W, 3) uint8, image_sizes (b, 2).

  Returns the model's inference dict: boxes (b, D, 4) xyxy canvas pixels, scores (b, D),
  classes (b, D) int32, masks (b, D, M, M) probabilities, valid (b, D) bool.
  """
  images = _normalize(batch, pixel_mean, pixel_std, dtype)
  out = model.apply(variables, images, batch['image_sizes'], train=False)
  return {k: (v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v)
          for k, v in out.items()}


def make_infer_step(model, pixel_mean, pixel_std, dtype) -> Callable:
  """The per-device inference step (variables, batch) -> detections, everything else bound."""
  return functools.partial(infer_step, model=model, pixel_mean=tuple(pixel_mean),
                           pixel_std=tuple(pixel_std), dtype=dtype)


def pmap_infer_step(infer_fn: Callable, devices: Sequence[Any] | None = None) -> Callable:
  """``jax.pmap`` of the inference step over the local devices (or `devices`)."""
  return jax.pmap(infer_fn, axis_name=AXIS, devices=devices)
