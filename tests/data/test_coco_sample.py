"""The coco_instances builder and the pipelines on six real COCO val2017 images."""

import collections

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data import preprocess
from maskrcnn_jax.data import spec
from maskrcnn_jax.data import synthetic
from maskrcnn_jax.train import experiment
from data_helpers import SAMPLE_DIR, load_config

CROWD_IMAGE = 464689   # holds the one crowd RLE object (annotation 904400464689)
EMPTY_IMAGE = 89       # no annotations


def _config(data_dir, **overrides):
  return load_config(tfds_data_dir=data_dir, train_split='validation', **overrides)


def _records(source):
  return {int(source[i]['image_id']): source[i] for i in range(len(source))}


def test_records_match_the_json(sample_source, sample_json):
  per_image = collections.Counter(a['image_id'] for a in sample_json['annotations'])
  records = _records(sample_source)
  assert sorted(records) == sorted(im['id'] for im in sample_json['images'])
  # Record i is the i-th image id in ascending order, as the metadata says.
  assert list(sample_source.image_ids) == sorted(records)
  for image_id, record in records.items():
    assert len(record['objects']['id']) == per_image.get(image_id, 0), image_id
    assert sample_source.num_objects[list(sample_source.image_ids).index(image_id)] == \
        per_image.get(image_id, 0)
  md = sample_source.metadata
  assert md['mapping'] == 'identity' and md['num_classes'] == 91
  assert len(md['categories']) == 80
  assert md['splits']['validation']['stats']['images_without_annotations'] == 1


def test_mask_areas_and_boxes(sample_source, sample_json):
  """Rasterised masks agree with COCO's area and lie inside their boxes.

  COCO's polygon `area` is the polygon's exact area; the rasterised mask counts pixels whose
  centres fall inside, which differs along the boundary by up to about half a pixel per pixel of
  perimeter, in either direction, so the bound is 8 % of the area or 15 pixels, whichever is
  larger (small objects have relatively long boundaries). Crowd RLEs are stored losslessly.
  """
  anns = {a['id']: a for a in sample_json['annotations']}
  for record in _records(sample_source).values():
    h, w = record['height'], record['width']
    objs = record['objects']
    for k, ann_id in enumerate(objs['id']):
      rle = {'size': [h, w], 'counts': objs['mask'][k]}
      area = float(mask_util.area(rle))
      coco_area = anns[ann_id]['area']
      assert objs['area'][k] == pytest.approx(coco_area)  # COCO's own area is what is stored
      if anns[ann_id]['iscrowd']:
        # Lossless: the pixel count of COCO's RLE (its `area` field is not that count here).
        seg = anns[ann_id]['segmentation']
        assert area == mask_util.area(mask_util.frPyObjects(seg, *seg['size']))
      else:
        assert abs(area - coco_area) <= max(0.08 * coco_area, 15), (ann_id, area, coco_area)
      y1, x1, y2, x2 = np.asarray(objs['bbox'][k]) * [h, w, h, w]
      mx, my, mw, mh = mask_util.toBbox(rle)
      # COCO boxes are rounded to the annotation tool's precision: the pixel extent of a mask may
      # pass its box by up to one pixel (here the crowd RLE does, by exactly 1).
      assert mx >= x1 - 1.5 and my >= y1 - 1.5, ann_id
      assert mx + mw <= x2 + 1.5 and my + mh <= y2 + 1.5, ann_id
      np.testing.assert_allclose([x1, y1, x2 - x1, y2 - y1], anns[ann_id]['bbox'], atol=1e-3)


def test_crop_of_flipped_mask_is_flipped_crop(sample_source):
  record = _records(sample_source)[128372]
  h, w = record['height'], record['width']
  for k in range(3):
    mask = preprocess.decode_mask(record['objects']['mask'][k], h, w)
    y1, x1, y2, x2 = np.asarray(record['objects']['bbox'][k]) * [h, w, h, w]
    crop = preprocess.crop_and_resize_mask(mask, np.array([x1, y1, x2, y2]), 112)
    flipped = preprocess.crop_and_resize_mask(mask[:, ::-1], np.array([w - x2, y1, w - x1, y2]),
                                              112)
    np.testing.assert_allclose(flipped, crop[:, ::-1], atol=1e-5)
    # The crop holds the object: its mean matches the mask's share of the box.
    share = mask[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))].mean()
    assert abs(crop.mean() - share) < 0.05


def _one(record, flip, canvas=(832, 1344), skip_crowd=False):
  out = spec.empty_batch(1, canvas, 100, 112)
  preprocess.process_example(record, out, 0, canvas=canvas, gt_mask_size=112, flip=flip,
                             skip_crowd=skip_crowd)
  return {k: v[0] for k, v in out.items()}


def test_flip_and_resize_move_image_boxes_and_masks_together(sample_source):
  record = _records(sample_source)[CROWD_IMAGE]
  plain, flipped = _one(record, False), _one(record, True)
  h, w = plain['image_sizes']
  assert (h, w) == (832, round(586 * 832 / 640))
  assert plain['scales'] == pytest.approx(832 / 640)
  np.testing.assert_array_equal(flipped['images'][:h, :w], plain['images'][:h, :w][:, ::-1])
  assert not plain['images'][h:].any() and not plain['images'][:, w:].any()
  valid = plain['gt_valid']
  width = 586 * plain['scales']
  np.testing.assert_allclose(flipped['gt_boxes'][valid][:, [2, 0]],
                             width - plain['gt_boxes'][valid][:, [0, 2]], atol=1e-3)
  np.testing.assert_array_equal(flipped['gt_masks'], plain['gt_masks'][:, :, ::-1])
  # Resize: each instance's full mask, resized to the canvas, has the canvas box of gt_boxes.
  mask = preprocess.decode_mask(record['objects']['mask'][0], 640, 586)
  resized = np.asarray(Image.fromarray(mask * 255).resize((w, h), Image.BILINEAR)) > 127
  ys, xs = np.nonzero(resized)
  box = plain['gt_boxes'][0]
  assert abs(xs.min() - box[0]) <= 2 and abs(xs.max() + 1 - box[2]) <= 2
  assert abs(ys.min() - box[1]) <= 2 and abs(ys.max() + 1 - box[3]) <= 2
  # The padded 116 grid: a 2-pixel zero border, the object inside.
  m = plain['gt_masks'][0]
  assert m.shape == (116, 116) and not m[:2].any() and not m[:, -2:].any() and m.max() == 255


def test_crowd_kept_for_eval_dropped_for_training(sample_source):
  record = _records(sample_source)[CROWD_IMAGE]
  evaluated = _one(record, False, skip_crowd=False)
  trained = _one(record, False, skip_crowd=True)
  assert evaluated['gt_valid'].sum() == 14 and evaluated['gt_is_crowd'].sum() == 1
  assert trained['gt_valid'].sum() == 13 and not trained['gt_is_crowd'].any()


def test_train_batches_match_the_synthetic_contract(sample_data_dir, sample_source):
  config = _config(sample_data_dir)
  batch = next(experiment.build_train_iterator(config, 2, process_index=0, process_count=1,
                                       num_workers=2, source=sample_source))
  fake = synthetic.synthetic_batch(2, tuple(config.data.image_size), config.data.max_instances,
                                  config.data.gt_mask_size, config.model.num_classes)
  assert sorted(batch) == sorted(fake)
  for key in fake:
    assert (batch[key].shape, batch[key].dtype) == (fake[key].shape, fake[key].dtype), key
  assert batch['example_valid'].all()
  assert not batch['gt_is_crowd'].any()
  assert EMPTY_IMAGE not in batch['image_ids']
  # Classes are the COCO ids of the valid instances; padding is class 0.
  assert (batch['gt_classes'][batch['gt_valid']] > 0).all()
  assert (batch['gt_classes'][~batch['gt_valid']] == 0).all()


def test_training_is_deterministic_and_resumes_exactly(sample_data_dir, sample_source):
  config = _config(sample_data_dir, image_size=(256, 384), gt_mask_size=16, max_instances=20)
  kwargs = dict(process_index=0, process_count=1, source=sample_source)
  it = experiment.build_train_iterator(config, 2, 0, seed=7, num_workers=2, **kwargs)
  full = [next(it) for _ in range(8)]  # 16 examples: three epochs of 5 trainable images
  resumed = experiment.build_train_iterator(config, 2, 5, seed=7, num_workers=1, **kwargs)
  for step in range(5, 8):
    batch = next(resumed)
    for key in batch:
      np.testing.assert_array_equal(batch[key], full[step][key], err_msg=f'{step} {key}')
  ids = np.concatenate([b['image_ids'] for b in full])
  # Each epoch is a permutation of the trainable images (the empty image 89 is excluded).
  trainable = sorted(set(sample_source.image_ids) - {EMPTY_IMAGE})
  assert sorted(ids[:5]) == trainable and sorted(ids[5:10]) == trainable
  other = experiment.build_train_iterator(config, 2, 0, seed=8, num_workers=1, **kwargs)
  assert any((next(other)['image_ids'] != full[s]['image_ids']).any() for s in range(4))


def test_hosts_share_the_global_batch(sample_data_dir, sample_source):
  config = _config(sample_data_dir, image_size=(128, 192), gt_mask_size=8, max_instances=20)
  single = next(experiment.build_train_iterator(config, 4, 1, seed=3, process_index=0,
                                                process_count=1, num_workers=1,
                                                source=sample_source))
  hosts = [next(experiment.build_train_iterator(config, 2, 1, seed=3, process_index=p,
                                                process_count=2, num_workers=1,
                                                source=sample_source)) for p in (0, 1)]
  for key in single:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in hosts]), single[key])


def test_keep_images_without_annotations_in_training(sample_source):
  kept = pipeline.trainable_indices(sample_source, skip_crowd=True, keep_empty=True)
  dropped = pipeline.trainable_indices(sample_source, skip_crowd=True, keep_empty=False)
  assert EMPTY_IMAGE in sample_source.image_ids[kept]
  assert EMPTY_IMAGE not in sample_source.image_ids[dropped] and len(dropped) == 5


def test_eval_pads_the_final_batch(sample_data_dir, sample_json):
  config = _config(sample_data_dir, image_size=(256, 384), gt_mask_size=16, max_instances=20)
  source = pipeline.Source('coco_instances', 'validation', sample_data_dir)
  for count in (1, 2):
    seen = []
    for p in range(count):
      batches = list(experiment.build_eval_iterator(config, 4, process_index=p, process_count=count,
                                            num_workers=2, source=source))
      assert len(batches) == pipeline.num_eval_batches(6, 4, count)
      for b in batches:
        assert b['images'].shape == (4, 256, 384, 3)
        seen += list(b['image_ids'][b['example_valid']])
        assert not b['image_ids'][~b['example_valid']].any()
    assert sorted(seen) == sorted(im['id'] for im in sample_json['images'])
  batches = list(experiment.build_eval_iterator(config, 4, process_index=0, process_count=1,
                                        source=source))
  assert batches[-1]['example_valid'].tolist() == [True, True, False, False]
  b = batches[0]
  sizes = {im['id']: (im['height'], im['width']) for im in sample_json['images']}
  for i, image_id in enumerate(b['image_ids']):
    assert tuple(b['original_sizes'][i]) == sizes[image_id]
    np.testing.assert_allclose(b['original_sizes'][i] * b['scales'][i], b['image_sizes'][i],
                               atol=0.5)
  crowd = np.concatenate([x['gt_is_crowd'].sum(1) for x in batches])
  assert crowd.sum() == 1


def test_no_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(pipeline.DatasetNotPreparedError, match='prepare'):
    pipeline.Source('coco_instances', 'validation', str(tmp_path))
  assert SAMPLE_DIR.is_dir()


def test_crop_matches_the_ops_convention(sample_source):
  """The host-side crop equals ops.masks.crop_gt_mask (the layout the mask targets assume)."""
  masks_ops = pytest.importorskip('maskrcnn_jax.ops.masks')
  record = _records(sample_source)[CROWD_IMAGE]
  h, w = record['height'], record['width']
  for k in (0, 5, 13):  # includes the crowd RLE (index 13, the largest annotation id)
    mask = preprocess.decode_mask(record['objects']['mask'][k], h, w)
    y1, x1, y2, x2 = np.asarray(record['objects']['bbox'][k]) * [h, w, h, w]
    box = np.array([x1, y1, x2, y2], np.float32)
    ours = np.pad(preprocess.crop_and_resize_mask(mask, box, 112), 2)
    theirs = np.asarray(masks_ops.crop_gt_mask(mask, box, 112, 2, convention='area'))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
