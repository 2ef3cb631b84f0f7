"""Tests of ops/anchors.py: the reference's anchors against a NumPy loop of its formula."""

import numpy as np
import pytest

from maskrcnn_jax.ops import anchors as anchor_ops

_REFERENCE_RATIOS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))


def _reference_loop(height, width, min_level, max_level, num_scales, anchor_scale, ratios):
  """The reference's anchor definition written as plain loops (y, x, scale, ratio order)."""
  out = {}
  for level in range(min_level, max_level + 1):
    stride = 2 ** level
    rows = []
    for y in range(height // stride):
      for x in range(width // stride):
        for s in range(num_scales):
          size = anchor_scale * stride * 2 ** (s / num_scales)
          for ax, ay in ratios:
            cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
            hw, hh = size * ax / 2, size * ay / 2
            rows.append([cx - hw, cy - hh, cx + hw, cy + hh])
    out[f'p{level}'] = np.array(rows)
  return out


@pytest.mark.parametrize('num_scales', [1, 2])
def test_reference_anchors_match_loop(num_scales):
  shapes = {l: anchor_ops.reference_anchor_shapes(l, num_scales, 8.0, _REFERENCE_RATIOS)
            for l in range(2, 7)}
  got = anchor_ops.multilevel_anchors(128, 192, 2, 6, shapes)
  ref = _reference_loop(128, 192, 2, 6, num_scales, 8.0, _REFERENCE_RATIOS)
  assert list(got) == ['p2', 'p3', 'p4', 'p5', 'p6']
  for key in ref:
    assert got[key].dtype == np.float32
    np.testing.assert_allclose(got[key], ref[key], atol=1e-4)
  assert anchor_ops.num_anchors_per_location(shapes) == 3 * num_scales


def test_reference_anchor_sizes_and_counts():
  shapes = {l: anchor_ops.reference_anchor_shapes(l, 1, 8.0, _REFERENCE_RATIOS)
            for l in range(2, 7)}
  anchors = anchor_ops.multilevel_anchors(832, 1344, 2, 6, shapes)
  for level, size in zip(range(2, 7), (32, 64, 128, 256, 512)):
    a = anchors[f'p{level}']
    assert a.shape == ((832 >> level) * (1344 >> level) * 3, 4)
    np.testing.assert_allclose(a[0], [2 ** level / 2 - size / 2, 2 ** level / 2 - size / 2,
                                      2 ** level / 2 + size / 2, 2 ** level / 2 + size / 2])


def test_torchvision_shapes_rounding_and_offset():
  widths, heights = anchor_ops.torchvision_anchor_shapes((32,), (0.5, 1.0, 2.0))
  a = anchor_ops.level_anchors(2, 3, 4, widths, heights, offset=0.0, round_half_extents=True)
  # h/w = 0.5: w = 32 * sqrt(2) = 45.25 -> half 22.6 -> 23; h = 22.6 -> half 11.3 -> 11.
  np.testing.assert_allclose(a[0], [-23, -11, 23, 11])
  np.testing.assert_allclose(a[1], [-16, -16, 16, 16])
  np.testing.assert_allclose(a[3], [-23 + 4, -11, 23 + 4, 11])  # next x location, stride 4
  assert a.shape == (2 * 3 * 3, 4)


def test_mismatched_anchor_counts_rejected():
  shapes = {2: (np.ones(3), np.ones(3)), 3: (np.ones(2), np.ones(2))}
  with pytest.raises(ValueError, match='same number of anchor shapes'):
    anchor_ops.num_anchors_per_location(shapes)
