"""`prepare` over existing builds, EXIF orientations, objects over max_instances, duplicate ids."""

import collections
import io
import json
import logging
import os
import re

import numpy as np
import pytest
from PIL import Image
from PIL import ImageOps

from data_helpers import SAMPLE_DIR, box_annotation, build, load_config, write_coco_dir
from maskrcnn_jax.data import annotations
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data import prepare
from maskrcnn_jax.data import preprocess
from maskrcnn_jax.settings import InputSettings

IMG_A = SAMPLE_DIR / 'val2017' / '000000343934.jpg'   # 480 x 640
IMG_B = SAMPLE_DIR / 'val2017' / '000000194216.jpg'   # 294 x 640


def _source(data_dir, name='coco_instances'):
  return pipeline.Source(name, 'validation', str(data_dir))


def _rebuild_dirs(data_dir):
  root = data_dir / 'coco_instances' / 'coco2017'
  return sorted(p.name for p in root.iterdir() if p.name != '1.0.0')


# ------------------------------------------------------------------ prepare over an existing build
def test_same_inputs_reuse_the_build(tmp_path, capsys):
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640)],
                          [box_annotation(1, 1, [10, 10, 50, 50])])
  dataset_dir = build(manual, tmp_path / 'tfds')
  info = os.path.join(dataset_dir, 'dataset_info.json')
  before = os.stat(info).st_mtime_ns
  inputs = json.load(open(os.path.join(dataset_dir, 'metadata.json')))['inputs']
  assert inputs['splits']['validation']['num_image_files'] == 1
  assert build(manual, tmp_path / 'tfds') == dataset_dir
  args = ['--manual_dir', str(manual), '--data_dir', str(tmp_path / 'tfds'), '--no_progress']
  assert prepare.main(args) == 0
  assert 'num_objects 1' in capsys.readouterr().out
  assert os.stat(info).st_mtime_ns == before  # reused, not rebuilt


def test_other_inputs_stop_and_overwrite_rebuilds_atomically(tmp_path, capsys, monkeypatch):
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640)],
                          [box_annotation(1, 1, [10, 10, 50, 50])])
  data_dir = tmp_path / 'tfds'
  dataset_dir = build(manual, data_dir)
  write_coco_dir(manual, [(1, 'a.jpg', IMG_A, 480, 640)],
                 [box_annotation(1, 1, [10, 10, 50, 50]), box_annotation(2, 1, [90, 90, 20, 20])])
  with pytest.raises(prepare.InputsChangedError,
                     match=r'1\.0\.0 was prepared from other inputs: validation: annotation file '
                     r'.*instances_val2017\.json differs .*--overwrite'):
    build(manual, data_dir)
  args = ['--manual_dir', str(manual), '--data_dir', str(data_dir), '--no_progress']
  capsys.readouterr()
  assert prepare.main(args) == 1
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and dataset_dir in err and '--overwrite' in err
  assert len(_source(data_dir)[0]['objects']['id']) == 1  # the old build is untouched

  # The rebuild: the old build stays readable while the new one is written.
  seen_during_build = []
  read_image = annotations.read_image

  def reading_the_old_build(*args, **kwargs):
    seen_during_build.append(len(_source(data_dir)[0]['objects']['id']))
    return read_image(*args, **kwargs)

  monkeypatch.setattr(annotations, 'read_image', reading_the_old_build)
  assert prepare.main(args + ['--overwrite']) == 0
  assert seen_during_build == [1]
  assert list(_source(data_dir)[0]['objects']['id']) == [1, 2]
  assert _rebuild_dirs(data_dir) == []
  monkeypatch.undo()
  assert build(manual, data_dir) == dataset_dir  # the new inputs are now the recorded ones


def test_changed_image_files_and_missing_record_are_named(tmp_path, capsys):
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640)], [])
  dataset_dir = build(manual, tmp_path / 'tfds')
  Image.open(IMG_A).save(manual / 'val2017' / 'a.jpg', quality=50)  # same size in pixels
  with pytest.raises(prepare.InputsChangedError,
                     match=r'validation: image files in .*val2017 differ in names, sizes or '
                     r'modification times \(1 files of \d+ bytes -> 1 files of \d+ bytes\)'):
    build(manual, tmp_path / 'tfds')
  # A build made before inputs were recorded cannot be matched: reused, with a warning.
  path = os.path.join(dataset_dir, 'metadata.json')
  with open(path) as f:
    metadata = json.load(f)
  del metadata['inputs']
  with open(path, 'w') as f:
    json.dump(metadata, f)
  capsys.readouterr()
  assert build(manual, tmp_path / 'tfds') == dataset_dir
  assert re.search('warning: .* no record of the inputs it was prepared from .* reused '
                   'unchecked.*--overwrite', capsys.readouterr().err)


def test_failed_or_interrupted_rebuild_leaves_the_old_build(tmp_path, monkeypatch):
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640)],
                          [box_annotation(1, 1, [10, 10, 50, 50])])
  data_dir = tmp_path / 'tfds'
  dataset_dir = build(manual, data_dir)

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(annotations, 'read_image', interrupted)
    with pytest.raises(KeyboardInterrupt):
      build(manual, data_dir, overwrite=True)
  assert _rebuild_dirs(data_dir) == [] and list(_source(data_dir).image_ids) == [1]
  write_coco_dir(manual, [(1, 'a.jpg', IMG_A, 480, 640), (2, 'gone.jpg', None, 480, 640)],
                 [box_annotation(1, 1, [10, 10, 50, 50])])
  with pytest.raises(annotations.DatasetError, match=r'gone\.jpg \(image id 2\)'):
    build(manual, data_dir, overwrite=True)
  assert _rebuild_dirs(data_dir) == []
  source = _source(data_dir)
  assert source.data_dir == dataset_dir and list(source.image_ids) == [1]


# ------------------------------------------------------------------------------ EXIF orientation
def _displayed(height, width, box):
  """(height, width, 3) uint8: dark background, a bright rectangle at box = (x, y, w, h)."""
  pixels = np.full((height, width, 3), 40, np.uint8)
  x, y, w, h = box
  pixels[y:y + h, x:x + w] = 230
  return pixels


def _save_oriented(path, displayed):
  """Writes the raw pixels that EXIF orientation 6 (turn 90 degrees clockwise) displays as
  `displayed`; returns the raw (height, width)."""
  raw = Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90)
  exif = Image.Exif()
  exif[annotations.EXIF_ORIENTATION] = 6
  raw.save(path, quality=95, exif=exif)
  shown = np.asarray(ImageOps.exif_transpose(Image.open(path)), np.float32)
  assert np.abs(shown - displayed).mean() < 3  # the fixture displays as intended
  return raw.height, raw.width


def _check_on_object(record, box):
  """The record's decoded image, mask and box all sit on the bright object at box (xywh)."""
  h, w = int(record['height']), int(record['width'])
  pixels = np.asarray(preprocess.decode_rgb(record['image']), np.float32).mean(-1)
  assert pixels.shape == (h, w)
  assert Image.open(io.BytesIO(record['image'])).getexif().get(
      annotations.EXIF_ORIENTATION) is None
  mask = preprocess.decode_mask(record['objects']['mask'][0], h, w).astype(bool)
  bright = pixels > 135
  assert (mask & bright).sum() / (mask | bright).sum() > 0.9
  x, y, bw, bh = box
  np.testing.assert_allclose(np.asarray(record['objects']['bbox'][0]) * [h, w, h, w],
                             [y, x, y + bh, x + bw], atol=1e-3)


def test_exif_orientation_applied_or_raw_pixels_kept(tmp_path, capsys):
  manual = write_coco_dir(tmp_path / 'coco', [], [])
  images = manual / 'val2017'
  square_box, tall_box, raw_box = (8, 4, 20, 12), (6, 50, 30, 20), (50, 6, 20, 30)
  assert _save_oriented(images / 'square.jpg', _displayed(64, 64, square_box)) == (64, 64)
  assert _save_oriented(images / 'tall.jpg', _displayed(80, 48, tall_box)) == (48, 80)
  # Annotated on the raw pixels (48 x 80), as tools that ignore EXIF do.
  raw = Image.fromarray(_displayed(48, 80, raw_box))
  exif = Image.Exif()
  exif[annotations.EXIF_ORIENTATION] = 6
  raw.save(images / 'raw.jpg', quality=95, exif=exif)
  write_coco_dir(manual, [(1, 'square.jpg', None, 64, 64), (2, 'tall.jpg', None, 80, 48),
                          (3, 'raw.jpg', None, 48, 80)],
                 [box_annotation(1, 1, list(square_box)), box_annotation(2, 2, list(tall_box)),
                  box_annotation(3, 3, list(raw_box))])
  args = ['--manual_dir', str(manual), '--data_dir', str(tmp_path / 'tfds'), '--no_progress']
  assert prepare.main(args) == 0
  assert 'exif: 2 rotated, 1 kept raw (annotation size matches the raw pixels)' in \
      capsys.readouterr().out
  source = _source(tmp_path / 'tfds')
  stats = source.metadata['splits']['validation']['stats']
  assert (stats['exif_rotated'], stats['exif_kept_raw'], stats['converted_images']) == (2, 1, 0)
  for index, box in enumerate((square_box, tall_box, raw_box)):
    _check_on_object(source[index], box)
  assert [(int(r['height']), int(r['width'])) for r in (source[0], source[1], source[2])] == [
      (64, 64), (80, 48), (48, 80)]


def test_exif_size_mismatch_names_the_orientation(tmp_path):
  manual = write_coco_dir(tmp_path / 'coco', [(4, 'tall.jpg', None, 50, 50)], [])
  _save_oriented(manual / 'val2017' / 'tall.jpg', _displayed(80, 48, (6, 50, 30, 20)))
  with pytest.raises(annotations.DatasetError,
                     match=r'tall\.jpg \(image id 4\) is 48x80 \(80x48 with its EXIF orientation 6 '
                     r'applied\) but the annotation file says 50x50'):
    build(manual, tmp_path / 'tfds')


# ----------------------------------------------------------------------- objects over the cap
def _direct_over_cap(sample_json, cap, skip_crowd):
  per_image = collections.Counter(a['image_id'] for a in sample_json['annotations']
                                  if not (skip_crowd and a['iscrowd']))
  over = [n - cap for n in per_image.values() if n > cap]
  return len(over), sum(over)


def test_objects_over_cap_match_the_json(sample_source, sample_json):
  split = sample_source.metadata['splits']['validation']
  # Nothing was dropped while preparing, so the JSON's counts are the records' counts.
  assert split['stats']['num_objects'] == len(sample_json['annotations'])
  for cap in (1, 2, 8, 13, 16, 100):
    for skip_crowd in (True, False):
      assert pipeline.objects_over_cap(split, cap, skip_crowd) == \
          _direct_over_cap(sample_json, cap, skip_crowd), (cap, skip_crowd)
  assert pipeline.objects_over_cap(split, 8, True) == (2, 13)  # the tiny config's cap


def test_training_logs_the_dropped_objects_once(sample_source, sample_json, caplog):
  for cap in (8, 100):
    settings = InputSettings.from_config(load_config(image_size=(128, 192), gt_mask_size=8,
                                                     max_instances=cap).data)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      batches = pipeline.train_iterator(sample_source, settings, 2, seed=0, process_index=0,
                                        process_count=1, num_workers=1)
      next(batches)
      next(batches)
    warnings = [r.getMessage() for r in caplog.records if 'max_instances' in r.getMessage()]
    images, objects = _direct_over_cap(sample_json, cap, skip_crowd=True)
    if objects:
      assert warnings == [f'coco_instances validation: training drops {objects} objects of '
                          f'{images} images beyond data.max_instances = {cap} (each image keeps '
                          f'its first {cap})']
    else:
      assert not warnings


def test_prepare_reports_objects_over_the_cap(sample_data_dir, capsys):
  assert prepare.default_max_instances() == load_config().data.max_instances
  args = ['--manual_dir', str(SAMPLE_DIR), '--data_dir', sample_data_dir, '--no_progress']
  assert prepare.main(args + ['--max_instances', '8']) == 0  # reuses the session's build
  assert ('over max_instances = 8: 2 images, 13 objects without crowd objects (what training '
          'drops); 2 images, 14 objects with them') in capsys.readouterr().out
  assert prepare.main(args) == 0
  assert 'over max_instances = 100: 0 images, 0 objects' in capsys.readouterr().out


# ---------------------------------------------------------------------- duplicate annotation ids
def test_duplicate_annotation_id_names_file_id_and_images(tmp_path):
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640),
                                               (2, 'b.jpg', IMG_B, 294, 640)],
                          [box_annotation(5, 1, [10, 10, 50, 50]),
                           box_annotation(6, 1, [20, 20, 50, 50]),
                           box_annotation(5, 2, [10, 10, 50, 50])])
  with pytest.raises(annotations.DatasetError,
                     match=r'instances_val2017\.json: duplicate annotation id 5 \(in image id 1 '
                     r'and image id 2\)'):
    build(manual, tmp_path / 'tfds')
