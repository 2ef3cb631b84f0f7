"""Subprocess of test_step.py (4 fake CPU devices): one global batch of 4 on 1 and on 4 devices.

The toy model's loss is a per-example mean, so averaging the per-device gradients once
(lax.pmean) must give the single-device update; summing them, averaging twice or not at all
would not. Also checks that the replicas stay identical.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import helpers  # pylint: disable=wrong-import-position


def main():
  assert jax.local_device_count() == 4, jax.local_devices()
  batches = [helpers.batch(batch_size=4, seed=s) for s in range(2)]
  _, state, fn = helpers.setup(momentum=0.9, l2_weight_decay=1e-4)
  one, m1 = helpers.run_steps(state, fn, batches, num_devices=1)
  p = jax.pmap(fn, axis_name='batch')
  from maskrcnn_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  rep = step_lib.replicate(state)
  for b in batches:
    rep, m4 = p(rep, step_lib.shard(b, step_lib.TRAIN_KEYS, 4))
  for leaf in jax.tree_util.tree_leaves(rep.params):
    for d in range(1, 4):
      np.testing.assert_array_equal(np.asarray(leaf[d]), np.asarray(leaf[0]))
  four = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), rep)
  for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(four.params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  l1 = float(m1.compute()['total_loss'])
  l4 = float(jax.tree_util.tree_map(lambda x: x[0], m4).compute()['total_loss'])
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  print('OK')


if __name__ == '__main__':
  main()
