"""Random batches with exactly the structure of the real pipeline's, without TensorFlow.

For benchmarks and tests on machines without TensorFlow. Images are smooth random colour fields;
each example has 1..N objects with plausible boxes (inside the resized region, sides from 8 px to
half the canvas) and elliptical masks filling their boxes, seeded and reproducible.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from maskrcnn_jax.data import spec


def _ellipse_crop(gt_mask_size: int) -> np.ndarray:
  """An ellipse inscribed in the box, on the padded (S, S) grid: uint8 round(255 * inside)."""
  s = gt_mask_size
  c = (np.arange(s) + 0.5) / s * 2.0 - 1.0
  inside = (c[:, None] ** 2 + c[None, :] ** 2) <= 1.0
  pad = spec.MASK_PADDING
  return np.pad(inside.astype(np.uint8) * 255, pad)


def synthetic_batch(batch_size: int, image_size: tuple[int, int], max_instances: int,
                    gt_mask_size: int, num_classes: int = 91, seed: int = 0,
                    max_objects: int | None = None) -> dict[str, np.ndarray]:
  """One random batch following `spec.batch_spec` (see the package docstring).

  max_objects: most objects per example (default min(N, 20)); example_valid is all True.
  """
  rng = np.random.default_rng(seed)
  out = spec.empty_batch(batch_size, image_size, max_instances, gt_mask_size)
  canvas_h, canvas_w = image_size
  mask = _ellipse_crop(gt_mask_size)
  max_objects = min(max_instances, max_objects or 20)
  for b in range(batch_size):
    # A plausible original size (COCO-like 640 on the long side) fitted into the canvas.
    orig_h, orig_w = (int(v) for v in rng.integers(240, 641, size=2))
    scale = min(canvas_h / orig_h, canvas_w / orig_w)
    h, w = min(canvas_h, round(orig_h * scale)), min(canvas_w, round(orig_w * scale))
    # Low-resolution noise upsampled by repetition: cheap, and not constant like real images.
    coarse = rng.integers(0, 256, size=(-(-h // 32), -(-w // 32), 3), dtype=np.uint8)
    out['images'][b, :h, :w] = np.repeat(np.repeat(coarse, 32, 0), 32, 1)[:h, :w]
    out['image_sizes'][b] = (h, w)
    out['image_ids'][b] = seed * batch_size + b + 1
    out['original_sizes'][b] = (orig_h, orig_w)
    out['scales'][b] = scale
    out['example_valid'][b] = True
    k = int(rng.integers(1, max_objects + 1))
    sizes = rng.uniform(8.0, max(9.0, min(h, w) / 2), size=(k, 2))
    x1 = rng.uniform(0.0, 1.0, size=k) * (w - sizes[:, 0])
    y1 = rng.uniform(0.0, 1.0, size=k) * (h - sizes[:, 1])
    boxes = np.stack([x1, y1, x1 + sizes[:, 0], y1 + sizes[:, 1]], axis=-1)
    out['gt_boxes'][b, :k] = np.clip(boxes, 0, [w, h, w, h])
    out['gt_classes'][b, :k] = rng.integers(1, num_classes, size=k)
    out['gt_valid'][b, :k] = True
    out['gt_masks'][b, :k] = mask
  return out


def synthetic_batches(batch_size: int, image_size: tuple[int, int], max_instances: int,
                      gt_mask_size: int, num_classes: int = 91, seed: int = 0,
                      start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of `synthetic_batch`es; batch s is seeded by (seed, s), so resumable."""
  step = start_step
  while True:
    yield synthetic_batch(batch_size, image_size, max_instances, gt_mask_size, num_classes,
                          seed=int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    step += 1
