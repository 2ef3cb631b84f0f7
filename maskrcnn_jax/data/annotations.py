"""Reading and checking COCO-format annotation files; rasterising instance masks (no TensorFlow).

Used by the TFDS builder (`coco_builder.py`) while a dataset is prepared. Every error raised here is
a `DatasetError` whose message names the file and the image id or annotation id at fault.

Conventions of the output records (one per image, see `example_from_image`):
* boxes: COCO ``xywh`` in pixels of the original image, clipped to the image;
* masks: COCO compressed RLE ``counts`` (bytes) of a (height, width) mask, for polygons and crowd
  RLE alike, as produced by pycocotools (`mask.encode`); decode with
  ``pycocotools.mask.decode({'size': [h, w], 'counts': counts})``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageOps
from pycocotools import mask as mask_util

# COCO's own category ids are 1..90 (80 used); with num_classes = 91 they are class indices as is.
MAX_IDENTITY_CATEGORY_ID = 90
EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 = as stored, 2..8 = flipped and/or rotated


class DatasetError(ValueError):
  """A COCO-format dataset cannot be prepared; the message names the file and the id at fault."""


@dataclasses.dataclass
class SplitStats:
  """Counts gathered while one split is prepared (stored in the dataset metadata)."""
  num_images: int = 0
  num_objects: int = 0
  images_without_annotations: int = 0
  dropped_degenerate_boxes: int = 0   # zero or negative width/height (also after clipping)
  clipped_boxes: int = 0              # boxes reaching outside the image, clipped to it
  dropped_polygons: int = 0           # polygon parts with fewer than 3 points
  dropped_objects_without_mask: int = 0  # all polygon parts dropped, or no segmentation at all
  converted_images: int = 0           # grayscale, RGBA, CMYK, PNG... re-encoded as RGB JPEG
  exif_rotated: int = 0               # EXIF orientation applied (the annotation fits it)
  exif_kept_raw: int = 0              # EXIF orientation ignored: the annotation fits the raw pixels

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def load_json(path: str) -> dict[str, Any]:
  """Reads a COCO annotation file; checks the top-level keys it needs."""
  if not os.path.isfile(path):
    raise DatasetError(f'annotation file not found: {path}')
  try:
    with open(path, 'rb') as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DatasetError(f'{path}: not a valid JSON file ({e})') from e
  for key in ('images', 'annotations', 'categories'):
    if key not in data or not isinstance(data[key], list):
      raise DatasetError(f'{path}: missing the COCO list {key!r}')
  return data


def category_table(categories: list[dict[str, Any]], path: str) -> dict[str, Any]:
  """The category table recorded in the dataset metadata.

  Class indices are the COCO category ids themselves when every id is in 1..90 (so that the
  reference's num_classes = 91 works), otherwise the ids sorted ascending map to 1..K (id 0 would
  collide with the background class 0). Evaluation maps class indices back with
  ``class_index_to_category_id``.

  Returns a JSON-able dict: ``categories`` (list of {id, name, supercategory} sorted by id),
  ``mapping`` ('identity' or 'contiguous'), ``category_id_to_class_index`` and
  ``class_index_to_category_id`` (string keys, as JSON requires) and ``num_classes``, the
  smallest model num_classes that covers every class index (including background 0).
  """
  seen = {}
  for cat in categories:
    if 'id' not in cat or not isinstance(cat['id'], int):
      raise DatasetError(f'{path}: category without an integer id: {cat!r}')
    if cat['id'] in seen:
      raise DatasetError(f'{path}: duplicate category id {cat["id"]}')
    seen[cat['id']] = {'id': cat['id'], 'name': str(cat.get('name', cat['id'])),
                       'supercategory': str(cat.get('supercategory', ''))}
  if not seen:
    raise DatasetError(f'{path}: no categories')
  ids = sorted(seen)
  if all(1 <= i <= MAX_IDENTITY_CATEGORY_ID for i in ids):
    mapping, to_index = 'identity', {i: i for i in ids}
    num_classes = ids[-1] + 1  # COCO: 91 (largest id 90)
  else:
    mapping, to_index = 'contiguous', {i: k + 1 for k, i in enumerate(ids)}
    num_classes = len(ids) + 1
  return {
      'categories': [seen[i] for i in ids],
      'mapping': mapping,
      'category_id_to_class_index': {str(i): to_index[i] for i in ids},
      'class_index_to_category_id': {str(to_index[i]): i for i in ids},
      'num_classes': num_classes,
  }


def index_annotations(data: dict[str, Any], path: str, category_ids: set[int]
                      ) -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]]]:
  """Checks images and annotations; returns (images sorted by id, annotations per image id).

  Raises `DatasetError` for an image without id/file_name/height/width, a duplicate image id,
  an annotation (named by its id) referencing an unknown image or category, or an annotation id
  used twice (named with both image ids: evaluation matches detections to annotations by id).
  """
  images = {}
  for img in data['images']:
    for key in ('id', 'file_name', 'height', 'width'):
      if key not in img:
        raise DatasetError(f'{path}: image entry without {key!r}: {img!r}')
    if img['id'] in images:
      raise DatasetError(f'{path}: duplicate image id {img["id"]}')
    images[img['id']] = img
  per_image = {i: [] for i in images}
  image_of = {}  # annotation id -> image id
  for ann in data['annotations']:
    ann_id = ann.get('id')
    if ann.get('image_id') not in images:
      raise DatasetError(f'{path}: annotation id {ann_id} references unknown image id '
                         f'{ann.get("image_id")!r}')
    if ann_id is not None:
      if ann_id in image_of:
        raise DatasetError(f'{path}: duplicate annotation id {ann_id} (in image id '
                           f'{image_of[ann_id]} and image id {ann["image_id"]})')
      image_of[ann_id] = ann['image_id']
    if ann.get('category_id') not in category_ids:
      raise DatasetError(f'{path}: annotation id {ann_id} references unknown category id '
                         f'{ann.get("category_id")!r}')
    if 'bbox' not in ann or len(ann['bbox']) != 4:
      raise DatasetError(f'{path}: annotation id {ann_id} has no [x, y, w, h] bbox')
    per_image[ann['image_id']].append(ann)
  return [images[i] for i in sorted(images)], per_image


def read_image(image_dir: str, image: dict[str, Any], stats: SplitStats) -> bytes:
  """Reads and fully decodes one image file to check it; returns RGB JPEG bytes.

  The pixels are those the annotations refer to, with no EXIF orientation left to apply: an
  image whose EXIF orientation (2..8) turns it into the annotation file's height and width is
  turned (``ImageOps.exif_transpose``, as viewers and detectron2 do; counted in
  ``stats.exif_rotated``); one whose raw pixels only have that size keeps them
  (``stats.exif_kept_raw``); both are re-encoded without the tag (JPEG quality 95). RGB JPEG files
  without an orientation pass through byte for byte; any other mode (L, LA, RGBA, P, CMYK,
  I;16...) or format (PNG, BMP...) is converted to RGB and re-encoded as JPEG (quality 95;
  ``stats.converted_images``). Raises `DatasetError` naming the file and the image id when the
  file is missing, cannot be decoded, or its size (raw or turned) differs from the annotation
  file's height and width.
  """
  file_path = os.path.join(image_dir, image['file_name'])
  if not os.path.isfile(file_path):
    raise DatasetError(f'image file not found: {file_path} (image id {image["id"]})')
  with open(file_path, 'rb') as f:
    raw = f.read()
  try:
    pil = Image.open(io.BytesIO(raw))
    pil.load()  # a full decode: truncated or corrupt files fail here, not during training
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
    raise DatasetError(f'cannot decode image file {file_path} (image id {image["id"]}): {e}'
                       ) from e
  try:
    orientation = pil.getexif().get(EXIF_ORIENTATION, 1)
  except Exception:  # pylint: disable=broad-except  # unreadable EXIF: viewers ignore it too
    orientation = 1
  expected = (image['height'], image['width'])
  oriented = orientation in range(2, 9)
  converted = not (pil.format == 'JPEG' and pil.mode == 'RGB')
  if oriented:
    shown = ImageOps.exif_transpose(pil)
    if (shown.height, shown.width) == expected:
      pil = shown
      stats.exif_rotated += 1
    elif (pil.height, pil.width) == expected:
      stats.exif_kept_raw += 1
    else:
      raise DatasetError(
          f'image file {file_path} (image id {image["id"]}) is {pil.height}x{pil.width} '
          f'({shown.height}x{shown.width} with its EXIF orientation {orientation} applied) but '
          f'the annotation file says {image["height"]}x{image["width"]}')
  elif (pil.height, pil.width) != expected:
    raise DatasetError(
        f'image file {file_path} (image id {image["id"]}) is {pil.height}x{pil.width} but the '
        f'annotation file says {image["height"]}x{image["width"]}')
  if not (converted or oriented):
    return raw
  stats.converted_images += int(converted)
  if pil.mode in ('RGBA', 'LA') or (pil.mode == 'P' and 'transparency' in pil.info):
    # Composite on white rather than dropping alpha, which leaves undefined colours behind.
    rgba = pil.convert('RGBA')
    rgb = Image.new('RGB', rgba.size, (255, 255, 255))
    rgb.paste(rgba, mask=rgba.getchannel('A'))
  elif pil.mode.startswith('I'):  # 16/32-bit grayscale: scale into 8 bits
    arr = np.asarray(pil, np.float64)
    arr = arr * (255.0 / max(arr.max(), 1.0))
    rgb = Image.fromarray(arr.astype(np.uint8)).convert('RGB')
  else:
    rgb = pil.convert('RGB')
  buf = io.BytesIO()
  rgb.save(buf, format='JPEG', quality=95)  # no exif= argument: the orientation tag is gone
  return buf.getvalue()


def _mask_rle(ann: dict[str, Any], height: int, width: int, path: str, stats: SplitStats
              ) -> dict[str, Any] | None:
  """The annotation's mask as one compressed RLE, or None (dropped, with a warning)."""
  ann_id = ann.get('id')
  seg = ann.get('segmentation')
  if isinstance(seg, dict):  # RLE, compressed (string counts) or not (list counts, crowd)
    if list(seg.get('size', [])) != [height, width]:
      raise DatasetError(f'{path}: annotation id {ann_id}: RLE size {seg.get("size")} differs '
                         f'from the image size {[height, width]}')
    if isinstance(seg.get('counts'), list):
      return mask_util.frPyObjects(seg, height, width)
    counts = seg['counts']
    return {'size': [height, width],
            'counts': counts.encode('ascii') if isinstance(counts, str) else counts}
  if isinstance(seg, list):
    polygons = []
    for poly in seg:
      # pycocotools reads a 4-number list as a box, not a polygon: drop every part < 3 points.
      if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
        stats.dropped_polygons += 1
        logging.warning('%s: annotation id %s: dropped a polygon with fewer than 3 points',
                        path, ann_id)
        continue
      polygons.append([float(v) for v in poly])
    if polygons:
      return mask_util.merge(mask_util.frPyObjects(polygons, height, width))
  stats.dropped_objects_without_mask += 1
  logging.warning('%s: annotation id %s: dropped, it has no usable segmentation', path, ann_id)
  return None


def example_objects(anns: list[dict[str, Any]], height: int, width: int,
                    category_to_class: dict[int, int], path: str, stats: SplitStats
                    ) -> dict[str, np.ndarray]:
  """Checks, clips and rasterises one image's annotations.

  Returns numpy arrays over the K kept objects: ``id`` (K,) int64, ``bbox_xywh`` (K, 4) float32
  clipped to the image, ``category_id`` (K,) int64, ``label`` (K,) int64 class index,
  ``is_crowd`` (K,) bool, ``area`` (K,) float32 (COCO's, or the mask's pixel count when absent),
  ``mask`` list of K compressed-RLE ``bytes``. Objects are kept in annotation-id order.
  """
  out = {k: [] for k in ('id', 'bbox_xywh', 'category_id', 'label', 'is_crowd', 'area', 'mask')}
  for ann in sorted(anns, key=lambda a: a.get('id', 0)):
    x, y, w, h = (float(v) for v in ann['bbox'])
    if not (w > 0 and h > 0):
      stats.dropped_degenerate_boxes += 1
      continue
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x2 <= x1 or y2 <= y1:  # entirely outside the image
      stats.dropped_degenerate_boxes += 1
      continue
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
      stats.clipped_boxes += 1
    rle = _mask_rle(ann, height, width, path, stats)
    if rle is None:
      continue
    area = ann.get('area')
    out['id'].append(int(ann.get('id', -1)))
    out['bbox_xywh'].append([x1, y1, x2 - x1, y2 - y1])
    out['category_id'].append(int(ann['category_id']))
    out['label'].append(category_to_class[int(ann['category_id'])])
    out['is_crowd'].append(bool(ann.get('iscrowd', 0)))
    out['area'].append(float(area) if area is not None else float(mask_util.area(rle)))
    out['mask'].append(bytes(rle['counts']))
  stats.num_objects += len(out['id'])
  return {
      'id': np.asarray(out['id'], np.int64),
      'bbox_xywh': np.asarray(out['bbox_xywh'], np.float32).reshape(-1, 4),
      'category_id': np.asarray(out['category_id'], np.int64),
      'label': np.asarray(out['label'], np.int64),
      'is_crowd': np.asarray(out['is_crowd'], bool),
      'area': np.asarray(out['area'], np.float32),
      'mask': out['mask'],
  }
