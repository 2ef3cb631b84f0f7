"""The train state: parameters, batch-norm variables, optimizer state, step and loss scale.

No RNG leaf: the randomness of step s is ``fold_in(key(seed), s)`` (then the device index), so a
restored state needs nothing but its step to continue exactly (big_vision's convention).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp
import optax

from maskrcnn_jax.train.precision import LossScale


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue from a step.

  Attributes:
    step: () int32, batches trained on so far (with gradient accumulation k, updates = step // k).
    params: the model's ``params`` collection (float32).
    batch_stats: the model's ``batch_stats`` collection (frozen batch-norm constants, or running
      statistics with ``finetune_bn``); {} if the model has none.
    opt_state: the optax state.
    loss_scale: `LossScale` (constant 1 unless float16).
  """
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  loss_scale: LossScale

  @property
  def variables(self) -> dict[str, Any]:
    """The flax variables for ``module.apply``."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


def create_train_state(variables: dict[str, Any], tx: optax.GradientTransformation,
                       loss_scale: LossScale) -> TrainState:
  """A step-0 `TrainState` from model variables."""
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    loss_scale=loss_scale)
