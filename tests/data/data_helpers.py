"""Helpers for the data tests: config loading and tiny COCO-format directories."""

import json
import pathlib
import shutil
import sys

SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / 'coco_sample'
SAMPLE_JSON = SAMPLE_DIR / 'annotations' / 'instances_val2017.json'
REPO = pathlib.Path(__file__).resolve().parents[2]


def load_config(**data_overrides):
  """configs/coco_r50.py with config.data overrides."""
  sys.path.insert(0, str(REPO / 'configs'))
  try:
    import coco_r50  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = coco_r50.get_config()
  for key, value in data_overrides.items():
    config.data[key] = value
  return config


def write_coco_dir(root: pathlib.Path, images, annotations, categories=None,
                   split: str = 'val') -> pathlib.Path:
  """A COCO layout under root: images = [(image_id, file_name, source path or None, h, w)].

  A source path is copied to <split>2017/<file_name>; None leaves the file missing.
  """
  image_dir = root / f'{split}2017'
  image_dir.mkdir(parents=True, exist_ok=True)
  (root / 'annotations').mkdir(exist_ok=True)
  entries = []
  for image_id, file_name, source, height, width in images:
    if source is not None:
      shutil.copy(source, image_dir / file_name)
    entries.append({'id': image_id, 'file_name': file_name, 'height': height, 'width': width})
  if categories is None:
    categories = [{'id': 1, 'name': 'person', 'supercategory': 'person'},
                  {'id': 18, 'name': 'dog', 'supercategory': 'animal'}]
  with open(root / 'annotations' / f'instances_{split}2017.json', 'w') as f:
    json.dump({'images': entries, 'annotations': annotations, 'categories': categories}, f)
  return root


def box_annotation(ann_id, image_id, bbox, category_id=1, segmentation=None, iscrowd=0):
  """A polygon annotation whose polygon is its box (unless segmentation is given)."""
  x, y, w, h = bbox
  if segmentation is None:
    segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
  return {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'bbox': bbox,
          'area': float(max(w, 0) * max(h, 0)), 'iscrowd': iscrowd,
          'segmentation': segmentation}


def build(manual_dir, data_dir, **kwargs):
  from maskrcnn_jax.data import prepare  # pylint: disable=import-outside-toplevel
  return prepare.prepare(str(data_dir), manual_dir=str(manual_dir), show_progress=False,
                         **kwargs)

