"""Subprocess of test_loss_normalization.py (4 fake CPU devices): the real Mask R-CNN.

configs/tiny_smoke.py (64x64 canvas, ResNet-18, no warmup so that the first step moves the
parameters): one step of one global batch of 4 synthetic images on 1 device (4 images) and on 4
devices (1 image each). With ``train.loss_normalization = 'global'`` the new parameters and the
reported losses must agree (up to float rounding: the sums run in another order); 'per_device'
on the 4 devices must not agree with that one-device step (each device divides by its own counts
and samples with its own keys), which shows that the comparison can fail. Prints one line per
mode with the largest differences, then OK.

The steps are compiled without XLA's backend optimisations (``xla_backend_optimization_level``
0): both layouts alike, and the three compilations of the train step fit in a minute on a CPU.
"""

import pathlib
import time

import jax
import numpy as np

from maskrcnn_jax.configs import load_config
from maskrcnn_jax.data import synthetic
from maskrcnn_jax.train import experiment, step as step_lib

CONFIG = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'tiny_smoke.py'
FAST_COMPILE = {'xla_backend_optimization_level': 0}
# Parameters: |4x1 - 1x4| <= RTOL * the leaf's largest |value| (float rounding of a sum in another
# order is ~1e-7 of it; an element near 0 has no useful relative error of its own).
RTOL = 1e-5


def config_of(loss_normalization):
  config = load_config(CONFIG)
  config.train.warmup_steps = 0  # the warmup starts at learning rate 0: no update at step 0
  config.train.loss_normalization = loss_normalization
  return config


def one_step(config, state, batch, num_devices):
  """(params after one step, host metrics) of the global `batch` on `num_devices` devices."""
  exp = experiment.build_experiment(config, jax.local_devices()[:num_devices])
  state = step_lib.replicate(state, exp.devices)
  sharded = step_lib.shard(batch, step_lib.TRAIN_KEYS, num_devices)
  compiled = exp.train_step.lower(state, sharded).compile(compiler_options=FAST_COMPILE)
  state, metrics = compiled(state, sharded)
  for leaf in jax.tree_util.tree_leaves(state.params):  # the replicas agree
    leaf = np.asarray(leaf)
    assert all(np.array_equal(leaf[d], leaf[0]) for d in range(1, num_devices))
  metrics = jax.tree_util.tree_map(lambda x: np.asarray(x)[0], metrics).compute()
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[0], state.params), metrics


def differences(one, four):
  """(max |difference|, max over leaves of max |difference| / max |value on 1 device|)."""
  absolute, relative = 0.0, 0.0
  for p1, p4 in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(four)):
    diff = float(np.max(np.abs(p4.astype(np.float64) - p1)))
    absolute = max(absolute, diff)
    relative = max(relative, diff / max(float(np.max(np.abs(p1))), 1e-30))
  return absolute, relative


def main():
  assert jax.local_device_count() == 4, jax.local_devices()
  start = time.time()
  config = config_of('global')
  exp = experiment.build_experiment(config, jax.local_devices()[:1])
  state = jax.tree_util.tree_map(np.asarray, exp.create_state(exp.initial_variables()))
  batch = synthetic.synthetic_batch(4, tuple(config.data.image_size), 8, 16, num_classes=91,
                                    seed=3)
  results = {}
  one, m1 = one_step(config_of('global'), state, batch, 1)  # the reference for both modes
  for mode in ('global', 'per_device'):
    four, m4 = one_step(config_of(mode), state, batch, 4)
    absolute, relative = differences(one, four)
    moved = max(float(np.max(np.abs(p - b))) for p, b in
                zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(state.params)))
    l1, l4 = float(m1['total_loss']), float(m4['total_loss'])
    results[mode] = (relative, abs(l4 - l1) / l1)
    print(f'{mode} on 4 devices vs global on 1: params max |difference| {absolute:.3g}, '
          f'relative to the leaf '
          f'{relative:.3g} (largest update {moved:.3g}); total_loss {l1:.7f} vs {l4:.7f}')
  relative, loss = results['global']
  assert relative <= RTOL and loss <= RTOL, results
  relative, loss = results['per_device']
  assert relative > 10 * RTOL and loss > 10 * RTOL, results
  print(f'OK {time.time() - start:.0f} s')


if __name__ == '__main__':
  main()
