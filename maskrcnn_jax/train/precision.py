"""Mixed precision: the float16 dynamic loss scale (compute dtypes: `maskrcnn_jax.modeling.DTYPES`).

The reference's AMP (TF ``DynamicLossScale``): the loss is multiplied by a scale before the
backward pass so that float16 gradients do not underflow; the gradients are divided by it again.
Scale starts at 2**12; after ``growth_interval`` consecutive steps with finite gradients it is
doubled; a step with a non-finite gradient is skipped (no update) and halves the scale. With
float32 or bfloat16 the scale is a constant 1 and never changes (`LossScale.dynamic` False), but
it stays in the train state so that the checkpoint layout does not depend on the precision.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

class LossScale(flax.struct.PyTreeNode):
  """Dynamic loss-scale state.

  Attributes:
    scale: () float32, the current scale.
    good_steps: () int32, consecutive finite steps since the scale last changed.
    dynamic: static; False keeps the scale at its value (float32 / bfloat16).
    growth_interval: static; finite steps before the scale doubles.
  """
  scale: jnp.ndarray
  good_steps: jnp.ndarray
  dynamic: bool = flax.struct.field(pytree_node=False, default=False)
  growth_interval: int = flax.struct.field(pytree_node=False, default=2000)

  @classmethod
  def create(cls, dynamic: bool, initial_scale: float = 2.0 ** 12,
             growth_interval: int = 2000) -> 'LossScale':
    scale = initial_scale if dynamic else 1.0
    return cls(scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
               dynamic=dynamic, growth_interval=int(growth_interval))

  def update(self, grads_finite: jnp.ndarray) -> 'LossScale':
    """The next state after a step whose gradients were finite (or not)."""
    if not self.dynamic:
      return self
    grow = grads_finite & (self.good_steps + 1 >= self.growth_interval)
    scale = jnp.where(grads_finite, jnp.where(grow, self.scale * 2.0, self.scale),
                      jnp.maximum(self.scale * 0.5, 1.0))
    good = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0).astype(jnp.int32)
    return self.replace(scale=scale.astype(jnp.float32), good_steps=good)


def all_finite(tree) -> jnp.ndarray:
  """() bool: every element of every leaf is finite."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
