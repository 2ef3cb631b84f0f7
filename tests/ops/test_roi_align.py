"""Tests of maskrcnn_jax.ops.roi_align against a NumPy loop and detectron2's published values.

The reference below follows torchvision's documented CPU kernel sample by sample: float32 sample
coordinates computed in torchvision's operation order, samples outside ``[-1, H] x [-1, W]``
contributing 0, clamping at 0 and at ``H - 1`` / ``W - 1``, the average over
``sampling_ratio**2`` samples. It returns the (pixel, weight) pairs of every output element, so
the same code gives the output and the dense linear map whose transpose is the exact gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import roi_align as roi_ops

F32 = np.float32


# ------------------------------------------------------------------------------------------------
# NumPy reference
# ------------------------------------------------------------------------------------------------

def np_bilinear_taps(y, x, height: int, width: int) -> list[tuple[int, int, float]]:
  """(row, col, weight) of one bilinear sample, torchvision's rules; [] outside the map."""
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return []
  y, x = max(y, F32(0)), max(x, F32(0))
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_low = y_high = height - 1
    y = F32(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_low = x_high = width - 1
    x = F32(x_low)
  else:
    x_high = x_low + 1
  ly, lx = float(y - y_low), float(x - x_low)
  hy, hx = 1.0 - ly, 1.0 - lx
  return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx),
          (y_high, x_high, ly * lx)]


def np_roi_taps(box, height: int, width: int, out_h: int, out_w: int, scale: float, ratio: int,
                aligned: bool):
  """Per output bin (out_h, out_w): the list of (row, col, weight) over all its samples."""
  offset = F32(0.5) if aligned else F32(0.0)
  scale = F32(scale)
  x1, y1, x2, y2 = (F32(v) * scale - offset for v in box)
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:
    roi_w, roi_h = max(roi_w, F32(1)), max(roi_h, F32(1))
  bin_h, bin_w = roi_h / F32(out_h), roi_w / F32(out_w)
  taps = [[[] for _ in range(out_w)] for _ in range(out_h)]
  for ph in range(out_h):
    for pw in range(out_w):
      for iy in range(ratio):
        y = y1 + F32(ph) * bin_h + F32(iy + 0.5) * bin_h / F32(ratio)
        for ix in range(ratio):
          x = x1 + F32(pw) * bin_w + F32(ix + 0.5) * bin_w / F32(ratio)
          taps[ph][pw] += [(r, c, w / ratio**2)
                           for r, c, w in np_bilinear_taps(y, x, height, width)]
  return taps


def np_roi_align(features, boxes, out_h, out_w, scale, ratio, aligned) -> np.ndarray:
  """features (B, H, W, C), boxes (B, N, 4) -> (B, N, out_h, out_w, C) float64."""
  bsz, height, width, channels = features.shape
  out = np.zeros((bsz, boxes.shape[1], out_h, out_w, channels))
  for b in range(bsz):
    for n, box in enumerate(boxes[b]):
      taps = np_roi_taps(box, height, width, out_h, out_w, scale, ratio, aligned)
      for ph in range(out_h):
        for pw in range(out_w):
          for r, c, w in taps[ph][pw]:
            out[b, n, ph, pw] += w * features[b, r, c].astype(np.float64)
  return out


def np_roi_align_matrix(boxes, height, width, out_h, out_w, scale, ratio, aligned) -> np.ndarray:
  """The dense linear map of one image: (N * out_h * out_w, H * W); channels are independent."""
  matrix = np.zeros((len(boxes) * out_h * out_w, height * width))
  for n, box in enumerate(boxes):
    taps = np_roi_taps(box, height, width, out_h, out_w, scale, ratio, aligned)
    for ph in range(out_h):
      for pw in range(out_w):
        for r, c, w in taps[ph][pw]:
          matrix[(n * out_h + ph) * out_w + pw, r * width + c] += w
  return matrix


def np_box_level(box, min_level, max_level, canonical_size, canonical_level, eps) -> int:
  area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
  if area <= 0:
    return min_level
  level = np.floor(canonical_level + np.log2(np.sqrt(area) / canonical_size) + eps)
  return int(np.clip(level, min_level, max_level))


def test_reference_reproduces_detectron2_values():
  """The reference itself against detectron2's tests/layers/test_roi_align.py goldens."""
  ramp = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
  box = np.array([[[1, 1, 3, 3]]], np.float32)
  for aligned, expected in ((False, DETECTRON2_UNALIGNED), (True, DETECTRON2_ALIGNED)):
    out = np_roi_align(ramp, box, 4, 4, 1.0, 1, aligned)
    np.testing.assert_allclose(out[0, 0, :, :, 0], expected)


# detectron2 tests/layers/test_roi_align.py, test_forward_output: arange(25).reshape(5, 5), box
# [1, 1, 3, 3], output 4x4, spatial scale 1, sampling_ratio 0 (adaptive: ceil(2 / 4) = 1 sample
# per bin). "old_results" are aligned=False, "correct_results" aligned=True.
DETECTRON2_UNALIGNED = [[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14],
                        [15, 15.5, 16, 16.5]]
DETECTRON2_ALIGNED = [[4.5, 5.0, 5.5, 6.0], [7.0, 7.5, 8.0, 8.5], [9.5, 10.0, 10.5, 11.0],
                      [12.0, 12.5, 13.0, 13.5]]


# ------------------------------------------------------------------------------------------------
# roi_align
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def jitted_roi_align(output_size, scale, ratio, aligned):
  return jax.jit(lambda f, b: roi_ops.roi_align(f, b, output_size, scale, ratio, aligned))


@pytest.mark.parametrize('ratio', [1, 2])
@pytest.mark.parametrize('aligned', [False, True])
def test_detectron2_golden_values(aligned, ratio):
  # Bilinear interpolation of a linear ramp is exact and the samples of a bin are symmetric about
  # its centre, so any fixed sampling ratio reproduces detectron2's adaptive (1 sample) values.
  ramp = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
  box = np.array([[[1, 1, 3, 3]]], np.float32)
  out = np.asarray(jitted_roi_align(4, 1.0, ratio, aligned)(ramp, box))
  expected = DETECTRON2_ALIGNED if aligned else DETECTRON2_UNALIGNED
  np.testing.assert_allclose(out[0, 0, :, :, 0], expected, rtol=0, atol=1e-5)


def random_rois(rng: np.random.Generator, n: int, height: float, width: float) -> np.ndarray:
  """Boxes of all kinds in image pixels: inside, straddling the border, outside, tiny, empty."""
  x1 = rng.uniform(-0.3 * width, 1.1 * width, n)
  y1 = rng.uniform(-0.3 * height, 1.1 * height, n)
  w = np.exp(rng.uniform(np.log(0.2), np.log(width), n))
  h = np.exp(rng.uniform(np.log(0.2), np.log(height), n))
  boxes = np.stack([x1, y1, x1 + w, y1 + h], axis=-1)
  boxes[0] = [2.0, 3.0, 2.0, 3.0]  # empty
  boxes[1] = [5 * width, 5 * height, 6 * width, 6 * height]  # far outside
  boxes[2] = [0.0, 0.0, width, height]  # the whole image
  return boxes.astype(np.float32)


@pytest.mark.parametrize('aligned', [False, True])
@pytest.mark.parametrize('output_size,ratio', [((3, 4), 2), ((2, 2), 3)])
def test_roi_align_matches_numpy_reference(aligned, output_size, ratio):
  rng = np.random.default_rng(10)
  features = rng.standard_normal((2, 7, 9, 3)).astype(np.float32)
  scale = 0.5
  boxes = np.stack([random_rois(rng, 12, 7 / scale, 9 / scale) for _ in range(2)])
  out = np.asarray(jitted_roi_align(output_size, scale, ratio, aligned)(features, boxes))
  expected = np_roi_align(features, boxes, *output_size, scale, ratio, aligned)
  assert out.shape == (2, 12) + output_size + (3,) and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(out[:, 1], 0.0)  # boxes far outside the map give zeros


def test_roi_align_large_coordinates_round_like_torchvision():
  # Coordinates of a few hundred pixels: one float32 ulp of a sample position (XLA contracting a
  # multiply-add or using a reciprocal for a division) already moves the output by ~1e-4.
  rng = np.random.default_rng(11)
  features = rng.standard_normal((1, 100, 160, 2)).astype(np.float32)
  x1 = rng.uniform(0, 560, 40)
  y1 = rng.uniform(0, 340, 40)
  size = rng.uniform(20, 60, (40, 2))
  boxes = np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], -1)[None].astype(np.float32)
  out = np.asarray(jitted_roi_align(7, 0.25, 2, False)(features, boxes))
  expected = np_roi_align(features, boxes, 7, 7, 0.25, 2, False)
  np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)


def test_roi_align_gradient_is_the_transposed_linear_map():
  rng = np.random.default_rng(12)
  height, width, channels = 5, 6, 2
  features = rng.standard_normal((2, height, width, channels)).astype(np.float32)
  boxes = np.stack([random_rois(rng, 5, height, width) for _ in range(2)])
  boxes[1, 3] = boxes[1, 4]  # two identical RoIs: their gradients add up
  cotangent = rng.standard_normal((2, 5, 2, 3, channels)).astype(np.float32)

  @jax.jit
  def vjp(f, b, g):
    out, pullback = jax.vjp(lambda f: roi_ops.roi_align(f, b, (2, 3), 1.0, 2, True), f)
    return out, pullback(g)[0]

  out, grad = (np.asarray(r) for r in vjp(features, boxes, cotangent))
  for b in range(2):
    matrix = np_roi_align_matrix(boxes[b], height, width, 2, 3, 1.0, 2, True)
    flat_features = features[b].reshape(height * width, channels)
    np.testing.assert_allclose(out[b].reshape(-1, channels), matrix @ flat_features, atol=1e-5)
    expected = (matrix.T @ cotangent[b].reshape(-1, channels)).reshape(height, width, channels)
    np.testing.assert_allclose(grad[b], expected, rtol=0, atol=1e-5)


def test_roi_align_bfloat16_gradient_accumulates_in_float32():
  # 256 identical RoIs each add a small amount to the same pixels: a bfloat16 scatter-add would
  # stall once the sum is large (its ulp exceeds the increments).
  features = np.random.default_rng(13).standard_normal((1, 8, 8, 2)).astype(np.float32)
  boxes = np.tile(np.array([[[1.0, 1.0, 6.0, 6.0]]], np.float32), (1, 256, 1))

  @functools.partial(jax.jit, static_argnums=2)
  def grad(f, b, dtype):
    return jax.grad(lambda f: jnp.sum(roi_ops.roi_align(f.astype(dtype), b, 7, 1.0, 2,
                                                        True).astype(jnp.float32)))(f)

  exact = np.asarray(grad(features, boxes, jnp.float32))
  low = np.asarray(grad(features, boxes, jnp.bfloat16))
  # Only the final cast to bfloat16 (8 mantissa bits) may cost accuracy: relative error < 2^-8.
  np.testing.assert_allclose(low, exact, rtol=2.0**-8, atol=0)
  # XLA CPU computes bfloat16 arithmetic in float32 anyway, so check the program itself: every
  # scatter-add of the backward pass accumulates into a float32 buffer (GPUs add bfloat16 natively).
  jaxpr = jax.make_jaxpr(grad.__wrapped__, static_argnums=2)(features, boxes, jnp.bfloat16)
  scatters = [eqn for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == 'scatter-add']
  assert scatters and all(e.invars[0].aval.dtype == jnp.float32 for e in scatters)
  out = jitted_roi_align(7, 1.0, 2, True)(features.astype(jnp.bfloat16), boxes[:, :2])
  assert out.dtype == jnp.bfloat16


def _all_eqns(jaxpr):
  """Every equation of a jaxpr, including those of nested jaxprs (jit, custom_vjp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _all_eqns(inner)


def test_roi_align_rejects_unsupported_sampling_ratio():
  features = jnp.zeros((1, 4, 4, 1))
  boxes = jnp.zeros((1, 1, 4))
  for bad in (0, -1, 2.0):
    with pytest.raises(ValueError, match='sampling_ratio'):
      roi_ops.roi_align(features, boxes, 2, sampling_ratio=bad)


def test_roi_align_batch_equals_per_image_and_vmap():
  rng = np.random.default_rng(14)
  features = rng.standard_normal((3, 6, 7, 2)).astype(np.float32)
  boxes = np.stack([random_rois(rng, 4, 12, 14) for _ in range(3)])
  fn = jitted_roi_align(3, 0.5, 2, True)
  batched = np.asarray(fn(features, boxes))
  for b in range(3):
    np.testing.assert_allclose(batched[b], np.asarray(fn(features[b:b + 1], boxes[b:b + 1]))[0],
                               atol=1e-6)
  # vmap over an extra leading axis (e.g. several feature sets) gives the same values.
  vmapped = jax.jit(jax.vmap(lambda f, b: roi_ops.roi_align(f[None], b[None], 3, 0.5, 2,
                                                            True)[0]))(features, boxes)
  np.testing.assert_allclose(np.asarray(vmapped), batched, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# multilevel_roi_align
# ------------------------------------------------------------------------------------------------

CANVAS = 64
LEVELS = (2, 3, 4, 5)


def pyramid(rng: np.random.Generator, channels: int = 3) -> dict[str, np.ndarray]:
  """'p2'..'p5' feature maps of a 64 x 64 canvas (16x16 down to 2x2), batch 2, plus an unused P6."""
  feats = {f'p{l}': rng.standard_normal((2, CANVAS >> l, CANVAS >> l, channels)).astype(F32)
           for l in LEVELS}
  feats['p6'] = np.full((2, 1, 1, channels), np.nan, F32)  # ignored: outside [min, max] level
  return feats


def pyramid_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
  size = np.exp(rng.uniform(np.log(1.0), np.log(80.0), (2, n, 2)))
  x1 = rng.uniform(-8, CANVAS, (2, n))
  y1 = rng.uniform(-8, CANVAS, (2, n))
  boxes = np.stack([x1, y1, x1 + size[..., 0], y1 + size[..., 1]], -1)
  boxes[0, 0] = [10, 10, 10, 20]  # empty: lowest level
  boxes[0, 1] = [0, 0, 8, 8]  # sqrt(area) = 8 = canonical / 2 exactly: level 3, eps or not
  return boxes.astype(F32)


@pytest.mark.parametrize('aligned,eps', [(False, roi_ops.TORCHVISION_LEVEL_EPS), (True, 0.0)])
def test_multilevel_roi_align_matches_per_box_reference(aligned, eps):
  rng = np.random.default_rng(15)
  feats = pyramid(rng)
  boxes = pyramid_boxes(rng, 24)
  # Canonical size 16 on level 4 spreads boxes of 1-80 px over all four levels of the small canvas.
  fn = jax.jit(lambda f, b: roi_ops.multilevel_roi_align(
      f, b, (3, 2), 2, 5, canonical_size=16.0, canonical_level=4, sampling_ratio=2,
      aligned=aligned, eps=eps))
  out = np.asarray(fn(feats, boxes))
  assert out.shape == (2, 24, 3, 2, 3)
  levels = np.array([[np_box_level(bx, 2, 5, 16.0, 4, eps) for bx in img] for img in boxes])
  assert set(levels.ravel()) == set(LEVELS)
  assert levels[0, 0] == 2 and levels[0, 1] == 3
  np.testing.assert_array_equal(
      np.asarray(roi_ops.box_levels(boxes, 2, 5, 16.0, 4, eps)), levels)
  for b in range(2):
    for n in range(24):
      lvl = levels[b, n]
      expected = np_roi_align(feats[f'p{lvl}'][b:b + 1], boxes[b:b + 1, n:n + 1], 3, 2,
                              2.0**-lvl, 2, aligned)
      np.testing.assert_allclose(out[b, n], expected[0, 0], rtol=0, atol=1e-5)


def test_box_levels_torchvision_and_reference_formulas():
  # sqrt(area) = 224 * 2**k: exactly on a level boundary; the eps only matters when log2 rounds.
  sizes = np.array([224.0, 112.0, 448.0, 56.0, 896.0, 1.0, 4000.0, 223.9], np.float32)
  boxes = np.stack([np.zeros_like(sizes), np.zeros_like(sizes), sizes, sizes], -1)
  for eps in (0.0, 1e-6):
    levels = np.asarray(roi_ops.box_levels(boxes, 2, 5, eps=eps))
    np.testing.assert_array_equal(levels, [4, 3, 5, 2, 5, 2, 5, 3])


def test_multilevel_roi_align_gradient_per_level():
  rng = np.random.default_rng(16)
  feats = pyramid(rng, channels=2)
  boxes = pyramid_boxes(rng, 10)
  cotangent = rng.standard_normal((2, 10, 2, 2, 2)).astype(F32)
  level_feats = {k: v for k, v in feats.items() if k != 'p6'}

  @jax.jit
  def vjp(f, b, g):
    out, pullback = jax.vjp(lambda f: roi_ops.multilevel_roi_align(
        f, b, 2, 2, 5, canonical_size=16.0, sampling_ratio=2, aligned=True), f)
    return pullback(g)[0]

  grads = {k: np.asarray(v) for k, v in vjp(level_feats, boxes, cotangent).items()}
  levels = np.array([[np_box_level(bx, 2, 5, 16.0, 4, 1e-6) for bx in img] for img in boxes])
  for lvl in LEVELS:
    size = CANVAS >> lvl
    for b in range(2):
      on_level = levels[b] == lvl
      matrix = np_roi_align_matrix(boxes[b][on_level], size, size, 2, 2, 2.0**-lvl, 2, True)
      expected = matrix.T @ cotangent[b][on_level].reshape(-1, 2)
      np.testing.assert_allclose(grads[f'p{lvl}'][b].reshape(-1, 2), expected, rtol=0,
                                 atol=1e-5)


def test_multilevel_roi_align_bfloat16_features():
  rng = np.random.default_rng(17)
  feats = {k: v.astype(jnp.bfloat16) for k, v in pyramid(rng).items() if k != 'p6'}
  boxes = pyramid_boxes(rng, 6)
  out = jax.jit(lambda f, b: roi_ops.multilevel_roi_align(f, b, 2, 2, 5, canonical_size=16.0))(
      feats, boxes)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 6, 2, 2, 3)
