"""Multi-level anchor grids (xyxy, absolute pixels of the padded canvas).

One parameterisation covers both conventions met in practice:

* The reference (NVIDIA TF2 / Google TPU Mask R-CNN): on level ``l`` with stride ``2**l`` the
  anchor size is ``anchor_scale * stride * 2**(s / num_scales)``; an aspect ratio is a pair
  ``(x_scale, y_scale)`` -- (1.0, 1.0), (1.4, 0.7), (0.7, 1.4) -- giving width ``size * x_scale``
  and height ``size * y_scale``; anchors are centred on ``(i + 0.5) * stride`` and not rounded.
* torchvision's ``AnchorGenerator``: ``sizes`` per level, aspect ratios ``r = h / w`` giving
  ``w = size / sqrt(r)``, ``h = size * sqrt(r)``; half extents rounded to integers (round half to
  even, as ``torch.round``); anchors centred on ``i * stride`` (offset 0).

Anchors are laid out location-major: for a feature map of (Hf, Wf) and A shapes per location the
result is (Hf * Wf * A, 4), row-major over (y, x, a) -- the order in which a conv head's
(Hf, Wf, A) output flattens.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

Shapes = tuple[np.ndarray, np.ndarray]


def reference_anchor_shapes(level: int, num_scales: int, anchor_scale: float,
                            aspect_ratios: Sequence[Sequence[float]]) -> Shapes:
  """Anchor (widths, heights) of one level under the reference's convention.

  Args:
    level: pyramid level; the stride is ``2**level``.
    num_scales: octave scales per level (the reference: 1).
    anchor_scale: base size in strides (the reference: 8.0, so P2 anchors are 32 px).
    aspect_ratios: ``(x_scale, y_scale)`` pairs.

  Returns:
    (widths, heights), each (num_scales * len(aspect_ratios),) float64, scale-major.
  """
  stride = 2.0 ** level
  widths, heights = [], []
  for scale in range(num_scales):
    size = anchor_scale * stride * 2.0 ** (scale / num_scales)
    for x_scale, y_scale in aspect_ratios:
      widths.append(size * x_scale)
      heights.append(size * y_scale)
  return np.asarray(widths), np.asarray(heights)


def torchvision_anchor_shapes(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Shapes:
  """Anchor (widths, heights) of one level under torchvision's ``AnchorGenerator`` convention.

  ``aspect_ratios`` are ``h / w``; the order is ratio-major (``for r: for size:``), as
  torchvision's ``generate_anchors``. The rounding of half extents happens in
  :func:`level_anchors` (``round_half_extents=True``).
  """
  # float32 arithmetic in torchvision's order, so that the later rounding sees the same values.
  widths, heights = [], []
  for ratio in aspect_ratios:
    h_ratio = np.sqrt(np.float32(ratio))
    w_ratio = np.float32(1.0) / h_ratio
    for size in sizes:
      widths.append(w_ratio * np.float32(size))
      heights.append(h_ratio * np.float32(size))
  return np.asarray(widths, np.float64), np.asarray(heights, np.float64)


def level_anchors(feature_height: int, feature_width: int, stride: float, widths, heights,
                  offset: float = 0.5, round_half_extents: bool = False) -> np.ndarray:
  """Anchors of one pyramid level.

  Args:
    feature_height, feature_width: the level's feature map size (Hf, Wf).
    stride: pixels per feature cell.
    widths, heights: (A,) anchor sizes from one of the ``*_anchor_shapes`` functions.
    offset: anchor centre within its cell, in strides (reference 0.5, torchvision 0.0).
    round_half_extents: round ``w/2`` and ``h/2`` to integers (torchvision).

  Returns:
    (Hf * Wf * A, 4) float32 xyxy, location-major (y, x, a).
  """
  half_w = np.asarray(widths, np.float64) / 2.0
  half_h = np.asarray(heights, np.float64) / 2.0
  if round_half_extents:
    half_w, half_h = np.round(half_w), np.round(half_h)
  cell = np.stack([-half_w, -half_h, half_w, half_h], axis=-1)  # (A, 4)
  cx = (np.arange(feature_width, dtype=np.float64) + offset) * stride
  cy = (np.arange(feature_height, dtype=np.float64) + offset) * stride
  cy, cx = np.meshgrid(cy, cx, indexing='ij')
  centers = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
  return (centers + cell[None]).reshape(-1, 4).astype(np.float32)


def multilevel_anchors(image_height: int, image_width: int, min_level: int, max_level: int,
                       shapes: Mapping[int, Shapes], offset: float = 0.5,
                       round_half_extents: bool = False) -> dict[str, np.ndarray]:
  """Anchors of every level for a padded canvas of (image_height, image_width).

  Level ``l`` has stride ``2**l`` and a feature map of ``ceil(H / 2**l) x ceil(W / 2**l)`` (the
  size produced by stride-2 convolutions with 'SAME' padding and by the P6 max-pool).

  Args:
    shapes: level -> (widths, heights) from ``reference_anchor_shapes`` or
      ``torchvision_anchor_shapes``.

  Returns:
    ``{'p2': (N2, 4), ..., 'p6': (N6, 4)}`` float32 xyxy NumPy arrays (constants under jit).
  """
  anchors = {}
  for level in range(min_level, max_level + 1):
    stride = 2 ** level
    fh, fw = -(-image_height // stride), -(-image_width // stride)
    widths, heights = shapes[level]
    anchors[f'p{level}'] = level_anchors(fh, fw, stride, widths, heights, offset,
                                         round_half_extents)
  return anchors


def num_anchors_per_location(shapes: Mapping[int, Shapes]) -> int:
  """A, the number of anchor shapes per location; it must be equal on every level."""
  counts = {len(w) for w, _ in shapes.values()}
  if len(counts) != 1:
    raise ValueError(f'every level needs the same number of anchor shapes, got {sorted(counts)}')
  return counts.pop()
