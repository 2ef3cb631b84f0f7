"""Bad input to the coco_instances builder: clear errors, conversions, drops and counts."""

import json
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_helpers import SAMPLE_DIR, box_annotation, build, load_config, write_coco_dir
from maskrcnn_jax.data import annotations
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data import preprocess
from maskrcnn_jax.train import experiment

IMG_A = SAMPLE_DIR / 'val2017' / '000000343934.jpg'   # 480 x 640
IMG_B = SAMPLE_DIR / 'val2017' / '000000194216.jpg'   # 294 x 640


def _metadata(dataset_dir):
  with open(os.path.join(dataset_dir, 'metadata.json')) as f:
    return json.load(f)


def _assert_not_prepared(data_dir):
  builder = tfds.builder('coco_instances', data_dir=str(data_dir))
  assert not builder.is_prepared()
  with pytest.raises(pipeline.DatasetNotPreparedError):
    pipeline.Source('coco_instances', 'validation', str(data_dir))
  # Nothing but TFDS's incomplete.* temporary directories (removed on failure) is left.
  root = data_dir / 'coco_instances' / 'coco2017'
  if root.exists():
    assert not any((p / 'dataset_info.json').exists() for p in root.iterdir())


def test_missing_image_names_file_and_id(tmp_path):
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640),
                                               (7, 'missing.jpg', None, 480, 640)],
                          [box_annotation(0, 1, [10, 10, 50, 50])])
  with pytest.raises(annotations.DatasetError, match=r'missing\.jpg.*image id 7'):
    build(manual, tmp_path / 'tfds')
  _assert_not_prepared(tmp_path / 'tfds')


def test_corrupt_image_names_file_and_id(tmp_path):
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640),
                                               (2, 'bad.jpg', IMG_B, 294, 640)], [])
  data = (manual / 'val2017' / 'bad.jpg').read_bytes()
  (manual / 'val2017' / 'bad.jpg').write_bytes(data[:len(data) // 3])
  with pytest.raises(annotations.DatasetError, match=r'bad\.jpg \(image id 2\)'):
    build(manual, tmp_path / 'tfds')
  _assert_not_prepared(tmp_path / 'tfds')


def test_image_size_mismatch_is_an_error(tmp_path):
  manual = write_coco_dir(tmp_path / 'coco', [(3, 'a.jpg', IMG_A, 640, 480)], [])
  with pytest.raises(annotations.DatasetError, match=r'a\.jpg \(image id 3\).*480x640'):
    build(manual, tmp_path / 'tfds')


def test_grayscale_rgba_png_and_cmyk_images_become_rgb_jpeg(tmp_path):
  src = Image.open(IMG_A)
  manual = write_coco_dir(tmp_path / 'coco', [(i, f'{i}.img', None, 480, 640)
                                               for i in (1, 2, 3, 4)],
                          [box_annotation(i, i, [10, 10, 50, 50]) for i in (1, 2, 3, 4)])
  src.convert('L').save(manual / 'val2017' / '1.img', format='JPEG')
  src.convert('RGBA').save(manual / 'val2017' / '2.img', format='PNG')
  src.save(manual / 'val2017' / '3.img', format='PNG')
  src.convert('CMYK').save(manual / 'val2017' / '4.img', format='JPEG')
  dataset_dir = build(manual, tmp_path / 'tfds')
  assert _metadata(dataset_dir)['splits']['validation']['stats']['converted_images'] == 4
  source = pipeline.Source('coco_instances', 'validation', str(tmp_path / 'tfds'))
  reference = np.asarray(src, np.float32)
  for i in range(4):
    record = source[i]
    assert record['image'][:2] == b'\xff\xd8'  # JPEG
    pixels = np.asarray(preprocess.decode_rgb(record['image']), np.float32)
    assert pixels.shape == (480, 640, 3)
    if i in (1, 2):  # colour survives RGBA and PNG (up to the loss of re-encoding)
      assert np.abs(pixels - reference).mean() < 8  # JPEG q95 with 4:2:0 chroma: about 4


def test_unknown_image_or_category_names_the_annotation(tmp_path):
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640)],
                          [box_annotation(0, 1, [10, 10, 50, 50]),
                           box_annotation(41, 99, [10, 10, 50, 50])])
  with pytest.raises(annotations.DatasetError, match=r'annotation id 41.*unknown image id 99'):
    build(manual, tmp_path / 'tfds')
  _assert_not_prepared(tmp_path / 'tfds')
  manual = write_coco_dir(tmp_path / 'coco2', [(1, 'a.jpg', IMG_A, 480, 640)],
                          [box_annotation(42, 1, [10, 10, 50, 50], category_id=5)])
  with pytest.raises(annotations.DatasetError,
                     match=r'annotation id 42.*unknown category id 5'):
    build(manual, tmp_path / 'tfds2')


def test_degenerate_boxes_dropped_and_outside_boxes_clipped(tmp_path):
  anns = [box_annotation(0, 1, [10, 10, 0, 20]),        # zero width
          box_annotation(1, 1, [10, 10, 20, -5]),       # negative height
          box_annotation(2, 1, [700, 10, 20, 20]),      # entirely outside: empty after clipping
          box_annotation(3, 1, [600, 450, 100, 100]),   # reaches outside: clipped
          box_annotation(4, 1, [100, 100, 50, 60])]
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640)], anns)
  dataset_dir = build(manual, tmp_path / 'tfds')
  stats = _metadata(dataset_dir)['splits']['validation']['stats']
  assert stats['dropped_degenerate_boxes'] == 3 and stats['clipped_boxes'] == 1
  record = pipeline.Source('coco_instances', 'validation', str(tmp_path / 'tfds'))[0]
  assert list(record['objects']['id']) == [3, 4]
  np.testing.assert_allclose(np.asarray(record['objects']['bbox'][0]) * [480, 640, 480, 640],
                             [450, 600, 480, 640], atol=1e-3)


def test_short_polygons_dropped_with_a_warning(tmp_path, caplog):
  anns = [box_annotation(5, 1, [10, 10, 40, 40], segmentation=[[10, 10, 50, 10]]),  # 2 points
          box_annotation(6, 1, [10, 10, 40, 40],
                         segmentation=[[10, 10, 50, 10], [10, 10, 50, 10, 50, 50]]),
          box_annotation(7, 1, [10, 10, 40, 40], segmentation=[])]
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640)], anns)
  with caplog.at_level(logging.WARNING):
    dataset_dir = build(manual, tmp_path / 'tfds')
  assert 'annotation id 5' in caplog.text and 'annotation id 7' in caplog.text
  stats = _metadata(dataset_dir)['splits']['validation']['stats']
  assert stats['dropped_polygons'] == 2 and stats['dropped_objects_without_mask'] == 2
  record = pipeline.Source('coco_instances', 'validation', str(tmp_path / 'tfds'))[0]
  assert list(record['objects']['id']) == [6]


def test_images_without_annotations_and_zero_ids(tmp_path):
  # Annotation id 0 is valid; category id 0 switches to the contiguous mapping 0 -> 1, 18 -> 2.
  categories = [{'id': 0, 'name': 'thing'}, {'id': 18, 'name': 'dog'}]
  anns = [box_annotation(0, 1, [10, 10, 50, 50], category_id=0),
          box_annotation(1, 1, [100, 100, 50, 50], category_id=18)]
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640),
                                               (2, 'b.jpg', IMG_B, 294, 640)],
                          anns, categories=categories)
  dataset_dir = build(manual, tmp_path / 'tfds')
  md = _metadata(dataset_dir)
  assert md['mapping'] == 'contiguous' and md['num_classes'] == 3
  assert md['category_id_to_class_index'] == {'0': 1, '18': 2}
  assert md['class_index_to_category_id'] == {'1': 0, '2': 18}
  source = pipeline.Source('coco_instances', 'validation', str(tmp_path / 'tfds'))
  assert list(source[0]['objects']['id']) == [0, 1]
  assert list(source[0]['objects']['label']) == [1, 2]
  config = load_config(tfds_data_dir=str(tmp_path / 'tfds'), train_split='validation',
                       image_size=(128, 192), gt_mask_size=8, max_instances=4)
  # Evaluation keeps the image without annotations.
  batch = next(experiment.build_eval_iterator(config, 2, process_index=0, process_count=1,
                                      source=source))
  assert batch['example_valid'].all() and batch['gt_valid'].sum(1).tolist() == [2, 0]
  assert batch['gt_classes'][0, :2].tolist() == [1, 2]
  # Training drops it unless keep_images_without_annotations_in_training.
  for keep, expected in ((False, {1}), (True, {1, 2})):
    config.data.keep_images_without_annotations_in_training = keep
    batch = next(experiment.build_train_iterator(config, 4, process_index=0, process_count=1,
                                         num_workers=1, source=source))
    assert set(batch['image_ids'].tolist()) == expected


def test_prepare_cli_reports_errors_and_counts(tmp_path, capsys):
  from maskrcnn_jax.data import prepare  # pylint: disable=import-outside-toplevel
  manual = write_coco_dir(tmp_path / 'coco', [(1, 'a.jpg', IMG_A, 480, 640)],
                          [box_annotation(3, 1, [10, 10, 0, 5]),
                           box_annotation(4, 1, [10, 10, 40, 40])])
  ann = str(manual / 'annotations' / 'instances_val2017.json')
  args = ['--data_dir', str(tmp_path / 'tfds'), '--name', 'mine', '--no_progress',
          '--val_annotations', ann, '--val_images', str(manual / 'val2017')]
  assert prepare.main(args) == 0
  out = capsys.readouterr().out
  assert 'dropped_degenerate_boxes 1' in out and 'num_objects 1' in out
  source = pipeline.Source('coco_instances/mine', 'validation', str(tmp_path / 'tfds'))
  assert len(source) == 1
  (manual / 'val2017' / 'a.jpg').unlink()
  args[3] = 'broken'
  assert prepare.main(args) == 1
  assert 'a.jpg (image id 1)' in capsys.readouterr().err
  with pytest.raises(pipeline.DatasetNotPreparedError):
    pipeline.Source('coco_instances/broken', 'validation', str(tmp_path / 'tfds'))
