"""The batch contract: names, shapes and dtypes of an input batch (NumPy only, no TensorFlow).

See the package docstring (`maskrcnn_jax.data`) for the meaning of each entry.
"""

from __future__ import annotations

import numpy as np

# Zero padding added on each side of the gt_mask_size crop (the reference's 112 + 2 * 2 = 116).
MASK_PADDING = 2


def stored_mask_size(gt_mask_size: int) -> int:
  """S, the side of a stored ground-truth mask: gt_mask_size + 2 * MASK_PADDING."""
  return gt_mask_size + 2 * MASK_PADDING


def batch_spec(batch_size: int, image_size: tuple[int, int], max_instances: int,
               gt_mask_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shapes and dtypes of a batch: {name: (shape, dtype)}.

  image_size: (H, W) of the canvas; max_instances: N; gt_mask_size: the crop size before padding.
  """
  b, n, (h, w), s = batch_size, max_instances, image_size, stored_mask_size(gt_mask_size)
  return {
      'images': ((b, h, w, 3), np.dtype(np.uint8)),
      'image_sizes': ((b, 2), np.dtype(np.int32)),
      'image_ids': ((b,), np.dtype(np.int64)),
      'original_sizes': ((b, 2), np.dtype(np.int32)),
      'scales': ((b,), np.dtype(np.float32)),
      'example_valid': ((b,), np.dtype(np.bool_)),
      'gt_boxes': ((b, n, 4), np.dtype(np.float32)),
      'gt_classes': ((b, n), np.dtype(np.int32)),
      'gt_is_crowd': ((b, n), np.dtype(np.bool_)),
      'gt_valid': ((b, n), np.dtype(np.bool_)),
      'gt_masks': ((b, n, s, s), np.dtype(np.uint8)),
  }


def empty_batch(batch_size: int, image_size: tuple[int, int], max_instances: int,
                gt_mask_size: int) -> dict[str, np.ndarray]:
  """A batch of zeros (all examples and instances invalid) with the contract's shapes."""
  return {k: np.zeros(shape, dtype)
          for k, (shape, dtype) in batch_spec(batch_size, image_size, max_instances,
                                              gt_mask_size).items()}
