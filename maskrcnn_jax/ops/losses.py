"""Losses of Mask R-CNN with the reference's normalisations.

Element-wise losses (`sigmoid_cross_entropy`, `softmax_cross_entropy`, `huber_loss`) and the
reductions the reference applies (NVIDIA TF2 `mask_rcnn/training/losses.py`):

| loss | element | reduction |
|---|---|---|
| RPN score | sigmoid CE over sampled anchors (label >= 0) | sum / (batch * rpn_batch_size_per_im) |
| RPN box | Huber, delta 1/9, on positive anchors' 4 coordinates | sum / number of weighted coordinates, per level, summed over levels |
| box-head class | softmax CE over all sampled RoIs | mean over RoIs |
| box-head box | Huber, delta 1.0, on the ground-truth class's 4 deltas of foreground RoIs | sum / (4 * foreground RoIs) |
| mask | sigmoid CE of the ground-truth class's 28x28 logits of foreground RoIs | sum / (foreground RoIs * 28 * 28) |

The Huber loss is TF's: ``0.5 d**2`` for ``|d| <= delta`` and ``delta * (|d| - 0.5 delta)`` beyond,
which is ``delta`` times torchvision's ``smooth_l1_loss(beta=delta)``. The reference weights box
coordinates with ``box_targets != 0``; here the caller passes the positive mask, which differs
only for a coordinate whose target is exactly 0.

These are the defaults (``rpn.box_loss_normalizer='positives_per_level'``,
``roi.box_loss_normalizer='foreground'``); torchvision's reductions are options (``'sampled'``):
the RPN box loss summed over all levels / (batch * rpn batch_size_per_image), the box-head box
loss / sampled RoIs; with ``huber_delta = 1/9`` and ``box_loss_weight = 9`` they are
torchvision's smooth-L1 losses exactly.

All arithmetic is float32 whatever the inputs' dtype; a reduction with nothing to sum is 0 (the
reference's ``divide_no_nan``), so an image without ground truth trains.

Data parallelism: every loss takes ``axis_name``. None (the reference under Horovod) normalises
over this device's batch. The name of the mapped device axis replaces each normaliser by its mean
over the devices (`device_mean`), so that after the one average of the gradients over devices
the update is that of the global batch's loss, sum of numerators / sum of normalisers, however
the batch is split.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from jax import lax


def sigmoid_cross_entropy(logits, targets) -> jnp.ndarray:
  """Element-wise ``-z log(sigmoid(x)) - (1 - z) log(1 - sigmoid(x))``, numerically stable.

  logits, targets: same shape; targets in [0, 1]. Returns float32 of that shape.
  """
  x = jnp.asarray(logits, jnp.float32)
  z = jnp.asarray(targets, jnp.float32)
  return jnp.maximum(x, 0.0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x)))


def softmax_cross_entropy(logits, labels) -> jnp.ndarray:
  """Element-wise ``-log softmax(logits)[label]``.

  logits: (..., K) float; labels: (...) int in [0, K). Returns (...) float32.
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, jnp.asarray(labels, jnp.int32)[..., None], axis=-1)[..., 0]


def huber_loss(predictions, targets, delta: float) -> jnp.ndarray:
  """Element-wise TF/Keras Huber loss with threshold ``delta``; float32, shape of the inputs."""
  d = jnp.abs(jnp.asarray(predictions, jnp.float32) - jnp.asarray(targets, jnp.float32))
  quadratic = jnp.minimum(d, delta)
  return 0.5 * quadratic ** 2 + delta * (d - quadratic)


def safe_divide(numerator, denominator) -> jnp.ndarray:
  """``numerator / denominator``, or 0 where the denominator is 0 (TF ``divide_no_nan``)."""
  denominator = jnp.asarray(denominator, jnp.float32)
  safe = jnp.where(denominator == 0.0, 1.0, denominator)
  return jnp.where(denominator == 0.0, 0.0, jnp.asarray(numerator, jnp.float32) / safe)


def device_mean(normalizer, axis_name: str | None = None):
  """A loss normaliser as this device counted it (``axis_name`` None, returned unchanged), or
  its mean over the devices of the mapped axis ``axis_name`` (``lax.pmean``: the global sum /
  the number of devices). Each device's loss is then its numerator / that mean, and the average
  over devices of these losses (and of their gradients) is the global sum of the numerators /
  the global sum of the normalisers.
  """
  if axis_name is None:
    return normalizer
  return lax.pmean(jnp.asarray(normalizer, jnp.float32), axis_name)


def rpn_score_loss(logits, labels, normalizer, axis_name: str | None = None) -> jnp.ndarray:
  """RPN objectness loss.

  Args:
    logits: (..., N) float objectness logits (any leading dims, e.g. (B, N) over all levels).
    labels: (..., N) int: 1 sampled positive, 0 sampled negative, -1 not sampled / ignored.
    normalizer: batch * rpn_batch_size_per_im (the reference; not the sampled count).
    axis_name: the device axis to average the normaliser over (`device_mean`), or None.

  Returns:
    Scalar float32.
  """
  labels = jnp.asarray(labels)
  per_anchor = sigmoid_cross_entropy(logits, labels == 1)
  return safe_divide(jnp.sum(jnp.where(labels >= 0, per_anchor, 0.0)),
                     device_mean(normalizer, axis_name))


def rpn_box_loss(deltas, targets, positive, delta: float = 1.0 / 9.0,
                 axis_name: str | None = None) -> jnp.ndarray:
  """RPN box regression loss of one pyramid level (the reference sums this over levels).

  Args:
    deltas: (..., N, 4) predicted (dx, dy, dw, dh).
    targets: (..., N, 4) encoded ground truth (weights (1, 1, 1, 1)).
    positive: (..., N) bool, the sampled positive anchors.
    delta: Huber threshold (the reference: 1/9).
    axis_name: the device axis to average the normaliser over (`device_mean`), or None.

  Returns:
    Scalar float32: sum over positive coordinates / (4 * number of positives).
  """
  weights = jnp.broadcast_to(jnp.asarray(positive, jnp.float32)[..., None],
                             jnp.shape(targets))
  loss = huber_loss(deltas, targets, delta) * weights
  return safe_divide(jnp.sum(loss), device_mean(jnp.sum(weights), axis_name))


def multilevel_rpn_box_loss(deltas: Mapping[str, jnp.ndarray], targets, positive,
                            delta: float = 1.0 / 9.0,
                            axis_name: str | None = None) -> jnp.ndarray:
  """RPN box loss of every level: :func:`rpn_box_loss` normalised per level, summed.

  The reference normalises each level by its own positives (so a level with few positives
  weighs as much as one with many) and sums the levels; torchvision normalises once over all.

  Args:
    deltas: level -> (B, N_l, 4) predictions; the levels in sorted key order ('p2' < 'p3' ...)
      are the blocks of ``targets`` and ``positive``.
    targets: (B, sum N_l, 4) encoded ground truth, levels concatenated in that order.
    positive: (B, sum N_l) bool, the sampled positive anchors.
    delta: Huber threshold (the reference: 1/9).
    axis_name: the device axis to average each level's normaliser over (`device_mean`), or None.

  Returns:
    Scalar float32.
  """
  levels = sorted(deltas)
  count = sum(deltas[level].shape[1] for level in levels)
  if count != positive.shape[1] or count != targets.shape[1]:
    raise ValueError(f'the levels hold {count} anchors, the targets {targets.shape[1]} and the '
                     f'positive mask {positive.shape[1]}')
  total = jnp.zeros((), jnp.float32)
  start = 0
  for level in levels:
    n = deltas[level].shape[1]
    total += rpn_box_loss(deltas[level], targets[:, start:start + n], positive[:, start:start + n],
                          delta, axis_name)
    start += n
  return total


def fast_rcnn_class_loss(logits, labels, valid=None,
                         axis_name: str | None = None) -> jnp.ndarray:
  """Box-head classification loss: mean softmax CE over the (valid) sampled RoIs.

  logits: (..., R, K); labels: (..., R) int, 0 = background; valid: optional (..., R) bool (the
  reference counts every RoI slot, padding included, which is ``valid=None``); axis_name: the
  device axis to average the RoI count over (`device_mean`), or None.
  """
  per_roi = softmax_cross_entropy(logits, labels)
  if valid is None:
    if axis_name is None:
      return jnp.mean(per_roi)
    valid = jnp.ones(per_roi.shape, jnp.bool_)
  valid = jnp.asarray(valid, jnp.float32)
  return safe_divide(jnp.sum(per_roi * valid), device_mean(jnp.sum(valid), axis_name))


def sampled_rpn_box_loss(deltas: Mapping[str, jnp.ndarray], targets, positive, normalizer,
                         delta: float = 1.0 / 9.0, axis_name: str | None = None) -> jnp.ndarray:
  """RPN box loss of every level at once, torchvision's normalisation: the Huber loss summed over
  the positive anchors' coordinates of all levels / `normalizer` (torchvision: the number of
  sampled anchors, batch * rpn batch_size_per_image).

  deltas: level -> (B, N_l, 4), levels in sorted key order as the blocks of ``targets``
  (B, sum N_l, 4) and ``positive`` (B, sum N_l) bool; axis_name: the device axis to average the
  normaliser over (`device_mean`), or None. Scalar float32.
  """
  predictions = jnp.concatenate([jnp.asarray(deltas[l], jnp.float32) for l in sorted(deltas)],
                                axis=1)
  if predictions.shape[1] != positive.shape[1] or predictions.shape[1] != targets.shape[1]:
    raise ValueError(f'the levels hold {predictions.shape[1]} anchors, the targets '
                     f'{targets.shape[1]} and the positive mask {positive.shape[1]}')
  loss = huber_loss(predictions, targets, delta) * jnp.asarray(positive, jnp.float32)[..., None]
  return safe_divide(jnp.sum(loss), device_mean(normalizer, axis_name))


def fast_rcnn_box_loss(deltas, targets, foreground, delta: float = 1.0,
                       normalizer=None, axis_name: str | None = None) -> jnp.ndarray:
  """Box-head regression loss on the ground-truth class's deltas of foreground RoIs.

  deltas: (..., R, 4) already selected for each RoI's ground-truth class; targets: (..., R, 4)
  encoded with weights (10, 10, 5, 5); foreground: (..., R) bool. Returns a float32 scalar:
  sum / (4 * number of foreground RoIs) (the reference), or sum / `normalizer` when one is given
  (torchvision: the number of sampled RoIs); axis_name: the device axis to average the
  normaliser over (`device_mean`), or None.
  """
  if normalizer is None:
    return rpn_box_loss(deltas, targets, foreground, delta, axis_name)
  loss = huber_loss(deltas, targets, delta) * jnp.asarray(foreground, jnp.float32)[..., None]
  return safe_divide(jnp.sum(loss), device_mean(normalizer, axis_name))


def mask_loss(logits, targets, foreground, axis_name: str | None = None) -> jnp.ndarray:
  """Mask loss on the ground-truth class's mask logits of foreground RoIs.

  logits: (..., R, M, M) selected for each RoI's class; targets: (..., R, M, M) in {0, 1};
  foreground: (..., R) bool; axis_name: the device axis to average the normaliser over
  (`device_mean`), or None. Returns a float32 scalar: sum / (foreground RoIs * M * M), i.e.
  ``safe_divide(mask_loss_sum(...), mask_loss_normalizer(...))``.
  """
  return safe_divide(mask_loss_sum(logits, targets, foreground),
                     mask_loss_normalizer(foreground, jnp.shape(logits)[-1], axis_name))


def mask_loss_sum(logits, targets, foreground) -> jnp.ndarray:
  """The numerator of `mask_loss`: float32 sum of the foreground RoIs' pixel losses (slots
  past the foreground add exact zeros, so any prefix holding all of them gives the same sum)."""
  weights = jnp.asarray(foreground, jnp.float32)[..., None, None]
  return jnp.sum(sigmoid_cross_entropy(logits, targets) * weights)


def mask_loss_normalizer(foreground, resolution: int, axis_name: str | None = None):
  """The denominator of `mask_loss`: foreground RoIs * M * M (its device mean with axis_name)."""
  count = jnp.sum(jnp.asarray(foreground, jnp.float32)) * float(resolution * resolution)
  return device_mean(count, axis_name)
