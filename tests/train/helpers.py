"""Shared set-up of the train-step tests: the toy model with the real optimizer and step, and the
runner of the checks that need several fake devices."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.data import synthetic
from maskrcnn_jax.modeling import frozen_param_mask
from maskrcnn_jax.train import optimizer, precision, state as state_lib, step as step_lib

import toy_model

IMAGE = (32, 32)


def settings(**overrides):
  base = dict(learning_rate=0.1, warmup_steps=0, warmup_learning_rate=0.0,
              learning_rate_steps=(100,), learning_rate_decay_factors=(0.1,), momentum=0.9,
              l2_weight_decay=1e-4, bias_grad_multiplier=2.0, gradient_clip_norm=0.0,
              gradient_accumulation_steps=1)
  base.update(overrides)
  return optimizer.OptimizerSettings(**base)


def random_variables(model, seed=0):
  """Variables of the toy model drawn with NumPy: XLA CPU takes seconds to compile flax's
  initialisers, and these tests compile enough already. Batch norm: the identity."""
  images = jnp.zeros((1,) + IMAGE + (3,), jnp.float32)
  sizes = jnp.asarray([IMAGE], jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, sizes))
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if "'batch_stats'" in name:
      return jnp.full(a.shape, 1.0 if ("'var'" in name or "'scale'" in name) else 0.0, a.dtype)
    return jnp.asarray(rng.normal(0.0, 0.3, a.shape), a.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def setup(freeze_at=2, dtype=jnp.float32, dynamic_scale=False, initial_scale=2.0 ** 12,
          growth_interval=2000, loss_normalization='per_device', **opt):
  """(model, unreplicated state, per-device step function) for the toy model."""
  model = toy_model.ToyDetector(dtype=dtype)
  variables = random_variables(model)
  s = settings(**opt)
  frozen = frozen_param_mask(variables['params'], freeze_at)
  tx, schedule = optimizer.make_optimizer(s, variables['params'], frozen)
  loss_scale = precision.LossScale.create(dynamic_scale, initial_scale, growth_interval)
  state = state_lib.create_train_state(variables, tx, loss_scale)
  fn = step_lib.make_train_step(
      model, tx, schedule, jax.random.PRNGKey(1), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), dtype,
      mutable_batch_stats=False, accumulation_steps=s.gradient_accumulation_steps,
      l2_weight_decay=s.l2_weight_decay,
      trainable_mask=jax.tree_util.tree_map(lambda f: not f, frozen),
      loss_normalization=loss_normalization)
  return model, state, fn


def batch(batch_size=4, seed=0):
  b = synthetic.synthetic_batch(batch_size, IMAGE, 4, 4, num_classes=4, seed=seed)
  return {k: b[k] for k in step_lib.TRAIN_KEYS}


def run_steps(state, fn, batches, num_devices=1):
  """Runs the pmapped step over batches; returns the unreplicated state and last metrics."""
  p = jax.pmap(fn, axis_name=step_lib.AXIS, devices=jax.local_devices()[:num_devices])
  rep = step_lib.replicate(state, jax.local_devices()[:num_devices])
  m = None
  for b in batches:
    rep, m = p(rep, step_lib.shard(b, step_lib.TRAIN_KEYS, num_devices))
  return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), rep), jax.tree_util.tree_map(
      lambda x: x[0], m)


def run_on_fake_devices(script: str, num_devices: int = 4, timeout: int = 300) -> str:
  """Runs tests/train/`script` in a subprocess with `num_devices` fake CPU devices (the count must
  be set before JAX initialises); asserts it printed OK and returns its output."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      f' --xla_force_host_platform_device_count={num_devices}').strip()
  here = pathlib.Path(__file__).resolve().parent
  out = subprocess.run([sys.executable, str(here / script)], env=env, capture_output=True,
                       text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'OK' in out.stdout, out.stdout
  return out.stdout
