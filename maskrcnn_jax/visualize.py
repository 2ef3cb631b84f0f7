"""Visualisation: drawing detections (boxes, masks, labels) onto an image, for inspection.

`draw_instances` takes an image and a detection record (the ``boxes``/``scores``/``category_ids``
/``masks`` a model or a data set gives, in the image's pixels) and returns a new RGB array with
each instance drawn in a stable colour of its category (`category_color`). Only PIL and NumPy are
used, so it runs anywhere the package does, e.g. to dump predictions to PNG files during eval.
"""

from __future__ import annotations

import colorsys
import pathlib
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = ['category_color', 'draw_instances']

_GOLDEN_RATIO_CONJUGATE = 0.6180339887498949


def category_color(category_id: int) -> tuple[int, int, int]:
  """A stable RGB colour for a category id: a golden-ratio walk around the hue circle, so that
  the same id always gives the same colour and neighbouring ids get far-apart hues."""
  category_id = int(category_id)
  hue = (category_id * _GOLDEN_RATIO_CONJUGATE) % 1.0
  # Alternate the brightness a little too, so ids whose hues end up close still differ.
  value = 0.95 if category_id % 2 == 0 else 0.8
  r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
  return (round(r * 255), round(g * 255), round(b * 255))


def _load_image(image) -> np.ndarray:
  """The image as a new uint8 HxWx3 array; ``image`` is an array, a PIL image or a path."""
  if isinstance(image, (str, pathlib.Path)):
    with Image.open(image) as opened:
      image = ImageOps.exif_transpose(opened).convert('RGB')
  if isinstance(image, Image.Image):
    return np.array(image.convert('RGB'), dtype=np.uint8)
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[2] != 3:
    raise ValueError(f'image must be HxWx3, got shape {array.shape}')
  if array.dtype != np.uint8:
    raise ValueError(f'image must be uint8, got dtype {array.dtype}')
  return array.copy()


def _read_record(record: Mapping[str, Any], height: int, width: int) -> dict[str, Any]:
  """The record's fields as NumPy arrays, checked against each other and the image size."""
  for key in ('boxes', 'scores', 'category_ids'):
    if key not in record:
      raise ValueError(f'record has no {key}')
  boxes = np.asarray(record['boxes'], dtype=np.float64)
  if boxes.size == 0:
    boxes = boxes.reshape(0, 4)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f'boxes must be (N, 4), got shape {boxes.shape}')
  n = boxes.shape[0]
  scores = np.asarray(record['scores'], dtype=np.float64).reshape(-1)
  if scores.shape[0] != n:
    raise ValueError(f'scores has {scores.shape[0]} entries, expected N={n} (one per box)')
  category_ids = np.asarray(record['category_ids']).reshape(-1).astype(np.int64)
  if category_ids.shape[0] != n:
    raise ValueError(
        f'category_ids has {category_ids.shape[0]} entries, expected N={n} (one per box)')
  names = record.get('category_names')
  if names is not None and len(names) != n:
    raise ValueError(f'category_names has {len(names)} entries, expected N={n} (one per box)')
  masks = record.get('masks')
  if masks is not None:
    masks = np.asarray(masks).astype(bool)
    if masks.shape != (n, height, width):
      raise ValueError(f'masks must be (N, H, W) = {(n, height, width)}, got {masks.shape}')
  return dict(boxes=boxes, scores=scores, category_ids=category_ids, names=names, masks=masks)


def _mask_outline(mask: np.ndarray) -> np.ndarray:
  """The mask's pixels that have a 4-neighbour outside it (or lie on the image border)."""
  padded = np.pad(mask, 1, constant_values=False)
  interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
  return mask & ~interior


def _default_font(height: int, width: int):
  size = max(10, round(max(height, width) / 60))
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow < 10.1, or no FreeType: the fixed-size bitmap font.
    return ImageFont.load_default()


def _draw_label(draw: ImageDraw.ImageDraw, text: str, box: np.ndarray,
                color: tuple[int, int, int], font, height: int, width: int) -> None:
  """A filled label above the box's top-left corner, moved inside the image where needed."""
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  pad = 1
  label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
  x0, y0 = int(round(box[0])), int(round(box[1]))
  y = y0 - label_h
  if y < 0:  # No room above the box: put the label just inside its top edge.
    y = max(y0, 0)
  y = max(0, min(y, height - label_h))
  x = max(0, min(x0, width - label_w))
  draw.rectangle([x, y, x + label_w - 1, y + label_h - 1], fill=color)
  luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
  text_color = (0, 0, 0) if luminance > 140 else (255, 255, 255)
  draw.text((x + pad - left, y + pad - top), text, fill=text_color, font=font)


def draw_instances(image, record: Mapping[str, Any], *, score_threshold: float = 0.0,
                   alpha: float = 0.5, draw_boxes: bool = True, draw_labels: bool = True,
                   draw_masks: bool = True, line_width: int | None = None,
                   font=None) -> np.ndarray:
  """Draws a detection record's instances onto a copy of an image.

  Args:
    image: a uint8 HxWx3 array, a PIL image (converted to RGB) or a path to an image file.
    record: a dict with ``boxes`` (N, 4) xyxy in the image's pixels, ``scores`` (N,),
      ``category_ids`` (N,), and optionally ``category_names`` (N str, or None) and ``masks``
      (N, H, W) bool at the image's size. N may be 0.
    score_threshold: instances scoring below this are not drawn.
    alpha: mask opacity: inside a mask, ``out = (1 - alpha) * pixel + alpha * colour``.
    draw_boxes: whether to draw the box outlines.
    draw_labels: whether to draw a ``"name score"`` label above each box.
    draw_masks: whether to blend the masks (and their darker outlines) in.
    line_width: box outline width in pixels; by default it scales with the image size.
    font: a PIL font for the labels; by default PIL's default font, sized to the image.

  Returns:
    A new uint8 HxWx3 array; lower-scoring instances are drawn first, so the best ends on top.

  Raises:
    ValueError: naming the field at fault when the image or the record's shapes are wrong.
  """
  pixels = _load_image(image)
  height, width = pixels.shape[:2]
  fields = _read_record(record, height, width)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}')
  if line_width is None:
    line_width = max(1, round(max(height, width) / 300))
  keep = np.flatnonzero(fields['scores'] >= score_threshold)
  order = keep[np.argsort(fields['scores'][keep], kind='stable')]
  if order.size == 0:
    return pixels
  if draw_labels and font is None:
    font = _default_font(height, width)
  canvas = Image.fromarray(pixels)
  for i in order:
    category_id = int(fields['category_ids'][i])
    color = category_color(category_id)
    if draw_masks and fields['masks'] is not None:
      mask = fields['masks'][i]
      array = np.array(canvas)
      blended = (1.0 - alpha) * array[mask].astype(np.float64) + alpha * np.array(color, float)
      array[mask] = np.round(blended).astype(np.uint8)
      array[_mask_outline(mask)] = tuple(round(0.6 * c) for c in color)
      canvas = Image.fromarray(array)
    draw = ImageDraw.Draw(canvas)
    box = fields['boxes'][i]
    if draw_boxes:
      x0, x1 = sorted((int(round(box[0])), int(round(box[2]))))
      y0, y1 = sorted((int(round(box[1])), int(round(box[3]))))
      draw.rectangle([x0, y0, x1, y1], outline=color, width=line_width)
    if draw_labels:
      names = fields['names']
      name = names[i] if names is not None and names[i] is not None else str(category_id)
      _draw_label(draw, f'{name} {fields["scores"][i]:.2f}', box, color, font, height, width)
  return np.array(canvas, dtype=np.uint8)
