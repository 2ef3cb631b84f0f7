"""Mask targets of hand-built cases against an independent computation from the full mask.

The data path crops each full-resolution mask to its box (`preprocess.crop_and_resize_mask`, 112
cells, stored as uint8 with a zero margin of `spec.MASK_PADDING`); the model resamples that crop
to each RoI's 28x28 bins (`ops.targets.mask_targets`). The independent reference reads the full
mask directly: bin (i, k) of a RoI is 1 iff the pixel containing the bin centre
``(x1 + (k + 0.5) w / 28, y1 + (i + 0.5) h / 28)`` is inside the object (pixel p covers
[p, p + 1)). The two agree exactly except for bins whose centre lies within one stored cell of
the object's boundary, where the double interpolation and the 0.5 threshold decide; those bins
are counted, not compared.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.data import preprocess
from maskrcnn_jax.data.spec import MASK_PADDING, GroundTruth
from maskrcnn_jax.ops import targets

G, M, H, W = 112, 28, 96, 96


def _rect_mask(x0, y0, x1, y1):
  mask = np.zeros((H, W), np.uint8)
  mask[y0:y1, x0:x1] = 1
  return mask


def _stored(mask, box):
  crop = preprocess.crop_and_resize_mask(mask, np.asarray(box, np.float32), G)
  out = np.zeros((G + 2 * MASK_PADDING,) * 2, np.uint8)
  out[MASK_PADDING:-MASK_PADDING, MASK_PADDING:-MASK_PADDING] = np.rint(crop * 255.0)
  return out


def _ours(mask, box, rois):
  gt = GroundTruth(boxes=jnp.asarray([box], jnp.float32), classes=jnp.ones((1,), jnp.int32),
                   masks=jnp.asarray(_stored(mask, box)[None]), valid=jnp.ones((1,), bool),
                   is_crowd=jnp.zeros((1,), bool))
  rois = jnp.asarray(rois, jnp.float32)
  out = targets.mask_targets(gt, rois, jnp.zeros((rois.shape[0],), jnp.int32), resolution=M)
  return np.asarray(out)


def _reference(mask, roi):
  """(M, M) targets read from the full mask at the bin centres, and the bins near a boundary."""
  x1, y1, x2, y2 = roi
  cx = x1 + (np.arange(M) + 0.5) * (x2 - x1) / M
  cy = y1 + (np.arange(M) + 0.5) * (y2 - y1) / M

  def read(yy, xx):
    inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    iy = np.clip(np.floor(yy).astype(int), 0, H - 1)
    ix = np.clip(np.floor(xx).astype(int), 0, W - 1)
    return np.where(inside, mask[iy, ix], 0)

  yy, xx = np.meshgrid(cy, cx, indexing='ij')
  value = read(yy, xx)
  return value, yy, xx, read


def _check(mask, box, roi):
  ours = _ours(mask, box, [roi])[0]
  value, yy, xx, read = _reference(mask, roi)
  # A bin is "near the boundary" if the object changes within one stored cell (plus half a
  # pixel of the pixel-area convention) of its centre.
  cell = max((box[2] - box[0]) / G, (box[3] - box[1]) / G) + 0.5
  near = np.zeros_like(value, bool)
  for dy in (-cell, 0.0, cell):
    for dx in (-cell, 0.0, cell):
      near |= read(yy + dy, xx + dx) != value
  far = ~near
  np.testing.assert_array_equal(ours[far], value[far])
  return ours, value, near


def test_roi_equal_to_the_gt_box_is_all_ones():
  box = (20, 30, 60, 50)
  ours, value, near = _check(_rect_mask(*box), box, box)
  assert value.all() and ours.all()


def test_shifted_roi():
  box = (20, 30, 60, 50)
  ours, value, near = _check(_rect_mask(*box), box, (25, 33, 65, 53))
  # The RoI sticks out by 5 px on the right and 3 px at the bottom: zeros there.
  assert not ours[:, -2:].any() and not ours[-3:, :].any() and ours[:20, :20].all()
  assert near.sum() < 0.2 * M * M


def test_roi_half_outside_the_object():
  box = (20, 30, 60, 50)
  ours, value, _ = _check(_rect_mask(*box), box, (40, 30, 80, 50))
  np.testing.assert_array_equal(ours[:, :M // 2 - 1], 1.0)
  np.testing.assert_array_equal(ours[:, M // 2 + 1:], 0.0)


@pytest.mark.parametrize('roi', [(40, 40, 42, 42), (36.9, 36.9, 44.9, 44.9), (38, 39, 44, 43)])
def test_four_pixel_object(roi):
  """A 2 x 2 px object: its box, a RoI four times as wide, an off-centre RoI. (Bins whose centre
  falls within a few hundredths of a pixel of the object's edge may go either way: the crop's
  bilinear edge crosses 0.5 exactly at the pixel boundary.)"""
  box = (40, 40, 42, 42)
  ours, value, near = _check(_rect_mask(*box), box, roi)
  assert value.any() and ours.any()
  if roi == (36.9, 36.9, 44.9, 44.9):
    # 3.5 bins per pixel, no bin centre within 0.1 px of an edge: the 7 x 7 bins whose centres
    # fall in [40, 42), except the four corner bins: there the separable bilinear values of the
    # edge rows and columns (0.60-0.69 each) multiply to below the 0.5 threshold. Never a bin
    # outside the object.
    assert value.sum() == 49 and value[11:18, 11:18].all()
    assert not (ours > value).any()
    corners = [(11, 11), (11, 17), (17, 11), (17, 17)]
    assert ours.sum() == 45 and not any(ours[c] for c in corners)


def test_non_rectangular_object():
  yy, xx = np.mgrid[:H, :W]
  disk = (((yy + 0.5 - 48) ** 2 + (xx + 0.5 - 40) ** 2) <= 15 ** 2).astype(np.uint8)
  ys, xs = np.nonzero(disk)
  box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
  for roi in (box, (20, 30, 52, 70), (35, 40, 75, 56)):
    ours, value, near = _check(disk, box, roi)
    assert near.sum() < 0.3 * M * M


def test_soft_targets_are_the_fractions_that_the_threshold_binarises():
  """model.mask.binarize_targets=False (torchvision's soft targets): the same resampling without
  the 0.5 threshold; thresholding them gives the reference's targets."""
  yy, xx = np.mgrid[:H, :W]
  disk = (((yy + 0.5 - 48) ** 2 + (xx + 0.5 - 40) ** 2) <= 15 ** 2).astype(np.uint8)
  ys, xs = np.nonzero(disk)
  box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
  gt = GroundTruth(boxes=jnp.asarray([box], jnp.float32), classes=jnp.ones((1,), jnp.int32),
                   masks=jnp.asarray(_stored(disk, box)[None]), valid=jnp.ones((1,), bool),
                   is_crowd=jnp.zeros((1,), bool))
  rois = jnp.asarray([box, (20, 30, 52, 70)], jnp.float32)
  matched = jnp.zeros((2,), jnp.int32)
  soft = np.asarray(targets.mask_targets(gt, rois, matched, resolution=M, binarize=False))
  hard = np.asarray(targets.mask_targets(gt, rois, matched, resolution=M))
  assert soft.min() >= 0.0 and soft.max() <= 1.0 + 1e-6
  assert ((soft > 0.0) & (soft < 1.0)).any()  # fractions along the boundary
  np.testing.assert_array_equal(hard, (soft >= 0.5).astype(np.float32))
