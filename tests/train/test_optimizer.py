"""The optimizer: schedule boundaries, L2 only on kernels, bias x2, frozen leaves untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskrcnn_jax.train import optimizer

# The reference's values of the fields a test does not set (configs/coco_r50.py).
_BASE = dict(learning_rate=1.0, warmup_steps=0, warmup_learning_rate=0.0, learning_rate_steps=(),
             learning_rate_decay_factors=(), momentum=0.9, l2_weight_decay=1e-4,
             bias_grad_multiplier=2.0, gradient_clip_norm=0.0, gradient_accumulation_steps=1)


def _settings(**kw):
  return optimizer.OptimizerSettings(**{**_BASE, **kw})


def test_schedule_values_at_its_boundaries():
  f = optimizer.learning_rate_schedule(0.04, 1000, 0.0, (30000, 40000), (0.1, 0.01))
  lr = lambda s: float(f(s))
  assert lr(0) == 0.0
  assert lr(500) == pytest.approx(0.02)
  assert lr(999) == pytest.approx(0.04 * 999 / 1000)
  assert lr(1000) == pytest.approx(0.04)
  assert lr(29999) == pytest.approx(0.04)
  assert lr(30000) == pytest.approx(0.004)
  assert lr(39999) == pytest.approx(0.004)
  assert lr(40000) == pytest.approx(0.0004)
  assert lr(45000) == pytest.approx(0.0004)
  warm = optimizer.learning_rate_schedule(0.01, 10, 0.002, (), ())
  assert float(warm(0)) == pytest.approx(0.002)
  assert float(warm(5)) == pytest.approx(0.006)
  assert float(warm(10)) == pytest.approx(0.01)


def _params():
  return {'backbone': {'conv1': {'kernel': jnp.full((3,), 2.0)},
                       'layer2': {'kernel': jnp.full((2,), 3.0)}},
          'bn': {'scale': jnp.full((2,), 4.0), 'bias': jnp.full((2,), 5.0)},
          'head': {'kernel': jnp.full((2,), 1.0), 'bias': jnp.full((2,), 1.0)}}


def _frozen(params):
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(getattr(k, 'key', None) == 'conv1' for k in p), params)


def _update(params, grads, **kw):
  s = _settings(learning_rate=0.1, **kw)
  tx, _ = optimizer.make_optimizer(s, params, _frozen(params))
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_l2_only_on_kernels_and_bias_multiplier():
  params = _params()
  # Zero loss gradient: only the L2 term moves anything, and only kernels.
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  u = _update(params, zero, l2_weight_decay=1e-2)
  np.testing.assert_allclose(u['backbone']['layer2']['kernel'], -0.1 * 1e-2 * 3.0, rtol=1e-6)
  np.testing.assert_allclose(u['head']['kernel'], -0.1 * 1e-2 * 1.0, rtol=1e-6)
  for leaf in (u['bn']['scale'], u['bn']['bias'], u['head']['bias']):
    np.testing.assert_array_equal(leaf, 0.0)
  np.testing.assert_array_equal(u['backbone']['conv1']['kernel'], 0.0)  # frozen: no decay
  # Unit gradients: biases (and batch-norm betas) x2, scale and kernels x1.
  ones = jax.tree_util.tree_map(jnp.ones_like, params)
  u = _update(params, ones, l2_weight_decay=0.0, bias_grad_multiplier=2.0)
  np.testing.assert_allclose(u['head']['bias'], -0.2, rtol=1e-6)
  np.testing.assert_allclose(u['bn']['bias'], -0.2, rtol=1e-6)
  np.testing.assert_allclose(u['bn']['scale'], -0.1, rtol=1e-6)
  np.testing.assert_allclose(u['head']['kernel'], -0.1, rtol=1e-6)
  np.testing.assert_array_equal(u['backbone']['conv1']['kernel'], 0.0)


def test_l2_gradient_equals_the_reference_l2_loss_gradient():
  """wd * w is the gradient of wd * tf.nn.l2_loss(w) = wd * sum(w**2) / 2."""
  w = jnp.array([0.5, -2.0, 3.0])
  wd = 1e-4
  g = jax.grad(lambda w: wd * jnp.sum(w ** 2) / 2)(w)
  params = {'k': {'kernel': w}}
  s = _settings(momentum=0.0, l2_weight_decay=wd)
  tx, _ = optimizer.make_optimizer(s, params, {'k': {'kernel': False}})
  u, _ = tx.update({'k': {'kernel': jnp.zeros(3)}}, tx.init(params), params)
  np.testing.assert_allclose(-u['k']['kernel'], g, rtol=1e-6)


def test_momentum_and_clipping():
  params = {'head': {'kernel': jnp.zeros(2)}}
  s = _settings(momentum=0.9, l2_weight_decay=0.0, gradient_clip_norm=1.0)
  tx, _ = optimizer.make_optimizer(s, params, {'head': {'kernel': False}})
  state = tx.init(params)
  g = {'head': {'kernel': jnp.array([3.0, 4.0])}}  # norm 5 -> clipped to 1
  u1, state = tx.update(g, state, params)
  np.testing.assert_allclose(u1['head']['kernel'], [-0.6, -0.8], rtol=1e-6)
  u2, state = tx.update(g, state, params)  # v = 0.9 v + g
  np.testing.assert_allclose(u2['head']['kernel'], [-0.6 * 1.9, -0.8 * 1.9], rtol=1e-6)


def test_gradient_accumulation_applies_every_k():
  params = {'head': {'kernel': jnp.zeros(1)}}
  s = _settings(momentum=0.0, l2_weight_decay=0.0, gradient_accumulation_steps=2)
  tx, _ = optimizer.make_optimizer(s, params, {'head': {'kernel': False}})
  state = tx.init(params)
  u, state = tx.update({'head': {'kernel': jnp.array([1.0])}}, state, params)
  assert float(u['head']['kernel'][0]) == 0.0
  u, state = tx.update({'head': {'kernel': jnp.array([3.0])}}, state, params)
  assert float(u['head']['kernel'][0]) == pytest.approx(-2.0)  # mean of the two
  assert isinstance(state, optax.MultiStepsState)
