"""RoIAlign (He et al., Mask R-CNN, 2017) on NHWC features, single level and FPN multi-level.

Semantics are torchvision's ``roi_align`` (``torchvision/csrc/ops/cpu/roi_align_kernel.cpp``):

* a box ``(x1, y1, x2, y2)`` in image pixels maps to feature coordinates ``x1 * spatial_scale -
  offset`` with ``offset = 0.5`` when ``aligned`` (pixel centres at half-integers) and 0 otherwise;
  unaligned boxes are given a width and height of at least 1;
* each of the ``out_h x out_w`` bins averages ``sampling_ratio**2`` bilinear samples at
  ``start + p * bin + (i + 0.5) * bin / sampling_ratio``;
* a sample with ``y < -1`` or ``y > H`` (or ``x``) contributes 0 (it still counts in the average);
  otherwise negative coordinates clamp to 0 and the upper neighbour clamps to ``H - 1`` (at the last
  row the sample takes that row with weight 1).

Implementation. The bilinear weights are separable: per box, the ``out_h * s`` sample rows give two
row indices and two weights each, the columns likewise, and a bin's value is the weighted sum of
the ``(2 s) x (2 s)`` gathered feature vectors. The features are flattened to ``(B * P, C)`` (P
pixels, over all pyramid levels for the multi-level op) and read with one row gather per sample
corner: the work is proportional to the number of RoIs, never to the feature map size (no one-hot
interpolation matrices, DESIGN.md). Coordinates and weights are float32 and rounded as torchvision
rounds them (:func:`numerics.rounded`, :func:`numerics.divide` keep XLA from contracting products into FMAs and
from replacing divisions by reciprocal multiplications): on unit-variance features the outputs
match torchvision's to 1e-6, where one ulp of a sample coordinate had cost 1e-4.

Gradient. RoIAlign is linear in the features; its transpose scatter-adds ``weight * cotangent``
into the corner pixels. The features are cast to float32 before the gather, so the scatter-add
accumulates in float32 even for bfloat16 / float16 features and the cotangent is cast back to the
features' dtype only once, after all RoIs have been added (scatter-adding in bfloat16, 8 bits of
mantissa, loses most of the small contributions of overlapping RoIs). The cast fuses into the
gather's operand (single level) or into the concatenation of the levels (multi-level), so it costs
no separate pass. The backward is a hand-written ``custom_vjp``: one scatter-add per corner, in a
loop over the corners, so that one corner's ``weight * cotangent`` update is alive at a time
(unrolled, XLA materialised all 16 at once, each recomputing the bilinear weights per element:
436 MiB of temporaries for 512 RoIs of 7x7x256 against 49 MiB in the loop, the same sums in the
same order); autodiff of the fused forward copied the per-corner updates and was 2x slower on
CPU. Gradients with respect to the box coordinates flow through the bilinear weights
(torchvision gives none); the output is cast back to the features' dtype.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops import numerics
from maskrcnn_jax.ops.boxes import box_area

# torchvision's LevelMapper adds this inside the floor so that boxes whose size is an exact power
# of two times the canonical size land on the intended level despite log2 rounding; the reference
# (TF2) adds nothing.
TORCHVISION_LEVEL_EPS = 1e-6




def _output_hw(output_size) -> tuple[int, int]:
  if isinstance(output_size, int):
    return output_size, output_size
  out_h, out_w = output_size
  return int(out_h), int(out_w)


def _check_sampling_ratio(sampling_ratio) -> int:
  if not isinstance(sampling_ratio, int) or sampling_ratio <= 0:
    raise ValueError(
        f'sampling_ratio must be a positive static int, got {sampling_ratio!r}; the adaptive '
        'value (<= 0: ceil(roi size / output size) samples per bin) gives data-dependent shapes '
        'and is not supported. The reference uses 2.')
  return sampling_ratio


def _axis_samples(start, extent, size, out: int, ratio: int):
  """Bilinear sample indices and weights along one axis (rows or columns).

  Args:
    start: (B, N) float32 RoI start in feature coordinates (after scaling and the offset).
    extent: (B, N) float32 RoI length in feature coordinates (after the >= 1 rule if unaligned).
    size: (B, N) int32 feature map length on this axis (H or W of the box's level).
    out: output bins on this axis.
    ratio: samples per bin on this axis.

  Returns:
    index: (B, N, out, ratio, 2) int32 lower / upper neighbour, always in [0, size - 1].
    weight: (B, N, out, ratio, 2) float32 their weights (0 for samples outside [-1, size]).
  """
  bin_size = numerics.divide(extent, out)
  p = jnp.arange(out, dtype=jnp.float32)[:, None]
  i = jnp.arange(ratio, dtype=jnp.float32)[None, :]
  start = start[..., None, None]
  bin_size = bin_size[..., None, None]
  # Same operation order as torchvision, so the sample coordinates round identically.
  coord = (start + numerics.rounded(p * bin_size)
           + numerics.rounded(numerics.divide((i + 0.5) * bin_size, ratio)))
  size_i = size[..., None, None]
  size_f = size_i.astype(jnp.float32)
  inside = (coord >= -1.0) & (coord <= size_f)
  coord = jnp.clip(coord, 0.0, size_f)
  # The clip after the cast keeps every index in range even for NaN boxes: the gathers and
  # scatters below promise in-bounds indices.
  low = jnp.clip(jnp.floor(coord).astype(jnp.int32), 0, size_i - 1)
  at_edge = low >= size_i - 1
  high = jnp.where(at_edge, low, low + 1)
  frac = jnp.where(at_edge, 0.0, coord - low.astype(jnp.float32))
  # where, not a product: a NaN coordinate must give weight 0, not NaN.
  weight = jnp.where(inside[..., None], jnp.stack([1.0 - frac, frac], axis=-1), 0.0)
  return jnp.stack([low, high], axis=-1), weight


def _roi_align_flat(flat, boxes, base, height, width, scale, out_h: int, out_w: int,
                    ratio: int, aligned: bool):
  """RoIAlign reading every box from its own slice of a flattened feature array.

  Args:
    flat: (R, C) float32 features, R = B * (pixels per image over all levels), row-major (y, x).
    boxes: (B, N, 4) float32 xyxy, image pixels.
    base: (B, N) int32 row of ``flat`` where the box's image and level start.
    height, width: (B, N) int32 size of the box's feature map.
    scale: (B, N) float32 spatial scale of the box's feature map.
    out_h, out_w: output bins; ratio: samples per bin per axis; aligned: torchvision's flag.

  Returns:
    (B, N, out_h, out_w, C) float32.
  """
  offset = 0.5 if aligned else 0.0
  x1 = numerics.rounded(boxes[..., 0] * scale) - offset
  y1 = numerics.rounded(boxes[..., 1] * scale) - offset
  x2 = numerics.rounded(boxes[..., 2] * scale) - offset
  y2 = numerics.rounded(boxes[..., 3] * scale) - offset
  roi_w = x2 - x1
  roi_h = y2 - y1
  if not aligned:
    # Legacy (Detectron) behaviour: force malformed boxes to 1x1.
    roi_w = jnp.maximum(roi_w, 1.0)
    roi_h = jnp.maximum(roi_h, 1.0)
  ys, wy = _axis_samples(y1, roi_h, height, out_h, ratio)  # (B, N, out_h, r, 2)
  xs, wx = _axis_samples(x1, roi_w, width, out_w, ratio)  # (B, N, out_w, r, 2)
  b, n = boxes.shape[:2]
  s2 = 2 * ratio
  # Flat row of every (sample row, sample column) corner of every bin: (B, N, out_h, out_w, s2*s2)
  # with the corner axis ordered (row sample, row corner, column sample, column corner).
  rows = base[..., None, None] + ys.reshape(b, n, out_h, s2) * width[..., None, None]
  index = rows[:, :, :, None, :, None] + xs.reshape(b, n, 1, out_w, 1, s2)
  index = index.reshape(b, n, out_h, out_w, s2 * s2)
  weight = (wy.reshape(b, n, out_h, 1, s2, 1) * wx.reshape(b, n, 1, out_w, 1, s2)
            / float(ratio * ratio)).reshape(index.shape)
  return _weighted_gather(flat, index, weight)


@jax.custom_vjp
def _weighted_gather(flat, index, weight):
  """``out[..., :] = sum_k weight[..., k] * flat[index[..., k], :]``.

  Args:
    flat: (R, C) float32 rows.
    index: (..., K) int32 rows, all in [0, R) (promised: no bounds checks).
    weight: (..., K) float32.

  Returns:
    (..., C) float32.
  """
  # One gather per corner, accumulated in a Python loop: XLA fuses the K gathers, products and the
  # sum into one pass over the output, without materialising the (..., K, C) samples (a single
  # gather + reduce or an einsum was 2-20x slower on CPU).
  out = 0.0
  for k in range(index.shape[-1]):
    out = out + flat.at[index[..., k]].get(mode='promise_in_bounds') * weight[..., k, None]
  return out


def _weighted_gather_fwd(flat, index, weight):
  return _weighted_gather(flat, index, weight), (flat, index, weight)


def _weighted_gather_bwd(residuals, cotangent):
  """Transpose of the gather: one float32 scatter-add per corner, corner after corner.

  Written by hand because autodiff of the fused forward materialised and copied the per-corner
  updates (2x slower fwd+bwd on CPU). The corners run in a loop (not unrolled) so that XLA keeps
  one update buffer instead of one per corner (module docstring); the scatters add in the same
  order either way, so the gradient is bit-identical. The weight cotangent (the path to the box
  coordinates) costs a second gather; XLA removes it when nothing uses it (the usual case: RoIs
  are constants).
  """
  flat, index, weight = residuals
  channels = flat.shape[-1]
  corners = index.shape[-1]
  index_k = jnp.moveaxis(index, -1, 0).reshape(corners, -1)
  weight_k = jnp.moveaxis(weight, -1, 0).reshape(corners, -1, 1)
  ct = cotangent.reshape(-1, channels)

  def corner(k, d_flat):
    return d_flat.at[index_k[k]].add(ct * weight_k[k], mode='promise_in_bounds')

  d_flat = jax.lax.fori_loop(0, corners, corner, jnp.zeros(flat.shape, flat.dtype))
  d_weight = []
  for k in range(corners):
    rows = index[..., k]
    d_weight.append(jnp.sum(flat.at[rows].get(mode='promise_in_bounds') * cotangent, axis=-1))
  return d_flat, None, jnp.stack(d_weight, axis=-1)


_weighted_gather.defvjp(_weighted_gather_fwd, _weighted_gather_bwd)


def roi_align(features, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 2,
              aligned: bool = True):
  """torchvision ``roi_align`` for NHWC features and per-image boxes.

  Args:
    features: (B, H, W, C) float feature map (any float dtype).
    boxes: (B, N, 4) float xyxy in image pixels (multiplied by ``spatial_scale`` to reach feature
      coordinates). Boxes may lie partly or wholly outside the map (see the module docstring).
    output_size: int or (out_h, out_w).
    spatial_scale: feature pixels per image pixel (e.g. 1/4 for P2).
    sampling_ratio: static positive int, samples per bin along each axis (the reference: 2).
    aligned: torchvision's flag: True shifts the box by -0.5 feature pixels (pixel centres at
      half-integers, Detectron2's ``ROIAlignV2``); False is the legacy behaviour that
      torchvision's ``MultiScaleRoIAlign`` (its Mask R-CNN) uses.

  Returns:
    (B, N, out_h, out_w, C) in the features' dtype.
  """
  ratio = _check_sampling_ratio(sampling_ratio)
  out_h, out_w = _output_hw(output_size)
  bsz, h, w, c = features.shape
  boxes = jnp.asarray(boxes, jnp.float32)
  n = boxes.shape[1]
  flat = features.astype(jnp.float32).reshape(bsz * h * w, c)
  base = jnp.broadcast_to((jnp.arange(bsz, dtype=jnp.int32) * (h * w))[:, None], (bsz, n))
  height = jnp.full((bsz, n), h, jnp.int32)
  width = jnp.full((bsz, n), w, jnp.int32)
  scale = jnp.full((bsz, n), spatial_scale, jnp.float32)
  out = _roi_align_flat(flat, boxes, base, height, width, scale, out_h, out_w, ratio, aligned)
  return out.astype(features.dtype)


def box_levels(boxes, min_level: int, max_level: int, canonical_size: float = 224.0,
               canonical_level: int = 4, eps: float = TORCHVISION_LEVEL_EPS):
  """FPN level of each box (FPN paper eq. 1): ``floor(k0 + log2(sqrt(area) / s0) + eps)``.

  boxes: (..., 4) float32 xyxy image pixels -> (...) int32 in [min_level, max_level]. Empty boxes
  go to ``min_level``. torchvision: eps = 1e-6 (the default); the reference: eps = 0.
  """
  size = jnp.sqrt(box_area(boxes))
  level = jnp.floor(canonical_level + jnp.log2(size / canonical_size) + eps)
  # floor(-inf) of empty boxes clamps to min_level, as torchvision.
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(features: Mapping[str, jnp.ndarray], boxes, output_size, min_level: int,
                         max_level: int, canonical_size: float = 224.0, canonical_level: int = 4,
                         sampling_ratio: int = 2, aligned: bool = True,
                         eps: float = TORCHVISION_LEVEL_EPS):
  """FPN RoIAlign: each box is pooled from one level chosen by its size (:func:`box_levels`).

  Level ``l`` is ``features[f'p{l}']`` with spatial scale ``2**-l``. All levels are flattened into
  one array and each box gathers from its level's slice, so the cost is that of one single-level
  RoIAlign, not one per level. Equals torchvision's ``MultiScaleRoIAlign`` given the same level
  assignment (torchvision: ``eps=1e-6``, ``aligned=False``, ``sampling_ratio=2``, canonical 224 /
  level 4).

  Args:
    features: 'p{l}' -> (B, H_l, W_l, C) for l in [min_level, max_level] (other keys ignored), all
      with the same B, C and dtype.
    boxes: (B, N, 4) float xyxy, absolute pixels of the padded canvas.
    output_size: int or (out_h, out_w).
    min_level, max_level: level range; boxes are assigned within it.
    canonical_size, canonical_level: a box of ``canonical_size**2`` area goes to
      ``canonical_level``.
    sampling_ratio: static positive int samples per bin per axis.
    aligned: torchvision's half-pixel flag.
    eps: added inside the floor of the level formula (torchvision 1e-6, the reference 0).

  Returns:
    (B, N, out_h, out_w, C) in the features' dtype.
  """
  ratio = _check_sampling_ratio(sampling_ratio)
  out_h, out_w = _output_hw(output_size)
  levels = list(range(min_level, max_level + 1))
  maps = [features[f'p{l}'] for l in levels]
  bsz, c, dtype = maps[0].shape[0], maps[0].shape[-1], maps[0].dtype
  boxes = jnp.asarray(boxes, jnp.float32)
  n = boxes.shape[1]
  sizes = [(m.shape[1], m.shape[2]) for m in maps]
  offsets, total = [], 0
  for h, w in sizes:
    offsets.append(total)
    total += h * w
  # One (B * P, C) array, image-major then level-major; float32 so that gradients accumulate in
  # float32 (module docstring). The cast fuses into this one copy.
  flat = jnp.concatenate([m.astype(jnp.float32).reshape(bsz, -1, c) for m in maps], axis=1)
  flat = flat.reshape(bsz * total, c)

  level_idx = box_levels(boxes, min_level, max_level, canonical_size, canonical_level,
                         eps) - min_level
  base = (jnp.asarray(offsets, jnp.int32)[level_idx]
          + (jnp.arange(bsz, dtype=jnp.int32) * total)[:, None])
  height = jnp.asarray([h for h, _ in sizes], jnp.int32)[level_idx]
  width = jnp.asarray([w for _, w in sizes], jnp.int32)[level_idx]
  scale = jnp.asarray([2.0 ** -l for l in levels], jnp.float32)[level_idx]
  out = _roi_align_flat(flat, boxes, base, height, width, scale, out_h, out_w, ratio, aligned)
  return out.astype(dtype)
