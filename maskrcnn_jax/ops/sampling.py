"""Balanced random sampling of positive and negative rows with static shapes.

The rule of torchvision's ``BalancedPositiveNegativeSampler`` and the reference's static
``BalancedPositiveNegativeSampler``: take at most ``floor(num_samples * positive_fraction)``
positives uniformly at random, then fill the rest of ``num_samples`` with negatives drawn uniformly
at random (more negatives when positives are scarce; fewer samples in all when both are).

Randomness without ``nonzero``: every row draws a uniform key, ineligible rows get key -1, and
``lax.top_k`` returns the rows with the largest keys -- a uniformly random subset of the eligible
rows, in uniformly random order. The number actually taken (data dependent) is applied as a mask
over the fixed-size top-k result. Reference uses: RPN 256 anchors at 0.5, RoI head 512 RoIs at
0.25.

Both functions work on one image; ``jax.vmap`` them over a batch with one key per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _candidates(key, labels, num_samples: int, positive_fraction: float, valid):
  """Random top-k candidates of each kind and how many of each to take.

  Returns:
    pos_idx (kp,) int32, neg_idx (kn,) int32: eligible rows first, in random order;
    num_pos, num_neg: int32 scalars, how many of the leading entries are taken.
  """
  labels = jnp.asarray(labels, jnp.int32)
  n = labels.shape[0]
  eligible = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
  is_pos = (labels == 1) & eligible
  is_neg = (labels == 0) & eligible
  # int() truncation as torchvision and the reference (int(batch_size * fraction)).
  max_pos = int(num_samples * positive_fraction)
  kp = min(max_pos, n)
  kn = min(num_samples, n)

  # One key vector serves both kinds: the two sets are disjoint.
  u = jax.random.uniform(key, (n,), jnp.float32)
  _, pos_idx = lax.top_k(jnp.where(is_pos, u, -1.0), kp)
  _, neg_idx = lax.top_k(jnp.where(is_neg, u, -1.0), kn)

  num_pos = jnp.minimum(jnp.sum(is_pos, dtype=jnp.int32), max_pos)
  num_neg = jnp.minimum(jnp.sum(is_neg, dtype=jnp.int32), num_samples - num_pos)
  return pos_idx.astype(jnp.int32), neg_idx.astype(jnp.int32), num_pos, num_neg


def sample_balanced_mask(key, labels, num_samples: int, positive_fraction: float, valid=None):
  """Samples rows for a loss, returned as masks over the rows.

  Args:
    key: PRNG key (one per image).
    labels: (N,) int32, 1 positive, 0 negative, -1 ignored (from ``matching.match``).
    num_samples: static total number of rows to sample (RPN: 256).
    positive_fraction: static upper bound on the positive share (RPN: 0.5).
    valid: optional (N,) bool; False rows (padded anchors / proposals) are never sampled.

  Returns:
    positive_sampled: (N,) bool, ``min(#positives, floor(num_samples * positive_fraction))``
      positives chosen uniformly at random.
    negative_sampled: (N,) bool, ``min(#negatives, num_samples - #positives sampled)`` negatives.
  """
  n = jnp.shape(labels)[0]
  pos_idx, neg_idx, num_pos, num_neg = _candidates(key, labels, num_samples, positive_fraction,
                                                   valid)
  # top_k indices are distinct, so a scatter-set has no write conflicts.
  pos_take = jnp.arange(pos_idx.shape[0]) < num_pos
  neg_take = jnp.arange(neg_idx.shape[0]) < num_neg
  positive_sampled = jnp.zeros((n,), bool).at[pos_idx].set(pos_take)
  negative_sampled = jnp.zeros((n,), bool).at[neg_idx].set(neg_take)
  return positive_sampled, negative_sampled


def sample_balanced_indices(key, labels, num_samples: int, positive_fraction: float, valid=None):
  """The same selection as :func:`sample_balanced_mask`, as a fixed-size list of row indices.

  Slots are ordered positives first, then negatives, then empty slots -- the reference's RoI
  sampler returns its 512 RoIs foreground first, so the first ``num_samples * positive_fraction``
  slots (128) hold every sampled foreground RoI and can feed the mask head directly. With the same
  key the selected set equals :func:`sample_balanced_mask`'s.

  Args:
    key: PRNG key (one per image).
    labels: (N,) int32, 1 positive, 0 negative, -1 ignored.
    num_samples: static number of slots (RoI head: 512).
    positive_fraction: static upper bound on the positive share (RoI head: 0.25).
    valid: optional (N,) bool; False rows are never sampled.

  Returns:
    indices: (num_samples,) int32 rows; 0 in empty slots (a safe gather index, mask it out).
    is_positive: (num_samples,) bool, True in the leading positive slots.
    valid: (num_samples,) bool, False in empty slots (fewer eligible rows than slots).
  """
  pos_idx, neg_idx, num_pos, num_neg = _candidates(key, labels, num_samples, positive_fraction,
                                                   valid)
  slots = jnp.arange(num_samples, dtype=jnp.int32)
  # Pad both candidate lists to num_samples so that slot arithmetic never indexes out of range.
  pos_full = jnp.zeros((num_samples,), jnp.int32).at[:pos_idx.shape[0]].set(pos_idx)
  neg_full = jnp.zeros((num_samples,), jnp.int32).at[:neg_idx.shape[0]].set(neg_idx)
  is_positive = slots < num_pos
  neg_slot = slots - num_pos
  is_negative = (~is_positive) & (neg_slot < num_neg)
  neg_pick = neg_full[jnp.clip(neg_slot, 0, num_samples - 1)]
  indices = jnp.where(is_positive, pos_full, jnp.where(is_negative, neg_pick, 0))
  return indices, is_positive, is_positive | is_negative
