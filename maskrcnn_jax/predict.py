"""Command line: run a trained model on a folder of images, draw the instances, write COCO results.

  python -m maskrcnn_jax.predict --workdir=W [--step=N] --images=DIR_OR_GLOB --out=OUT \
    [--score_threshold=0.5] [--batch_size=4]
  python -m maskrcnn_jax.predict --torchvision=maskrcnn_r50_coco.npz \
    --config=configs/torchvision_r50.py [--config.data.image_size='(800,1344)'] \
    --images=... --out=...

For each image, ``OUT/<name>.png`` has the image at its own size with the instances drawn
(`maskrcnn_jax.visualize.draw_instances`). ``OUT/predictions.json`` is a COCO results list with
``file_name`` on every entry, ``image_id`` when the file name is a COCO id (``000000343934.jpg``),
``category_id``, ``bbox`` [x, y, w, h] original pixels, ``score`` and ``segmentation`` (compressed
RLE), so pycocotools scores it against an annotation file directly (`maskrcnn_jax.inference`
gives the evaluation path's detections). The last line says how many images and instances, the
speed and where the outputs are.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time

from absl import app
from absl import flags

from maskrcnn_jax import huge_pages
from maskrcnn_jax import files
from maskrcnn_jax import model_flags

FLAGS = flags.FLAGS
model_flags.define_flags()
flags.DEFINE_string('images', None, 'A directory of images or a glob pattern.')
flags.DEFINE_string('out', None, 'Output directory (created).')
flags.DEFINE_float('score_threshold', 0.5, 'Keep detections scoring at least this.')
flags.DEFINE_integer('batch_size', 1, 'Images per compiled inference call.')
flags.mark_flags_as_required(['images', 'out'])

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


def image_paths(pattern: str) -> list[str]:
  """The image files of a directory (sorted, by extension) or of a glob pattern (sorted)."""
  if os.path.isdir(pattern):
    paths = [os.path.join(pattern, n) for n in sorted(os.listdir(pattern))
             if n.lower().endswith(IMAGE_EXTENSIONS)]
  else:
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f'--images={pattern}: no image files')
  return paths


def coco_image_id(file_name: str) -> int | None:
  """The COCO id of a file named like ``000000343934.jpg`` (digits only), else None."""
  stem = os.path.splitext(os.path.basename(file_name))[0]
  return int(stem) if re.fullmatch(r'\d+', stem) else None


def results_of(record, file_name: str) -> list[dict]:
  """COCO results entries of one Predictor record."""
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  image_id = coco_image_id(file_name)
  entries = []
  masks = record.get('masks')
  rles = (mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
          if masks is not None and len(masks) else [])
  for k in range(len(record['scores'])):
    x0, y0, x1, y1 = (float(v) for v in record['boxes'][k])
    entry = {'file_name': file_name}
    if image_id is not None:
      entry['image_id'] = image_id
    entry.update({'category_id': int(record['category_ids'][k]),
                  'bbox': [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                  'score': round(float(record['scores'][k]), 5)})
    if rles:
      entry['segmentation'] = {'size': [int(s) for s in rles[k]['size']],
                               'counts': rles[k]['counts'].decode('ascii')}
    entries.append(entry)
  return entries


def main(argv) -> int:
  del argv
  model_flags.check_flags(FLAGS)
  paths = image_paths(FLAGS.images)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax import inference  # pylint: disable=import-outside-toplevel  # loads JAX
  from maskrcnn_jax import visualize  # pylint: disable=import-outside-toplevel

  predictor = model_flags.load_predictor(FLAGS, FLAGS.batch_size)
  os.makedirs(FLAGS.out, exist_ok=True)
  results, instances = [], 0
  start = time.time()
  names = set()
  with tqdm(total=len(paths), unit='img', file=sys.stderr) as bar:
    for first in range(0, len(paths), predictor.batch_size):
      chunk = paths[first:first + predictor.batch_size]
      images = [inference.load_image(p) for p in chunk]
      records = predictor.predict(images, score_threshold=FLAGS.score_threshold)
      for path, image, record in zip(chunk, images, records):
        file_name = os.path.basename(path)
        stem = os.path.splitext(file_name)[0]
        name = stem if stem not in names else f'{stem}_{len(names)}'
        names.add(name)
        drawn = visualize.draw_instances(image, record, score_threshold=FLAGS.score_threshold)
        Image.fromarray(drawn).save(os.path.join(FLAGS.out, f'{name}.png'))
        results.extend(results_of(record, file_name))
        instances += len(record['scores'])
      bar.update(len(chunk))
  seconds = time.time() - start
  output = os.path.join(FLAGS.out, 'predictions.json')
  with files.atomic_open(output) as f:
    json.dump(results, f)
  print(f'{len(paths)} images, {instances} instances (score >= {FLAGS.score_threshold}), '
        f'{len(paths) / max(seconds, 1e-9):.2f} img/s (compilation included); pictures and '
        f'{output} in {os.path.abspath(FLAGS.out)}')
  return 0


if __name__ == '__main__':
  huge_pages.restart_with_huge_pages()
  app.run(main)
