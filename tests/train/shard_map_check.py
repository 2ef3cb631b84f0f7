"""Subprocess of test_shard_map.py (4 fake CPU devices): the per-device train step under
``jax.jit(jax.shard_map(...))`` over a one-axis mesh named `step.AXIS` gives what it gives under
``jax.pmap``, two steps of the toy model, for each variant in `VARIANTS`.

The state is replicated (``P()``) and the batch split on its leading axis (``P(AXIS)``), as
pmap does. ``check_vma=True`` (the default): shard_map then proves that the new state is the
same on every device. The metrics are `clu` collections gathered with ``lax.all_gather``, whose
result shard_map types as varying over the axis (it cannot infer that the gathered and reduced
values are equal), so they come out per device (``P(AXIS)``, a leading axis added here) and are
compared on every device. Prints the largest differences per variant, then OK.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.sharding import Mesh, PartitionSpec as P  # pylint: disable=wrong-import-position

import helpers  # pylint: disable=wrong-import-position
from maskrcnn_jax.train import step as step_lib  # pylint: disable=wrong-import-position

# name -> helpers.setup keywords and the loss normalisation.
VARIANTS = {
    'float32 per_device': (dict(momentum=0.9, l2_weight_decay=1e-4), 'per_device'),
    'float32 global': (dict(momentum=0.9, l2_weight_decay=1e-4), 'global'),
    'float16 dynamic scale': (dict(dtype=jnp.float16, dynamic_scale=True, freeze_at=0),
                              'per_device'),
}


def shard_map_train_step(step_fn, devices):
  """The per-device step under jit(shard_map) over `devices`, the state donated: (state,
  global batch) -> (state, metrics with a leading device axis)."""
  mesh = Mesh(np.asarray(devices), (step_lib.AXIS,))

  def per_device(state, batch):
    state, metrics = step_fn(state, batch)
    return state, jax.tree_util.tree_map(lambda x: x[None], metrics)

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(step_lib.AXIS)),
                         out_specs=(P(), P(step_lib.AXIS)), check_vma=True)
  return jax.jit(mapped, donate_argnums=(0,))


def max_difference(a, b) -> float:
  leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in leaves)


def check(name, setup_kwargs, loss_normalization):
  _, state, fn = helpers.setup(loss_normalization=loss_normalization, **setup_kwargs)
  devices = jax.local_devices()
  batches = [helpers.batch(batch_size=8, seed=s) for s in range(2)]
  p = step_lib.pmap_train_step(fn, devices)
  pmapped = step_lib.replicate(state, devices)
  s = shard_map_train_step(fn, devices)
  mapped = jax.device_put(state)
  for b in batches:
    pmapped, m_pmap = p(pmapped, step_lib.shard(b, step_lib.TRAIN_KEYS, len(devices)))
    mapped, m_map = s(mapped, b)
  pmapped = jax.tree_util.tree_map(np.asarray, pmapped)
  m_pmap = jax.tree_util.tree_map(np.asarray, m_pmap)
  m_map = jax.tree_util.tree_map(np.asarray, m_map)
  assert int(mapped.step) == 2
  state_diff = max(max_difference(jax.tree_util.tree_map(lambda x, d=d: x[d], pmapped), mapped)
                   for d in range(len(devices)))
  metrics_diff = max_difference(m_pmap, m_map)  # both (devices, ...): every device compared
  values = jax.tree_util.tree_map(lambda x: x[0], m_map).compute()
  print(f'{name}: max |state pmap - shard_map| {state_diff:.3g} (params, opt_state, '
        f'batch_stats, step, loss scale), max |metrics| {metrics_diff:.3g}; total_loss '
        f'{float(values["total_loss"]):.6f}, loss_scale {float(values["loss_scale"])}')
  assert state_diff <= 1e-6 and metrics_diff <= 1e-6, (state_diff, metrics_diff)


def main():
  assert jax.local_device_count() == 4, jax.local_devices()
  for name, (setup_kwargs, loss_normalization) in VARIANTS.items():
    check(name, setup_kwargs, loss_normalization)
  print('OK')


if __name__ == '__main__':
  main()
