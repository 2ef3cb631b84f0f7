"""Tests of losses.multilevel_rpn_box_loss: per-level normalisation (the reference), summed."""

import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import losses

LEVEL_SIZES = {'p2': 7, 'p3': 4, 'p4': 3}  # anchors per image of each level
BATCH = 2


def np_huber(d, delta):
  """TF Huber: 0.5 d^2 if |d| <= delta, else delta * (|d| - 0.5 delta)."""
  d = np.abs(np.asarray(d, np.float64))
  out = np.empty_like(d)
  for idx, v in np.ndenumerate(d):
    out[idx] = 0.5 * v * v if v <= delta else delta * (v - 0.5 * delta)
  return out


def np_multilevel(deltas, targets, positive, delta):
  """Sum over levels (sorted names) of sum of Huber over positive coordinates / (4 * #positive)."""
  total, start = 0.0, 0
  for level in sorted(deltas):
    n = deltas[level].shape[1]
    t = targets[:, start:start + n]
    p = positive[:, start:start + n]
    start += n
    num = 0.0
    count = 0
    for b in range(p.shape[0]):
      for a in range(n):
        if p[b, a]:
          num += float(np.sum(np_huber(deltas[level][b, a] - t[b, a], delta)))
          count += 1
    total += num / (4 * count) if count else 0.0
  return total


def np_global(deltas, targets, positive, delta):
  """torchvision-style: one normalisation over every level's positives."""
  pred = np.concatenate([deltas[k] for k in sorted(deltas)], axis=1)
  h = np_huber(pred - targets, delta).sum(-1)
  return float(np.sum(h[positive]) / (4 * np.sum(positive)))


def make_case(seed=0):
  rng = np.random.default_rng(seed)
  # Insertion order deliberately not sorted: the function must use the sorted level order.
  order = ['p4', 'p2', 'p3']
  deltas = {k: rng.normal(0, 0.3, (BATCH, LEVEL_SIZES[k], 4)).astype(np.float32) for k in order}
  total = sum(LEVEL_SIZES.values())
  targets = rng.normal(0, 0.3, (BATCH, total, 4)).astype(np.float32)
  positive = np.zeros((BATCH, total), bool)
  n2 = LEVEL_SIZES['p2']
  positive[:, :n2] = True                 # p2: 14 positives
  positive[0, :2] = False                 # ... 12
  positive[1, n2 + 1] = True              # p3: one positive
  # p4: none.
  return deltas, targets, positive


def _call(deltas, targets, positive, **kw):
  return float(losses.multilevel_rpn_box_loss({k: jnp.asarray(v) for k, v in deltas.items()},
                                              jnp.asarray(targets), jnp.asarray(positive), **kw))


def test_multilevel_loss_is_the_sum_of_per_level_normalised_losses():
  deltas, targets, positive = make_case()
  # Both Huber branches occur at the default delta of 1/9.
  diff = np.abs(np.concatenate([deltas[k] for k in sorted(deltas)], 1) - targets)[positive]
  assert np.any(diff <= 1 / 9) and np.any(diff > 1 / 9)
  want = np_multilevel(deltas, targets, positive, 1.0 / 9.0)
  got = _call(deltas, targets, positive)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # The per-level normalisation differs from a single global one in this case.
  glob = np_global(deltas, targets, positive, 1.0 / 9.0)
  assert abs(got - glob) > 0.1 * abs(glob), (got, glob)


def test_multilevel_loss_with_another_delta_and_seed():
  deltas, targets, positive = make_case(seed=3)
  np.testing.assert_allclose(_call(deltas, targets, positive, delta=0.5),
                             np_multilevel(deltas, targets, positive, 0.5), rtol=1e-5, atol=1e-7)


def test_level_without_positives_contributes_zero():
  deltas, targets, positive = make_case(seed=1)
  base = _call(deltas, targets, positive)
  # Changing predictions or targets of a level without positives (p4) changes nothing.
  n4 = LEVEL_SIZES['p4']
  deltas2 = dict(deltas, p4=deltas['p4'] + 5.0)
  targets2 = targets.copy()
  targets2[:, -n4:] -= 3.0
  assert _call(deltas2, targets2, positive) == pytest.approx(base, rel=1e-6)
  # Each level's share equals its single-level loss; p4's is exactly 0.
  start = 0
  parts = {}
  for level in sorted(deltas):
    n = LEVEL_SIZES[level]
    parts[level] = float(losses.rpn_box_loss(jnp.asarray(deltas[level]),
                                             jnp.asarray(targets[:, start:start + n]),
                                             jnp.asarray(positive[:, start:start + n])))
    start += n
  assert parts['p4'] == 0.0
  assert parts['p2'] > 0.0 and parts['p3'] > 0.0
  np.testing.assert_allclose(base, sum(parts.values()), rtol=1e-6)
  # No positives anywhere: 0 (no NaN).
  assert _call(deltas, targets, np.zeros_like(positive)) == 0.0


def test_level_block_mismatch_raises():
  deltas, targets, positive = make_case()
  # Targets holding one anchor more, or one fewer, than the levels.
  with pytest.raises(ValueError, match='the levels hold'):
    _call(deltas, np.pad(targets, ((0, 0), (0, 1), (0, 0))), np.pad(positive, ((0, 0), (0, 1))))
  with pytest.raises(ValueError, match='the levels hold'):
    _call(deltas, targets[:, :-1], positive[:, :-1])


def np_smooth_l1(d, beta):
  """torchvision's smooth_l1_loss element: 0.5 d^2 / beta if |d| < beta, else |d| - 0.5 beta."""
  d = np.abs(np.asarray(d, np.float64))
  return np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def test_sampled_normalizer_is_torchvision_smooth_l1_over_sampled_anchors():
  """``rpn.box_loss_normalizer='sampled'`` with huber_delta 1/9 and weight 9 is torchvision's
  ``smooth_l1_loss(beta=1/9, reduction='sum') / sampled anchors`` over every level at once."""
  deltas, targets, positive = make_case()
  sampled = BATCH * 5  # the batch's sampled anchors (torchvision's sampled_inds.numel())
  pred = np.concatenate([deltas[k] for k in sorted(deltas)], axis=1)
  want = 0.0
  for b in range(BATCH):
    for a in range(pred.shape[1]):
      if positive[b, a]:
        want += float(np.sum(np_smooth_l1(pred[b, a] - targets[b, a], 1.0 / 9.0)))
  want /= sampled
  got = 9.0 * float(losses.sampled_rpn_box_loss(
      {k: jnp.asarray(v) for k, v in deltas.items()}, jnp.asarray(targets),
      jnp.asarray(positive), sampled, 1.0 / 9.0))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match='the levels hold'):
    losses.sampled_rpn_box_loss({k: jnp.asarray(v) for k, v in deltas.items()},
                                jnp.asarray(targets[:, 1:]), jnp.asarray(positive), 1.0)


def test_box_head_sampled_normalizer_is_torchvision_fastrcnn_box_loss():
  rng = np.random.default_rng(3)
  pred = rng.normal(0, 0.5, (2, 6, 4)).astype(np.float32)
  tgt = rng.normal(0, 0.5, (2, 6, 4)).astype(np.float32)
  fg = np.array([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
  want = float(np.sum(np_smooth_l1(pred - tgt, 1.0 / 9.0)[fg])) / 12  # / labels.numel()
  got = 9.0 * float(losses.fast_rcnn_box_loss(jnp.asarray(pred), jnp.asarray(tgt),
                                              jnp.asarray(fg), 1.0 / 9.0, normalizer=12))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  reference = float(losses.fast_rcnn_box_loss(jnp.asarray(pred), jnp.asarray(tgt),
                                              jnp.asarray(fg), 1.0))
  np.testing.assert_allclose(reference, np.sum(np_huber(pred - tgt, 1.0)[fg]) / (4 * 3),
                             rtol=1e-5)
