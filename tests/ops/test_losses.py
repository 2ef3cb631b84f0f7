"""Tests of ops/losses.py against NumPy formulas and the reference's normalisations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import losses


def _np_sigmoid_ce(x, z):
  p = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
  return -(z * np.log(p) + (1 - z) * np.log(1 - p))


def _np_huber(p, t, delta):
  d = np.abs(p.astype(np.float64) - t)
  return np.where(d <= delta, 0.5 * d ** 2, delta * (d - 0.5 * delta))


def test_sigmoid_cross_entropy_values_and_stability():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 3, 100).astype(np.float32)
  z = rng.uniform(0, 1, 100).astype(np.float32)
  np.testing.assert_allclose(losses.sigmoid_cross_entropy(x, z), _np_sigmoid_ce(x, z),
                             rtol=1e-5, atol=1e-6)
  big = np.array([1000.0, -1000.0], np.float32)
  np.testing.assert_allclose(losses.sigmoid_cross_entropy(big, [1.0, 0.0]), [0.0, 0.0])
  np.testing.assert_allclose(losses.sigmoid_cross_entropy(big, [0.0, 1.0]), [1000.0, 1000.0])


def test_softmax_cross_entropy():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (7, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 7)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels),
                             -np.log(p[np.arange(7), labels]), rtol=1e-5)
  # bfloat16 logits are computed in float32.
  assert losses.softmax_cross_entropy(logits.astype(jnp.bfloat16), labels).dtype == jnp.float32


@pytest.mark.parametrize('delta', [1.0 / 9.0, 1.0])
def test_huber(delta):
  rng = np.random.default_rng(2)
  p, t = rng.normal(0, 1, 200).astype(np.float32), rng.normal(0, 1, 200).astype(np.float32)
  np.testing.assert_allclose(losses.huber_loss(p, t, delta), _np_huber(p, t, delta),
                             rtol=1e-5, atol=1e-7)


def test_rpn_score_loss_normalisation():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 1, (2, 50)).astype(np.float32)
  labels = rng.integers(-1, 2, (2, 50))
  expected = sum(_np_sigmoid_ce(logits[labels >= 0], (labels[labels >= 0] == 1)))
  got = losses.rpn_score_loss(logits, labels, normalizer=2 * 256)
  np.testing.assert_allclose(got, expected / 512, rtol=1e-5)


def test_box_losses_normalise_by_positive_coordinates():
  rng = np.random.default_rng(4)
  pred = rng.normal(0, 1, (2, 30, 4)).astype(np.float32)
  tgt = rng.normal(0, 1, (2, 30, 4)).astype(np.float32)
  pos = rng.uniform(size=(2, 30)) < 0.3
  expected = _np_huber(pred[pos], tgt[pos], 1 / 9).sum() / (4 * pos.sum())
  np.testing.assert_allclose(losses.rpn_box_loss(pred, tgt, pos), expected, rtol=1e-5)
  expected = _np_huber(pred[pos], tgt[pos], 1.0).sum() / (4 * pos.sum())
  np.testing.assert_allclose(losses.fast_rcnn_box_loss(pred, tgt, pos), expected, rtol=1e-5)


def test_class_and_mask_losses():
  rng = np.random.default_rng(5)
  logits = rng.normal(0, 1, (2, 8, 4)).astype(np.float32)
  labels = rng.integers(0, 4, (2, 8))
  per_roi = np.asarray(losses.softmax_cross_entropy(logits, labels))
  np.testing.assert_allclose(losses.fast_rcnn_class_loss(logits, labels), per_roi.mean(),
                             rtol=1e-6)
  valid = np.arange(8)[None, :] < np.array([[5], [8]])
  np.testing.assert_allclose(losses.fast_rcnn_class_loss(logits, labels, valid),
                             per_roi[valid].mean(), rtol=1e-6)
  mlogits = rng.normal(0, 1, (2, 8, 6, 6)).astype(np.float32)
  mtargets = (rng.uniform(size=(2, 8, 6, 6)) > 0.5).astype(np.float32)
  fg = np.zeros((2, 8), bool)
  fg[0, :3] = True
  fg[1, 0] = True
  expected = _np_sigmoid_ce(mlogits[fg], mtargets[fg]).sum() / (4 * 36)
  np.testing.assert_allclose(losses.mask_loss(mlogits, mtargets, fg), expected, rtol=1e-5)


def test_empty_reductions_are_zero_with_finite_gradients():
  pred = jnp.ones((3, 4))
  none = jnp.zeros((3,), bool)
  value, grad = jax.value_and_grad(lambda p: losses.rpn_box_loss(p, jnp.zeros((3, 4)), none))(pred)
  assert float(value) == 0.0 and np.isfinite(np.asarray(grad)).all()
  mask_value = losses.mask_loss(jnp.ones((3, 2, 2)), jnp.ones((3, 2, 2)), none)
  assert float(mask_value) == 0.0
  assert float(losses.rpn_score_loss(jnp.ones((5,)), -jnp.ones((5,), jnp.int32), 256)) == 0.0


def test_normalisers_averaged_over_devices_give_the_whole_batch_loss():
  """axis_name: each normaliser is its mean over the devices, so the mean over 4 devices x 1
  image of the losses is the loss of the 4 images on one device (vmap with an axis name stands
  in for pmap); without it the data-dependent normalisations are per device and it is not."""
  rng = np.random.default_rng(5)
  b, n, r, m, k = 4, 30, 12, 6, 5
  fraction = np.array([0.05, 0.2, 0.5, 0.8])[:, None]  # unequal counts per image
  a = dict(
      logits=rng.normal(size=(b, n)).astype(np.float32), labels=rng.integers(-1, 2, (b, n)),
      deltas=rng.normal(size=(b, n, 4)).astype(np.float32),
      targets=rng.normal(size=(b, n, 4)).astype(np.float32),
      positive=rng.uniform(size=(b, n)) < fraction,
      class_logits=rng.normal(size=(b, r, k)).astype(np.float32),
      classes=rng.integers(0, k, (b, r)), valid=rng.uniform(size=(b, r)) < fraction + 0.1,
      box=rng.normal(size=(b, r, 4)).astype(np.float32),
      box_targets=rng.normal(size=(b, r, 4)).astype(np.float32),
      foreground=rng.uniform(size=(b, r)) < fraction,
      mask_logits=rng.normal(size=(b, r, m, m)).astype(np.float32),
      mask_targets=(rng.uniform(size=(b, r, m, m)) < 0.5).astype(np.float32))

  def levels(x):
    return {'p2': x['deltas'][:, :20], 'p3': x['deltas'][:, 20:]}

  cases = {  # name -> (loss of a batch dict with axis_name, normaliser data-dependent)
      'rpn_score': (lambda x, ax: losses.rpn_score_loss(
          x['logits'], x['labels'], x['logits'].shape[0] * 16, ax), False),
      'rpn_box per level': (lambda x, ax: losses.multilevel_rpn_box_loss(
          levels(x), x['targets'], x['positive'], axis_name=ax), True),
      'rpn_box sampled': (lambda x, ax: losses.sampled_rpn_box_loss(
          levels(x), x['targets'], x['positive'], x['logits'].shape[0] * 16, axis_name=ax),
                          False),
      'class': (lambda x, ax: losses.fast_rcnn_class_loss(
          x['class_logits'], x['classes'], x['valid'], ax), True),
      'class, every slot': (lambda x, ax: losses.fast_rcnn_class_loss(
          x['class_logits'], x['classes'], axis_name=ax), False),
      'box foreground': (lambda x, ax: losses.fast_rcnn_box_loss(
          x['box'], x['box_targets'], x['foreground'], axis_name=ax), True),
      'box sampled': (lambda x, ax: losses.fast_rcnn_box_loss(
          x['box'], x['box_targets'], x['foreground'], normalizer=jnp.sum(x['valid']),
          axis_name=ax), True),
      'mask': (lambda x, ax: losses.mask_loss(
          x['mask_logits'], x['mask_targets'], x['foreground'], ax), True),
  }
  def every_loss(x, axis_name):
    return {name: loss(x, axis_name) for name, (loss, _) in cases.items()}

  split = {key: v.reshape((b, 1) + v.shape[1:]) for key, v in a.items()}
  whole = jax.jit(lambda x: every_loss(x, None))(a)
  spread = jax.jit(jax.vmap(lambda x: every_loss(x, 'devices'), axis_name='devices'))(split)
  per_device = jax.jit(jax.vmap(lambda x: every_loss(x, None)))(split)
  for name, (_, data_dependent) in cases.items():
    value = float(whole[name])
    assert float(jnp.mean(spread[name])) == pytest.approx(value, rel=1e-5), name
    if data_dependent:
      assert abs(float(jnp.mean(per_device[name])) - value) > 1e-3 * abs(value), name
    else:
      assert float(jnp.mean(per_device[name])) == pytest.approx(value, rel=1e-5), name
