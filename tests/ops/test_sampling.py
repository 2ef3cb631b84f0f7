"""Tests for maskrcnn_jax.ops.sampling: counts, subsets, determinism, uniformity, index layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops.sampling import sample_balanced_indices, sample_balanced_mask


def _labels(num_pos, num_neg, num_ignore, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.array([1] * num_pos + [0] * num_neg + [-1] * num_ignore, np.int32)
  return rng.permutation(labels)


def expected_counts(labels, num_samples, fraction, valid=None):
  """The sampler's rule written out: at most int(S * f) positives, negatives fill the rest."""
  valid = np.ones(len(labels), bool) if valid is None else valid
  n_pos = int(np.sum((labels == 1) & valid))
  n_neg = int(np.sum((labels == 0) & valid))
  take_pos = min(n_pos, int(num_samples * fraction))
  take_neg = min(n_neg, num_samples - take_pos)
  return take_pos, take_neg


sample_mask = jax.jit(sample_balanced_mask, static_argnums=(2, 3))
sample_idx = jax.jit(sample_balanced_indices, static_argnums=(2, 3))


@pytest.mark.parametrize('counts,num_samples,fraction', [
    ((300, 700, 100), 256, 0.5),   # plenty of both: exactly 128 / 128
    ((20, 700, 100), 256, 0.5),    # few positives: negatives fill up to 256
    ((300, 30, 0), 256, 0.5),      # few negatives: 128 positives only
    ((5, 9, 50), 256, 0.5),        # few of both: everything eligible
    ((200, 900, 0), 512, 0.25),    # RoI head: 128 / 384
    ((0, 0, 40), 16, 0.5),         # nothing eligible
])
def test_mask_counts_and_subsets(counts, num_samples, fraction):
  labels = _labels(*counts)
  pos, neg = sample_mask(jax.random.PRNGKey(0), labels, num_samples, fraction, None)
  pos, neg = np.asarray(pos), np.asarray(neg)
  want_pos, want_neg = expected_counts(labels, num_samples, fraction)
  assert pos.sum() == want_pos and neg.sum() == want_neg
  assert np.all(labels[pos] == 1) and np.all(labels[neg] == 0)
  assert not np.any(pos & neg)


def test_valid_rows_are_never_sampled_when_invalid():
  labels = _labels(50, 200, 10, seed=3)
  valid = np.random.default_rng(4).random(labels.shape[0]) < 0.5
  pos, neg = sample_mask(jax.random.PRNGKey(1), labels, 64, 0.5, valid)
  pos, neg = np.asarray(pos), np.asarray(neg)
  assert not np.any((pos | neg) & ~valid)
  assert (pos.sum(), neg.sum()) == expected_counts(labels, 64, 0.5, valid)


def test_same_key_same_sample_and_different_keys_differ():
  labels = _labels(100, 400, 0)
  a = sample_mask(jax.random.PRNGKey(5), labels, 64, 0.5, None)
  b = sample_mask(jax.random.PRNGKey(5), labels, 64, 0.5, None)
  c = sample_mask(jax.random.PRNGKey(6), labels, 64, 0.5, None)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
  assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))


def test_sampling_is_approximately_uniform():
  # 10 positives (4 drawn) and 20 negatives (4 drawn) over 4000 fixed keys: every eligible row's
  # inclusion count should be close to its expectation. Chi-square with 9 / 19 degrees of freedom
  # has mean 9 / 19 and sd ~4 / ~6; the bound 4x the mean cannot flake with fixed keys and still
  # catches any real bias (e.g. always preferring low indices gives a statistic in the thousands).
  labels = _labels(10, 20, 10, seed=11)
  keys = jax.random.split(jax.random.PRNGKey(123), 4000)
  fn = jax.jit(jax.vmap(functools.partial(sample_balanced_mask, labels=labels, num_samples=8,
                                          positive_fraction=0.5)))
  pos, neg = fn(keys)
  pos_counts = np.asarray(pos).sum(0)[labels == 1]
  neg_counts = np.asarray(neg).sum(0)[labels == 0]
  assert np.all(np.asarray(pos).sum(1) == 4) and np.all(np.asarray(neg).sum(1) == 4)
  for counts, k, n in ((pos_counts, 4, 10), (neg_counts, 4, 20)):
    expected = 4000 * k / n
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 4 * (n - 1), (counts, chi2)
  assert np.all(np.asarray(pos).sum(0)[labels == -1] == 0)


@pytest.mark.parametrize('counts,num_samples,fraction', [
    ((300, 700, 50), 512, 0.25),
    ((40, 700, 50), 512, 0.25),    # fewer than 128 positives: more negatives
    ((40, 100, 50), 512, 0.25),    # fewer rows than slots: trailing invalid slots
    ((0, 100, 0), 32, 0.25),
])
def test_indices_layout(counts, num_samples, fraction):
  labels = _labels(*counts, seed=2)
  key = jax.random.PRNGKey(9)
  idx, is_pos, valid = sample_idx(key, labels, num_samples, fraction, None)
  idx, is_pos, valid = np.asarray(idx), np.asarray(is_pos), np.asarray(valid)
  assert idx.shape == is_pos.shape == valid.shape == (num_samples,)
  assert idx.dtype == np.int32
  want_pos, want_neg = expected_counts(labels, num_samples, fraction)
  # Positives first, then negatives, then empty slots.
  np.testing.assert_array_equal(is_pos, np.arange(num_samples) < want_pos)
  np.testing.assert_array_equal(valid, np.arange(num_samples) < want_pos + want_neg)
  assert np.all(labels[idx[is_pos]] == 1)
  assert np.all(labels[idx[valid & ~is_pos]] == 0)
  assert np.all(idx[~valid] == 0)
  assert len(np.unique(idx[valid])) == valid.sum()  # no row twice
  # Same key: the same set as the mask form.
  pos_m, neg_m = sample_mask(key, labels, num_samples, fraction, None)
  np.testing.assert_array_equal(np.sort(idx[is_pos]), np.flatnonzero(np.asarray(pos_m)))
  np.testing.assert_array_equal(np.sort(idx[valid & ~is_pos]), np.flatnonzero(np.asarray(neg_m)))


def test_vmap_equals_per_image():
  labels = np.stack([_labels(30, 90, 8, seed=s) for s in range(3)])
  valid = np.random.default_rng(0).random(labels.shape) < 0.8
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  fn = functools.partial(sample_balanced_indices, num_samples=64, positive_fraction=0.25)
  batched = jax.jit(jax.vmap(fn))(keys, labels, valid=valid)
  fm = functools.partial(sample_balanced_mask, num_samples=64, positive_fraction=0.25)
  batched_m = jax.jit(jax.vmap(fm))(keys, labels, valid=valid)
  fn, fm = jax.jit(fn), jax.jit(fm)
  for b in range(3):
    single = fn(keys[b], labels[b], valid=valid[b])
    for x, y in zip(batched, single):
      np.testing.assert_array_equal(np.asarray(x[b]), np.asarray(y))
    single_m = fm(keys[b], labels[b], valid=valid[b])
    for x, y in zip(batched_m, single_m):
      np.testing.assert_array_equal(np.asarray(x[b]), np.asarray(y))
