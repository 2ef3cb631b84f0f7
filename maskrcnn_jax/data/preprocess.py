"""Per-example preprocessing of the reference's input pipeline, in NumPy + PIL (no TensorFlow).

The steps follow the reference's dataloader (NVIDIA TF2 Mask R-CNN, `dataset/dataset_parser.py`):
decode to RGB, optional horizontal flip of image, boxes and masks, aspect-preserving resize into the
(H, W) canvas with ``scale = min(H / h, W / w)``, zero padding at the bottom and right, and each
ground-truth mask cropped to its box, resized bilinearly to gt_mask_size and zero-padded by 2 on
each side.

Mask crop convention (half-pixel centres, as RoIAlign with ``aligned=True``): for a box
(x1, y1, x2, y2) in pixels (pixel k covers [k, k + 1)), sample i of the S = gt_mask_size crop sits at
``x1 + (i + 0.5) * (x2 - x1) / S``; the mask is bilinearly interpolated there (pixel values at
pixel centres, clamped to the outermost centres inside the image, zero outside it), exactly as
`maskrcnn_jax.ops.masks.crop_gt_mask(convention='area')`, which the mask targets assume. The padded (S + 4) grid therefore covers the box expanded by 2 / S of its width and height
on each side, cell centres on the same lattice. The reference's `crop_and_resize` puts the first and
last samples on the box edges instead (a sub-pixel difference); the half-pixel convention makes the
crop of a flipped mask exactly the flipped crop, so flipping the 116 crop is exact and cheap.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn_jax.data import spec


def decode_rgb(encoded: bytes) -> Image.Image:
  """Decodes JPEG/PNG bytes into an RGB PIL image.

  No EXIF orientation is applied: prepared records hold the pixels their annotations refer to,
  with any orientation already applied or deliberately ignored (`annotations.read_image`).
  """
  image = Image.open(io.BytesIO(encoded))
  image.draft('RGB', image.size)  # asks the JPEG decoder for RGB output directly (no YCbCr pass)
  return image if image.mode == 'RGB' else image.convert('RGB')


def resize_scale(height: int, width: int, canvas: tuple[int, int]) -> tuple[float, int, int]:
  """Aspect-preserving fit into the canvas: (scale, resized height, resized width)."""
  scale = min(canvas[0] / height, canvas[1] / width)
  new_h = min(canvas[0], max(1, int(round(height * scale))))
  new_w = min(canvas[1], max(1, int(round(width * scale))))
  return scale, new_h, new_w


def resize_to_canvas(image: Image.Image, canvas: tuple[int, int]) -> tuple[np.ndarray, float]:
  """The image resized to fit the canvas as training and evaluation do (`resize_scale`, PIL
  bilinear on the uint8 image): ((h', w', 3) uint8 pixels, scale = resized / original)."""
  width, height = image.size
  scale, new_h, new_w = resize_scale(height, width, canvas)
  if (new_w, new_h) != image.size:
    image = image.resize((new_w, new_h), Image.BILINEAR)
  return np.asarray(image), scale


def _axis_weights(start: float, length: float, size: int, n: int):
  """Bilinear taps along one axis for `size` half-pixel-centred samples of [start, start+length].

  Pixel p's value sits at its centre p + 0.5; inside the image a sample is clamped to the outermost
  pixel centres (a pixel covers its area up to the image border), outside [0, n] it reads zero.
  This is `maskrcnn_jax.ops.masks.crop_gt_mask(convention='area')`, in NumPy.
  Returns (lo, hi, w_lo, w_hi): (size,) int indices into [0, n) and float32 weights.
  """
  x = start + (np.arange(size, dtype=np.float64) + 0.5) * (length / size)
  inside = (x >= 0.0) & (x <= n)
  coords = np.clip(x - 0.5, 0.0, n - 1.0)
  lo = np.floor(coords)
  frac = (coords - lo).astype(np.float32)
  lo = lo.astype(np.int64)
  hi = np.minimum(lo + 1, n - 1)
  return lo, hi, (1.0 - frac) * inside, frac * inside


def crop_and_resize_mask(mask: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
  """Bilinear crop of one mask to a box.

  mask: (h, w) uint8/bool/float, 1 inside; box: (4,) xyxy in the mask's pixels; returns (size,
  size) float32 in [0, 1] (see the module docstring for the sampling convention).
  """
  x1, y1, x2, y2 = (float(v) for v in box)
  ylo, yhi, wy_lo, wy_hi = _axis_weights(y1, y2 - y1, size, mask.shape[0])
  xlo, xhi, wx_lo, wx_hi = _axis_weights(x1, x2 - x1, size, mask.shape[1])
  # Separable: interpolate the needed rows, then the needed columns of those rows.
  cols = np.union1d(xlo, xhi)
  sub = mask[:, cols].astype(np.float32)
  rows = sub[ylo] * wy_lo[:, None] + sub[yhi] * wy_hi[:, None]       # (size, len(cols))
  xlo_c, xhi_c = np.searchsorted(cols, xlo), np.searchsorted(cols, xhi)
  return rows[:, xlo_c] * wx_lo[None, :] + rows[:, xhi_c] * wx_hi[None, :]


def decode_mask(counts: bytes, height: int, width: int) -> np.ndarray:
  """COCO compressed RLE counts -> (height, width) uint8 mask (Fortran-ordered, 1 inside)."""
  return mask_util.decode({'size': [height, width], 'counts': counts})


def process_example(record: dict, out: dict[str, np.ndarray], slot: int, *,
                    canvas: tuple[int, int], gt_mask_size: int, flip: bool,
                    skip_crowd: bool) -> None:
  """Decodes and preprocesses one dataset record into row `slot` of a batch in place.

  record: one `coco_instances` record with the image left encoded (``image`` bytes, ``image_id``,
  ``height``, ``width``, ``objects`` with normalized yxyx ``bbox``, ``label``, ``is_crowd`` and
  RLE ``mask``). out: a zero-initialised batch (`spec.empty_batch`); row `slot` is written,
  ``example_valid`` set. Instances beyond the batch's N are dropped (COCO has at most 93).
  """
  height, width = int(record['height']), int(record['width'])
  image = decode_rgb(record['image'])
  if image.size != (width, height):
    raise ValueError(f'image id {record["image_id"]}: decoded size {image.size[::-1]} differs '
                     f'from the recorded {(height, width)}')
  pixels, scale = resize_to_canvas(image, canvas)
  new_h, new_w = pixels.shape[:2]
  out['images'][slot, :new_h, :new_w] = pixels[:, ::-1] if flip else pixels
  out['image_sizes'][slot] = (new_h, new_w)
  out['image_ids'][slot] = int(record['image_id'])
  out['original_sizes'][slot] = (height, width)
  out['scales'][slot] = scale
  out['example_valid'][slot] = True

  objects = record['objects']
  is_crowd = np.asarray(objects['is_crowd'], bool).reshape(-1)
  keep = np.flatnonzero(~is_crowd) if skip_crowd else np.arange(is_crowd.size)
  keep = keep[:out['gt_valid'].shape[1]]
  if keep.size == 0:
    return
  yxyx = np.asarray(objects['bbox'], np.float32).reshape(-1, 4)[keep]
  # Normalized yxyx -> xyxy in original pixels.
  boxes = yxyx[:, [1, 0, 3, 2]] * np.array([width, height, width, height], np.float32)
  labels = np.asarray(objects['label'], np.int64).reshape(-1)[keep]
  masks_rle = [objects['mask'][i] for i in keep]
  k = keep.size
  pad = spec.MASK_PADDING
  for j in range(k):
    counts = masks_rle[j]
    mask = decode_mask(counts if isinstance(counts, bytes) else counts.encode(), height, width)
    crop = crop_and_resize_mask(mask, boxes[j], gt_mask_size)
    crop = np.rint(crop * 255.0).astype(np.uint8)
    out['gt_masks'][slot, j, pad:pad + gt_mask_size, pad:pad + gt_mask_size] = (
        crop[:, ::-1] if flip else crop)
  if flip:  # mirror in original pixels: x -> width - x
    boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], -1)
  out['gt_boxes'][slot, :k] = boxes * np.float32(scale)
  out['gt_classes'][slot, :k] = labels
  out['gt_is_crowd'][slot, :k] = is_crowd[keep]
  out['gt_valid'][slot, :k] = True
