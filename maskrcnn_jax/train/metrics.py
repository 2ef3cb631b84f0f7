"""Training metrics as a `clu.metrics.Collection`, gathered across devices inside the step.

Every value is computed on the device and merged there step after step; the host reads the merged
collection back once per ``log_every_steps`` (and before each checkpoint), so the loop never waits
on the device for metrics. `FirstNonFiniteStep` remembers the first step whose loss was not
finite, so that the loop can name it even though it looks only every N steps.
"""


import flax.struct
import jax.numpy as jnp
from clu import metrics

# Larger than any step: "no non-finite loss seen".
NO_STEP = 2 ** 31 - 1


@flax.struct.dataclass
class FirstNonFiniteStep(metrics.Metric):
  """The smallest step whose ``total_loss`` was NaN or infinite (`NO_STEP` if none)."""
  step: jnp.ndarray

  @classmethod
  def from_model_output(cls, total_loss: jnp.ndarray, step: jnp.ndarray, **_
                        ) -> 'FirstNonFiniteStep':
    bad = ~jnp.isfinite(total_loss)
    return cls(step=jnp.min(jnp.where(bad, step, NO_STEP)).astype(jnp.int32))

  def merge(self, other: 'FirstNonFiniteStep') -> 'FirstNonFiniteStep':
    return type(self)(step=jnp.minimum(self.step, other.step))

  def _reduce_merge(self, other):
    return self.merge(other)

  def compute(self) -> jnp.ndarray:
    return self.step


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  """Per-step outputs averaged over devices and over the steps since the last read-out.

  Losses as the model reports them (``total_loss`` is the model's sum, without the L2 term,
  which is reported on its own as ``l2_loss`` = 0.5 * l2_weight_decay * sum of squared kernels),
  averaged over devices: with ``train.loss_normalization = 'per_device'`` the mean of the
  devices' losses, each normalised over its own share of the batch; with 'global' the loss of
  the global batch (each device's numerator over the devices' mean normaliser, averaged: the sum
  of the numerators over the sum of the normalisers);
  ``grad_norm`` is the global norm of the loss gradient (after averaging over devices and
  unscaling, before L2, clipping and the bias multiplier); ``num_positive_anchors`` and
  ``num_foreground_rois`` are per image; ``update_skipped`` is the fraction of steps whose update
  was skipped for a non-finite float16 gradient.
  """
  total_loss: metrics.Average.from_output('total_loss')
  rpn_score_loss: metrics.Average.from_output('rpn_score_loss')
  rpn_box_loss: metrics.Average.from_output('rpn_box_loss')
  fast_rcnn_class_loss: metrics.Average.from_output('fast_rcnn_class_loss')
  fast_rcnn_box_loss: metrics.Average.from_output('fast_rcnn_box_loss')
  mask_loss: metrics.Average.from_output('mask_loss')
  l2_loss: metrics.Average.from_output('l2_loss')
  grad_norm: metrics.Average.from_output('grad_norm')
  num_positive_anchors: metrics.Average.from_output('num_positive_anchors')
  num_foreground_rois: metrics.Average.from_output('num_foreground_rois')
  update_skipped: metrics.Average.from_output('update_skipped')
  learning_rate: metrics.LastValue.from_output('learning_rate')
  loss_scale: metrics.LastValue.from_output('loss_scale')
  first_nonfinite_step: FirstNonFiniteStep


def scalars(collection: TrainMetrics) -> dict[str, float]:
  """The collection's values as Python floats (this reads them back from the device)."""
  values = collection.compute()
  values.pop('first_nonfinite_step', None)
  return {k: float(v) for k, v in values.items()}


def first_nonfinite_step(collection: TrainMetrics):
  """The first step with a non-finite loss among those merged, or None."""
  step = int(collection.first_nonfinite_step.compute())
  return None if step == NO_STEP else step
