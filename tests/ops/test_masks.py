"""Tests for maskrcnn_jax.ops.masks against NumPy loops (bilinear sampling, torchvision's paste)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops.masks import crop_gt_mask, mask_targets, paste_masks

G, MARGIN, S = 112, 2, 116


# ----------------------------------------------------------------------------- NumPy references
def np_bilinear(grid, y, x, clamp=False):
  """Bilinear value of a 2-D grid at continuous index (y, x); zero outside (or edge-clamped)."""
  h, w = grid.shape
  if clamp:
    y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
  y0, x0 = math.floor(y), math.floor(x)
  total = 0.0
  for yy, wy in ((y0, 1.0 - (y - y0)), (y0 + 1, y - y0)):
    for xx, wx in ((x0, 1.0 - (x - x0)), (x0 + 1, x - x0)):
      if 0 <= yy < h and 0 <= xx < w:
        total += wy * wx * grid[yy, xx]
  return total


def np_crop_area(mask, box, g=G, margin=MARGIN):
  """crop_gt_mask('area') by loops: cell centres, pixel centres at p + 0.5, clamp inside image."""
  h, w = mask.shape
  x1, y1, x2, y2 = [float(v) for v in box]
  out = np.zeros((g + 2 * margin,) * 2)
  for i in range(g):
    y = y1 + (i + 0.5) * (y2 - y1) / g
    for k in range(g):
      x = x1 + (k + 0.5) * (x2 - x1) / g
      if 0 <= y <= h and 0 <= x <= w:
        out[margin + i, margin + k] = np_bilinear(mask, y - 0.5, x - 0.5, clamp=True)
  return out


def np_crop_reference(mask, box, g=G, margin=MARGIN):
  """tf.image.crop_and_resize on the box divided by the image size (the reference's crop)."""
  h, w = mask.shape
  x1, y1, x2, y2 = [float(v) for v in box]
  out = np.zeros((g + 2 * margin,) * 2)
  for i in range(g):
    py = y1 / h * (h - 1) + i * (y2 - y1) / h * (h - 1) / (g - 1)
    for k in range(g):
      px = x1 / w * (w - 1) + k * (x2 - x1) / w * (w - 1) / (g - 1)
      if 0 <= py <= h - 1 and 0 <= px <= w - 1:
        out[margin + i, margin + k] = np_bilinear(mask, py, px)
  return out


def np_mask_target(grid, gt_box, roi, out=28, convention='area'):
  """One mask target by loops, from the stored-grid geometry."""
  gx1, gy1, gx2, gy2 = [float(v) for v in gt_box]
  rx1, ry1, rx2, ry2 = [float(v) for v in roi]
  res = np.zeros((out, out))
  for i in range(out):
    y = ry1 + (i + 0.5) * (ry2 - ry1) / out
    for k in range(out):
      x = rx1 + (k + 0.5) * (rx2 - rx1) / out
      if convention == 'area':
        u = (x - gx1) / ((gx2 - gx1) / G) + MARGIN - 0.5
        v = (y - gy1) / ((gy2 - gy1) / G) + MARGIN - 0.5
        res[i, k] = np_bilinear(grid, v, u)
      else:
        u = (x - gx1) * G / (gx2 - gx1 + 1e-8) + MARGIN
        v = (y - gy1) * G / (gy2 - gy1 + 1e-8) + MARGIN
        res[i, k] = np_bilinear(grid, v, u, clamp=True)
  return res


def np_resize_bilinear(a, oh, ow):
  """torch.nn.functional.interpolate(mode='bilinear', align_corners=False) on a 2-D array."""
  def axis(n_in, n_out):
    m = np.zeros((n_out, n_in))
    for j in range(n_out):
      src = max((j + 0.5) * n_in / n_out - 0.5, 0.0)
      i0 = int(src)
      i1 = min(i0 + 1, n_in - 1)
      lam = src - i0
      m[j, i0] += 1.0 - lam
      m[j, i1] += lam
    return m
  return axis(a.shape[0], oh) @ a @ axis(a.shape[1], ow).T


def np_torchvision_paste(mask, box, h, w):
  """torchvision's paste_masks_in_image for one mask (pad 1, expand box, int box, resize, paste)."""
  m = mask.shape[0]
  padded = np.pad(mask, 1)
  scale = (m + 2.0) / m
  x1, y1, x2, y2 = [float(v) for v in box]
  w_half, h_half = (x2 - x1) * 0.5 * scale, (y2 - y1) * 0.5 * scale
  cx, cy = (x2 + x1) * 0.5, (y2 + y1) * 0.5
  eb = np.array([cx - w_half, cy - h_half, cx + w_half, cy + h_half]).astype(np.int64)
  bw, bh = max(eb[2] - eb[0] + 1, 1), max(eb[3] - eb[1] + 1, 1)
  resized = np_resize_bilinear(padded, bh, bw)
  im = np.zeros((h, w))
  xa, xb = max(eb[0], 0), min(eb[2] + 1, w)
  ya, yb = max(eb[1], 0), min(eb[3] + 1, h)
  if xb > xa and yb > ya:
    im[ya:yb, xa:xb] = resized[ya - eb[1]:yb - eb[1], xa - eb[0]:xb - eb[0]]
  return im


def smooth_mask(rng, m=28, coarse=5):
  """A random blob-like probability mask (coarse noise, bilinearly upsampled, squashed)."""
  noise = rng.normal(size=(coarse, coarse)) + 0.6
  return 1.0 / (1.0 + np.exp(-4.0 * np_resize_bilinear(noise, m, m)))


def iou(a, b):
  union = np.sum(a | b)
  return 1.0 if union == 0 else np.sum(a & b) / union


crop_area = jax.jit(crop_gt_mask, static_argnames=('gt_mask_size', 'margin', 'convention'))
targets = jax.jit(mask_targets, static_argnames=('output_size', 'gt_mask_size', 'margin',
                                                  'binarize', 'convention'))
paste = jax.jit(paste_masks, static_argnums=(2, 3))


# ----------------------------------------------------------------------------- crop_gt_mask
def test_crop_rectangle_gives_ones_in_core_and_zero_margin():
  mask = np.zeros((60, 80), np.float32)
  mask[10:50, 20:70] = 1.0  # pixels y 10..49, x 20..69 -> box (20, 10, 70, 50)
  box = np.array([20.0, 10.0, 70.0, 50.0], np.float32)
  crop = np.asarray(crop_area(mask, box))
  assert crop.shape == (S, S)
  core = crop[MARGIN:-MARGIN, MARGIN:-MARGIN]
  assert np.all(crop[:MARGIN] == 0) and np.all(crop[-MARGIN:] == 0)
  assert np.all(crop[:, :MARGIN] == 0) and np.all(crop[:, -MARGIN:] == 0)
  ys = 10 + (np.arange(G) + 0.5) * 40 / G
  xs = 20 + (np.arange(G) + 0.5) * 50 / G
  # Every sample lies inside the box, so per axis at least half of its bilinear weight falls on
  # the rectangle: >= 0.5 except in the four corner cells (>= 0.25 = 0.5 * 0.5).
  assert np.all(core >= 0.25)
  corner = ((ys < 10.5) | (ys > 49.5))[:, None] & ((xs < 20.5) | (xs > 69.5))[None, :]
  assert corner.sum() == 4 and np.all(core[~corner] >= 0.5)
  # Samples half a pixel or more inside the box read exactly 1.
  inner = ((ys >= 10.5) & (ys <= 49.5))[:, None] & ((xs >= 20.5) & (xs <= 69.5))[None, :]
  np.testing.assert_allclose(core[inner], 1.0, atol=1e-6)
  # A whole-image mask touching the image border is all ones in the core (edge clamp).
  full = np.asarray(crop_area(np.ones((60, 80), np.float32), np.array([0, 0, 80, 60.0])))
  np.testing.assert_allclose(full[MARGIN:-MARGIN, MARGIN:-MARGIN], 1.0, atol=1e-6)


@pytest.mark.parametrize('convention', ['area', 'reference'])
def test_crop_matches_numpy_loops(convention):
  rng = np.random.default_rng(0)
  mask = (rng.random((37, 45)) < 0.5).astype(np.float32)
  boxes = [np.array([3.3, 4.1, 30.7, 25.2]), np.array([-6.0, 20.0, 20.0, 44.0]),  # partly outside
           np.array([40.0, 1.5, 41.0, 2.5])]  # tiny box: cells smaller than a pixel
  ref_fn = np_crop_area if convention == 'area' else np_crop_reference
  for box in boxes:
    got = np.asarray(crop_area(mask, box.astype(np.float32), gt_mask_size=20, margin=2,
                               convention=convention))
    want = ref_fn(mask, box, g=20, margin=2)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_crop_vmap_and_small_config():
  rng = np.random.default_rng(1)
  masks = (rng.random((3, 30, 40)) < 0.5).astype(np.float32)
  boxes = np.array([[1, 2, 20, 25], [5, 5, 39, 29], [-3, -3, 10, 10]], np.float32)
  batched = jax.vmap(functools.partial(crop_gt_mask, gt_mask_size=12, margin=1))(masks, boxes)
  for i in range(3):
    np.testing.assert_allclose(np.asarray(batched[i]),
                               np_crop_area(masks[i], boxes[i], g=12, margin=1), atol=1e-5)


# ----------------------------------------------------------------------------- mask_targets
def _stored_grids(rng, m):
  grids = np.zeros((m, S, S), np.float32)
  grids[:, MARGIN:-MARGIN, MARGIN:-MARGIN] = rng.random((m, G, G))
  return grids


def test_target_of_gt_box_is_the_core_resampled():
  rng = np.random.default_rng(2)
  grids = _stored_grids(rng, 2)
  gt_boxes = np.array([[10.0, 20.0, 66.0, 90.0], [0.0, 0.0, 13.0, 7.0]], np.float32)
  got = np.asarray(targets(grids, gt_boxes, gt_boxes, np.array([0, 1], np.int32),
                           binarize=False))
  for j in range(2):
    core = grids[j, MARGIN:-MARGIN, MARGIN:-MARGIN]
    # The box is exactly the 112 core: 28 bins of 4 cells, centres at core index 4i + 1.5.
    want = np.array([[np_bilinear(core, 4 * i + 1.5, 4 * k + 1.5) for k in range(28)]
                     for i in range(28)])
    np.testing.assert_allclose(got[j], want, atol=1e-4)
  binary = np.asarray(targets(grids, gt_boxes, gt_boxes, np.array([0, 1], np.int32)))
  np.testing.assert_array_equal(binary, (got >= 0.5).astype(np.float32))


def test_target_of_shifted_roi_is_shifted():
  rng = np.random.default_rng(3)
  grids = _stored_grids(rng, 1)
  gt = np.array([[8.0, 8.0, 64.0, 50.0]], np.float32)
  shifted = gt + np.array([[28.0, 0.0, 28.0, 0.0]], np.float32)  # half the width to the right
  idx = np.zeros(1, np.int32)
  base = np.asarray(targets(grids, gt, gt, idx, binarize=False))[0]
  moved = np.asarray(targets(grids, gt, shifted, idx, binarize=False))[0]
  np.testing.assert_allclose(moved[:, :14], base[:, 14:], atol=1e-5)
  np.testing.assert_array_equal(moved[:, 14:], 0.0)  # beyond the box and its margin


@pytest.mark.parametrize('convention', ['area', 'reference'])
def test_targets_match_numpy_loops_for_random_rois(convention):
  rng = np.random.default_rng(4)
  grids = _stored_grids(rng, 3)
  grids[:, MARGIN:-MARGIN, MARGIN:-MARGIN] = (grids[:, MARGIN:-MARGIN, MARGIN:-MARGIN] > 0.3)
  gt = np.array([[10, 10, 60, 40], [30, 5, 90, 95], [0, 50, 20, 70]], np.float32)
  rois = np.array([[12, 8, 58, 45], [25, 0, 100, 90], [-5, 45, 25, 80], [40, 20, 50, 30],
                   [0, 0, 5, 5]], np.float32)
  idx = np.array([0, 1, 2, 1, 0], np.int32)
  got = np.asarray(targets(grids, gt, rois, idx, output_size=14, binarize=False,
                           convention=convention))
  for r in range(len(rois)):
    want = np_mask_target(grids[idx[r]], gt[idx[r]], rois[r], out=14, convention=convention)
    np.testing.assert_allclose(got[r], want, atol=1e-4)


def test_conventions_differ_by_at_most_half_a_stored_cell():
  # The reference's mapping puts the box edge half a stored cell (box / 224) further in: on a
  # rectangle mask the two targets differ at most in one row / column of target cells.
  grids = np.zeros((1, S, S), np.float32)
  grids[0, MARGIN:-MARGIN, MARGIN:-MARGIN] = 1.0
  gt = np.array([[0.0, 0.0, 100.0, 100.0]], np.float32)
  rois = np.array([[-30.0, -30.0, 130.0, 130.0]], np.float32)
  a = np.asarray(targets(grids, gt, rois, np.zeros(1, np.int32)))[0]
  b = np.asarray(targets(grids, gt, rois, np.zeros(1, np.int32), convention='reference'))[0]
  assert np.sum(a != b) <= 2 * 28


def test_targets_vmap_and_jit():
  rng = np.random.default_rng(5)
  grids = np.stack([_stored_grids(rng, 4) for _ in range(2)])
  gt = np.tile(np.array([[10, 10, 60, 40], [30, 5, 90, 95], [0, 50, 20, 70], [0, 0, 0, 0]],
                        np.float32), (2, 1, 1))
  rois = rng.uniform(0, 80, (2, 6, 2)).astype(np.float32)
  rois = np.concatenate([rois, rois + rng.uniform(5, 40, (2, 6, 2)).astype(np.float32)], -1)
  idx = rng.integers(0, 4, (2, 6)).astype(np.int32)
  batched = jax.jit(jax.vmap(mask_targets))(grids, gt, rois, idx)
  assert batched.shape == (2, 6, 28, 28) and batched.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(batched)))  # the zero-size padded gt box included
  for b in range(2):
    np.testing.assert_array_equal(np.asarray(batched[b]),
                                  np.asarray(targets(grids[b], gt[b], rois[b], idx[b])))


# ----------------------------------------------------------------------------- paste_masks
def test_paste_all_ones_fills_its_box():
  boxes = np.array([[10.3, 5.7, 40.2, 30.9], [0.0, 0.0, 60.0, 50.0], [50.2, 40.6, 70.0, 62.0],
                    [20.0, 20.0, 20.0, 30.0]], np.float32)  # partly outside; degenerate
  out = np.asarray(paste(np.ones((4, 28, 28), np.float32), boxes, 50, 60))
  assert out.shape == (4, 50, 60)
  cy, cx = np.mgrid[0:50, 0:60] + 0.5
  for k in range(4):
    x1, y1, x2, y2 = boxes[k]
    centre_in = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
    if x2 > x1:
      np.testing.assert_array_equal(out[k] >= 0.5, centre_in)
      # Within the image, the area agrees with the box's up to a pixel band along its perimeter.
      cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, 60), min(y2, 50)
      area = (cx2 - cx1) * (cy2 - cy1)
      assert abs(centre_in.sum() - area) <= (cx2 - cx1) + (cy2 - cy1) + 1
      # Pixels whose centres are more than half a cell inside read exactly 1.
      assert np.all(out[k][centre_in & (cx > x1 + 2) & (cx < x2 - 2) & (cy > y1 + 2)
                           & (cy < y2 - 2)] > 1 - 1e-5)
    else:
      assert np.all(out[k] == 0.0)
  assert np.all(out >= 0.0) and np.all(out <= 1.0 + 1e-6)


def test_paste_matches_torchvision_algorithm():
  rng = np.random.default_rng(6)
  h, w = 120, 160
  masks, boxes = [], []
  for _ in range(12):
    masks.append(smooth_mask(rng))
    size = rng.uniform(30, 110, 2)
    x1, y1 = rng.uniform(-20, w - 20), rng.uniform(-20, h - 20)  # some partly outside
    boxes.append([x1, y1, x1 + size[0], y1 + size[1]])
  masks, boxes = np.array(masks, np.float32), np.array(boxes, np.float32)
  got = np.asarray(paste(masks, boxes, h, w))
  ious, max_diff = [], 0.0
  for k in range(len(masks)):
    want = np_torchvision_paste(masks[k].astype(np.float64), boxes[k], h, w)
    a, b = got[k] >= 0.5, want >= 0.5
    if a.sum() + b.sum() > 50:
      ious.append(iou(a, b))
  # Integer box rounding moves torchvision's mask by up to about a pixel: IoU stays high (over 200
  # such blobs: mean 0.96, min 0.89; for 8-30 px boxes the mean drops to 0.87).
  assert len(ious) >= 8
  assert min(ious) > 0.85 and np.mean(ious) > 0.95, ious


def test_paste_partly_outside_is_a_translated_window():
  rng = np.random.default_rng(7)
  masks = np.stack([smooth_mask(rng), smooth_mask(rng)]).astype(np.float32)
  boxes = np.array([[-15.5, -8.25, 30.0, 40.0], [25.0, 20.0, 70.5, 66.0]], np.float32)
  small = np.asarray(paste(masks, boxes, 40, 50))
  # The same masks in a canvas 20 px larger on the top/left, then cut back to the window.
  big = np.asarray(paste(masks, boxes + 20.0, 80, 90))
  np.testing.assert_allclose(small, big[:, 20:60, 20:70], atol=1e-5)


def test_paste_then_crop_round_trip():
  rng = np.random.default_rng(8)
  m = smooth_mask(rng).astype(np.float32)
  box = np.array([16.0, 12.0, 16.0 + 56.0, 12.0 + 84.0], np.float32)  # 2 x 3 pixels per cell
  image = np.asarray(paste(m[None], box[None], 110, 100))[0]
  crop = np.asarray(crop_area(image, box, gt_mask_size=28, margin=2))
  core = crop[2:-2, 2:-2]
  # Bilinear paste followed by bilinear crop blurs by a fraction of a cell; the outer ring also
  # loses up to a quarter of its value to the zero fade beyond the box.
  err = np.abs(core - m)
  assert np.max(err[1:-1, 1:-1]) < 0.06 and np.max(err) < 0.3
  assert iou(core >= 0.5, m >= 0.5) > 0.95
  # And the full pipeline: stored crop -> targets on the same box -> the mask again.
  stored = np.asarray(crop_area(image, box))
  target = np.asarray(targets(stored[None], box[None], box[None], np.zeros(1, np.int32)))[0]
  assert np.mean(target == (m >= 0.5)) > 0.97


def test_paste_vmap():
  rng = np.random.default_rng(9)
  masks = rng.random((2, 3, 14, 14)).astype(np.float32)
  boxes = np.array([[[0, 0, 10, 10], [5, 5, 30, 20], [-5, 3, 8, 40]],
                    [[1, 2, 3, 4], [10, 10, 31, 31], [0, 0, 32, 24]]], np.float32)
  batched = jax.jit(jax.vmap(functools.partial(paste_masks, height=24, width=32)))(masks, boxes)
  for b in range(2):
    single = paste(masks[b], boxes[b], 24, 32)
    np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(single), atol=1e-6)
