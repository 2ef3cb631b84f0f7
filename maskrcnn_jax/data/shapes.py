"""The shapes demo dataset: synthetic squares, circles and triangles in COCO format (no TensorFlow).

Writes ``OUTPUT/annotations/instances_{train,val}2017.json`` and ``OUTPUT/{train,val}2017/*.jpg``
(the COCO download layout, so `coco_instances` builds it with manual_dir=OUTPUT). Each image has a
plain background and 1-4 solid shapes (category ids 1 square, 2 circle, 3 triangle). Shapes are
drawn in order and later ones occlude earlier ones: an earlier mask loses the occluded pixels, and
a candidate shape that would hide more than 40 % of an earlier one (or leave it under 50 pixels)
is redrawn elsewhere, so no object is heavily occluded. Masks are stored as compressed RLE; areas
are mask pixel counts and boxes the masks' tight boxes. Deterministic for a given seed:

  python -m maskrcnn_jax.data.shapes --output /tmp/shapes --num_train 2000 --num_val 200 \
    --image_size 128
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

CATEGORIES = [
    {'id': 1, 'name': 'square', 'supercategory': 'shape'},
    {'id': 2, 'name': 'circle', 'supercategory': 'shape'},
    {'id': 3, 'name': 'triangle', 'supercategory': 'shape'},
]
MAX_OCCLUDED_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 50


def _shape_mask(category: int, cx: float, cy: float, r: float, size: int) -> np.ndarray:
  """(size, size) bool mask of one shape with centre (cx, cy) and half-size r."""
  if category == 2:
    yy, xx = np.mgrid[:size, :size] + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
  canvas = Image.new('L', (size, size), 0)
  draw = ImageDraw.Draw(canvas)
  if category == 1:
    draw.rectangle([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=1)
  else:  # an upright triangle inscribed in the circle of radius r
    draw.polygon([(cx, cy - r), (cx - 0.866 * r, cy + 0.5 * r), (cx + 0.866 * r, cy + 0.5 * r)],
                 fill=1)
  return np.asarray(canvas, bool)


def make_image(rng: np.random.Generator, size: int):
  """One image: (RGB uint8 (size, size, 3), list of (category id, visible bool mask))."""
  background = rng.integers(0, 256, size=3)
  image = np.broadcast_to(background.astype(np.uint8), (size, size, 3)).copy()
  objects = []  # [category, mask, full_area]
  target = int(rng.integers(1, 5))
  attempts = 0
  while len(objects) < target and attempts < 50:
    attempts += 1
    category = int(rng.integers(1, 4))
    r = rng.uniform(size * 0.08, size * 0.22)
    cx, cy = rng.uniform(r, size - r, size=2)
    new = _shape_mask(category, cx, cy, r, size)
    if new.sum() < MIN_VISIBLE_PIXELS:
      continue
    # Reject heavy overlaps: every earlier object keeps >= 60 % of its pixels and 50 pixels.
    if any(((m & ~new).sum() < (1 - MAX_OCCLUDED_FRACTION) * full
            or (m & ~new).sum() < MIN_VISIBLE_PIXELS) for _, m, full in objects):
      continue
    for obj in objects:
      obj[1] = obj[1] & ~new  # occlusion: the earlier mask loses what the new shape covers
    # A colour far enough from the background to be visible.
    while True:
      colour = rng.integers(0, 256, size=3)
      if np.abs(colour - background).sum() > 150:
        break
    image[new] = colour
    objects.append([category, new, int(new.sum())])
  return image, [(c, m) for c, m, _ in objects]


def write_split(output: str, split: str, num_images: int, size: int, seed: int,
                first_annotation_id: int = 1) -> dict:
  """Writes one split's images and returns its COCO dict (also written to annotations/)."""
  image_dir = os.path.join(output, f'{split}2017')
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.join(output, 'annotations'), exist_ok=True)
  rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
  images, annotations = [], []
  ann_id = first_annotation_id
  for i in range(num_images):
    image_id = i + 1
    pixels, objects = make_image(rng, size)
    file_name = f'{image_id:012d}.jpg'
    Image.fromarray(pixels).save(os.path.join(image_dir, file_name), quality=95)
    images.append({'id': image_id, 'file_name': file_name, 'height': size, 'width': size})
    for category, mask in objects:
      rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
      x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
      annotations.append({
          'id': ann_id, 'image_id': image_id, 'category_id': category, 'iscrowd': 0,
          'area': float(mask_util.area(rle)), 'bbox': [x, y, w, h],
          'segmentation': {'size': [size, size], 'counts': rle['counts'].decode('ascii')},
      })
      ann_id += 1
  coco = {'info': {'description': f'shapes demo dataset ({split}), seed {seed}'},
          'licenses': [], 'images': images, 'annotations': annotations,
          'categories': CATEGORIES}
  with open(os.path.join(output, 'annotations', f'instances_{split}2017.json'), 'w') as f:
    json.dump(coco, f)
  return coco


def write_dataset(output: str, num_train: int, num_val: int, image_size: int = 128,
                  seed: int = 0) -> None:
  """Writes the train and val splits in the COCO download layout under `output`."""
  write_split(output, 'train', num_train, image_size, seed)
  write_split(output, 'val', num_val, image_size, seed)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--output', required=True, help='directory to write (COCO layout)')
  parser.add_argument('--num_train', type=int, default=2000)
  parser.add_argument('--num_val', type=int, default=200)
  parser.add_argument('--image_size', type=int, default=128, help='square image side, pixels')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  write_dataset(args.output, args.num_train, args.num_val, args.image_size, args.seed)
  print(f'wrote {args.num_train} train and {args.num_val} val images to {args.output}')


if __name__ == '__main__':
  main()
