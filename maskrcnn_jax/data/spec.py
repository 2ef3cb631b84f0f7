"""The batch contract: names, shapes and dtypes of an input batch, and `GroundTruth`, the
model's view of its ground-truth entries (NumPy and flax only, no TensorFlow).

See the package docstring (`maskrcnn_jax.data`) for the meaning of each entry.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax.numpy as jnp
import numpy as np

# Zero padding added on each side of the gt_mask_size crop (the reference's 112 + 2 * 2 = 116).
# The one owner of this value: the pipeline writes it, the model's mask targets read it.
MASK_PADDING = 2
# The batch entries the train and inference steps read (the others stay on the host).
TRAIN_KEYS = ('images', 'image_sizes', 'gt_boxes', 'gt_classes', 'gt_masks', 'gt_valid',
              'gt_is_crowd')
INFER_KEYS = ('images', 'image_sizes')


class GroundTruth(flax.struct.PyTreeNode):
  """Padded ground truth of a batch (leading dims (B,)) or of one image (no batch dim).

  Attributes:
    boxes: (..., N, 4) float32 xyxy, absolute pixels of the padded canvas.
    classes: (..., N) int32 class ids, 0 = padding.
    masks: (..., N, S, S) uint8 ``round(255 * mask)`` cropped to the box at
      ``S - 2 * MASK_PADDING`` plus a zero margin of `MASK_PADDING` cells.
    valid: (..., N) bool, real instances.
    is_crowd: (..., N) bool, crowd regions (never positive; only ignored by matching).
  """
  boxes: Any
  classes: Any
  masks: Any
  valid: Any
  is_crowd: Any

  @classmethod
  def from_batch(cls, batch: Mapping[str, Any]) -> 'GroundTruth':
    """The ``gt_*`` entries of a batch (`batch_spec`), as float32 / int32 / bool arrays."""
    return cls(boxes=jnp.asarray(batch['gt_boxes'], jnp.float32),
               classes=jnp.asarray(batch['gt_classes'], jnp.int32),
               masks=jnp.asarray(batch['gt_masks']),
               valid=jnp.asarray(batch['gt_valid'], bool),
               is_crowd=jnp.asarray(batch['gt_is_crowd'], bool))

  @property
  def mask_size(self) -> int:
    """gt_mask_size: the side of the stored crops without their margin."""
    return self.masks.shape[-1] - 2 * MASK_PADDING


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
