"""TFDS builder `coco_instances`: COCO-format instance segmentation with masks.

TFDS's own `coco/2017` carries boxes only, so this builder reads a directory in the COCO download
layout through TFDS's ``manual_dir``::

    <manual_dir>/annotations/instances_train2017.json   -> split 'train'
    <manual_dir>/annotations/instances_val2017.json     -> split 'validation'
    <manual_dir>/train2017/*.jpg, <manual_dir>/val2017/*.jpg

(a split whose annotation file is absent is skipped), or any COCO-format pair of annotation file
and image folder given to `CocoInstancesConfig` (see `config_from_paths` and
``python -m maskrcnn_jax.data.prepare``).

Features of one example (one image):
  image       encoded RGB JPEG without EXIF orientation (non-RGB or non-JPEG files are converted
              and EXIF orientations applied when prepared, `annotations.read_image`)
  image_id    int64, file_name text, height / width int32 (original size)
  objects     sequence of: id int64 (annotation id), bbox (TFDS normalized yxyx float32, clipped),
              category_id int64 (COCO id), label int64 (class index, see the metadata),
              is_crowd bool, area float32 (COCO's), mask text (COCO compressed RLE counts of the
              (height, width) mask; polygons are rasterised with pycocotools when prepared).

Records are written in ascending image-id order (``disable_shuffling``: the input pipeline shuffles
by index itself), so record ``i`` of a split is ``metadata['splits'][split]['image_ids'][i]``.
The metadata (``metadata.json`` in the dataset directory) also holds the category table and
mapping (`annotations.category_table`), per-split counts of what was dropped, clipped, converted
or turned by its EXIF orientation, and the fingerprint of the inputs (``inputs``, see
`fingerprint`).

TFDS writes into a temporary directory and renames it only when every split is complete, so a
failed build is never seen as a prepared dataset.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from maskrcnn_jax.data import annotations as ann_lib
from maskrcnn_jax.data import fingerprint

COCO_SPLITS = {  # split -> (annotation file, image folder) relative to manual_dir
    'train': ('annotations/instances_train2017.json', 'train2017'),
    'validation': ('annotations/instances_val2017.json', 'val2017'),
}


class CocoInstancesConfig(tfds.core.BuilderConfig):
  """A COCO-format dataset: the COCO 2017 layout in manual_dir, or explicit paths.

  With no paths the splits come from ``manual_dir`` in the COCO 2017 layout. With paths (absolute,
  or relative to ``manual_dir``), a split is built for each (annotations, images) pair given.
  """

  def __init__(self, *, train_annotations: str | None = None, train_images: str | None = None,
               val_annotations: str | None = None, val_images: str | None = None,
               **kwargs):
    super().__init__(**kwargs)
    self.paths = {}
    for split, ann, img in (('train', train_annotations, train_images),
                            ('validation', val_annotations, val_images)):
      if (ann is None) != (img is None):
        raise ValueError(f'{split}: give both the annotation file and the image folder')
      if ann is not None:
        self.paths[split] = (ann, img)


def config_from_paths(name: str, version: str = '1.0.0', **paths) -> CocoInstancesConfig:
  """A builder config for any COCO-format dataset.

  paths: train_annotations, train_images, val_annotations, val_images (pairs; either pair may be
  omitted). The prepared dataset lands in ``<data_dir>/coco_instances/<name>/<version>``.
  """
  return CocoInstancesConfig(name=name, version=version,
                             description=f'COCO-format dataset {name}', **paths)


class CocoInstances(tfds.core.GeneratorBasedBuilder):
  """COCO instance segmentation (boxes, classes, crowd flags and masks) from COCO-format files."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [CocoInstancesConfig(
      name='coco2017', version='1.0.0',
      description='COCO 2017 in its download layout under manual_dir.')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download COCO 2017 (https://cocodataset.org/#download): train2017.zip, val2017.zip and
  annotations_trainval2017.zip, unzip them into one folder (manual_dir) so that it holds
  annotations/instances_{train,val}2017.json and {train,val}2017/*.jpg.
  """

  def __init__(self, *, show_progress: bool = True, **kwargs):
    """show_progress: a tqdm bar per split while preparing; kwargs: tfds builder arguments."""
    self._show_progress = show_progress
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'image_id': np.int64,
            'file_name': tfds.features.Text(),
            'height': np.int32,
            'width': np.int32,
            'objects': tfds.features.Sequence({
                'id': np.int64,
                'bbox': tfds.features.BBoxFeature(),
                'category_id': np.int64,
                'label': np.int64,
                'is_crowd': np.bool_,
                'area': np.float32,
                'mask': tfds.features.Text(),
            }),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
        homepage='https://cocodataset.org',
    )

  def split_paths(self, manual_dir) -> dict[str, tuple[str, str]]:
    """{split: (annotation file, image folder)} this builder reads from manual_dir."""
    manual_dir = os.fspath(manual_dir) if manual_dir else ''
    if self.builder_config.paths:
      return {split: tuple(os.path.join(manual_dir, p) for p in pair)
              for split, pair in self.builder_config.paths.items()}
    found = {split: (os.path.join(manual_dir, ann), os.path.join(manual_dir, img))
             for split, (ann, img) in COCO_SPLITS.items()
             if os.path.isfile(os.path.join(manual_dir, ann))}
    if not found:
      raise ann_lib.DatasetError(
          f'no COCO annotation file under manual_dir {manual_dir!r}: expected '
          + ' or '.join(os.path.join(manual_dir, a) for a, _ in COCO_SPLITS.values()))
    return found

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    paths = self.split_paths(dl_manager.manual_dir)
    loaded = {split: ann_lib.load_json(ann) for split, (ann, _) in paths.items()}
    self.info.metadata['inputs'] = fingerprint.inputs(
        {split: fingerprint.split_inputs(ann, img, loaded[split]['images'])
         for split, (ann, img) in paths.items()})
    # One category table for the dataset: every split must declare the same category ids.
    first = next(iter(paths))
    table = ann_lib.category_table(loaded[first]['categories'], paths[first][0])
    for split, data in loaded.items():
      ids = sorted(c.get('id') for c in data['categories'])
      if ids != [c['id'] for c in table['categories']]:
        raise ann_lib.DatasetError(f'{paths[split][0]} declares other category ids than '
                                   f'{paths[first][0]}')
    self.info.metadata.update(table)
    self.info.metadata['splits'] = {}
    return {split: self._generate_examples(split, paths[split][0], paths[split][1],
                                           loaded[split], table)
            for split in paths}

  def _generate_examples(self, split: str, ann_path: str, image_dir: str,
                         data: dict[str, Any], table: dict[str, Any]):
    """Yields (index, example) in ascending image-id order (the index is the record number)."""
    to_class = {int(k): v for k, v in table['category_id_to_class_index'].items()}
    images, per_image = ann_lib.index_annotations(data, ann_path, set(to_class))
    stats = ann_lib.SplitStats()
    image_ids, num_objects, num_crowd = [], [], []
    progress = tqdm.tqdm(images, desc=f'{split} ({os.path.basename(ann_path)})', unit='img',
                         disable=not self._show_progress)
    for index, image in enumerate(progress):
      height, width = int(image['height']), int(image['width'])
      encoded = ann_lib.read_image(image_dir, image, stats)
      objects = ann_lib.example_objects(per_image[image['id']], height, width, to_class,
                                        ann_path, stats)
      stats.num_images += 1
      stats.images_without_annotations += int(len(objects['id']) == 0)
      image_ids.append(int(image['id']))
      num_objects.append(int(len(objects['id'])))
      num_crowd.append(int(objects['is_crowd'].sum()))
      x, y, w, h = objects['bbox_xywh'].T
      scale = np.array([height, width, height, width], np.float32)
      # TFDS BBoxFeature: normalized (ymin, xmin, ymax, xmax) in [0, 1].
      bbox = np.stack([y, x, y + h, x + w], axis=-1).reshape(-1, 4) / scale
      yield index, {
          'image': encoded,
          'image_id': int(image['id']),
          'file_name': str(image['file_name']),
          'height': height,
          'width': width,
          'objects': {
              'id': objects['id'],
              'bbox': np.clip(bbox, 0.0, 1.0).astype(np.float32),
              'category_id': objects['category_id'],
              'label': objects['label'],
              'is_crowd': objects['is_crowd'],
              'area': objects['area'],
              'mask': [m.decode('ascii') for m in objects['mask']],
          },
      }
    if not image_ids:
      raise ann_lib.DatasetError(f'{ann_path}: no images')
    self.info.metadata['splits'][split] = {
        'image_ids': image_ids, 'num_objects': num_objects, 'num_crowd_objects': num_crowd,
        'stats': stats.as_dict()}
    logging.info('%s: %s', split, stats.as_dict())
