"""Training forward of the tiny config on a batch built from real COCO annotations.

The batch follows the data pipeline's contract (gt_boxes xyxy canvas pixels, gt_classes 0 =
padding, gt_valid, gt_is_crowd, gt_masks uint8 round(255 * value) of masks cropped to their box
at gt_mask_size plus a 2-cell zero margin) and is built here with pycocotools + PIL + NumPy.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from maskrcnn_jax.configs import load_config
from maskrcnn_jax.data.spec import GroundTruth
from maskrcnn_jax.modeling import build_model, frozen_param_mask, init_variables, normalize_images
from maskrcnn_jax.ops.masks import crop_gt_mask

pycocotools_coco = pytest.importorskip('pycocotools.coco')

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = ROOT / 'tests/data/coco_sample'
LOSS_KEYS = ('rpn_score_loss', 'rpn_box_loss', 'fast_rcnn_class_loss', 'fast_rcnn_box_loss',
             'mask_loss', 'total_loss')


@pytest.fixture(scope='module')
def config():
  return load_config(ROOT / 'configs/tiny.py')


@pytest.fixture(scope='module')
def model(config):
  return build_model(config.model)


@pytest.fixture(scope='module')
def variables(model, config):
  h, w = config.data.image_size
  return init_variables(model, jax.random.key(0), (h, w))


def _coco_batch(config, num_images=2, keep_crowd=False):
  """Real images and annotations fitted into the tiny canvas, padded to max_instances."""
  coco = pycocotools_coco.COCO(str(SAMPLE / 'annotations/instances_val2017.json'))
  canvas_h, canvas_w = config.data.image_size
  n, g = config.data.max_instances, config.data.gt_mask_size
  image_ids = sorted(coco.getImgIds())[:num_images]
  batch = {'images': np.zeros((num_images, canvas_h, canvas_w, 3), np.uint8),
           'image_sizes': np.zeros((num_images, 2), np.int32),
           'gt_boxes': np.zeros((num_images, n, 4), np.float32),
           'gt_classes': np.zeros((num_images, n), np.int32),
           'gt_valid': np.zeros((num_images, n), bool),
           'gt_is_crowd': np.zeros((num_images, n), bool),
           'gt_masks': np.zeros((num_images, n, g + 4, g + 4), np.uint8)}
  for b, image_id in enumerate(image_ids):
    info = coco.loadImgs(image_id)[0]
    scale = min(canvas_h / info['height'], canvas_w / info['width'])
    h, w = round(info['height'] * scale), round(info['width'] * scale)
    image = Image.open(SAMPLE / 'val2017' / info['file_name']).convert('RGB')
    batch['images'][b, :h, :w] = np.asarray(image.resize((w, h), Image.BILINEAR))
    batch['image_sizes'][b] = (h, w)
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            if keep_crowd or not a['iscrowd']]
    for i, ann in enumerate(anns[:n]):
      x, y, bw, bh = ann['bbox']
      box = np.asarray([x, y, x + bw, y + bh], np.float32) * scale
      full = Image.fromarray(coco.annToMask(ann) * 255).resize((w, h), Image.BILINEAR)
      mask = np.zeros((canvas_h, canvas_w), np.float32)
      mask[:h, :w] = np.asarray(full, np.float32) / 255.0
      crop = np.asarray(crop_gt_mask(mask, box, g, 2))
      batch['gt_boxes'][b, i] = box
      batch['gt_classes'][b, i] = ann['category_id']
      batch['gt_valid'][b, i] = True
      batch['gt_is_crowd'][b, i] = bool(ann['iscrowd'])
      batch['gt_masks'][b, i] = np.round(255.0 * crop).astype(np.uint8)
  return batch


@pytest.fixture(scope='module')
def batch(config):
  b = _coco_batch(config)
  assert b['gt_valid'].sum() >= 2
  return b


@pytest.fixture(scope='module')
def loss_fn(model, config):
  mean, std = config.data.pixel_mean, config.data.pixel_std
  traces = []

  def fn(variables, batch, key):
    traces.append(1)  # runs once per trace, not per call
    images = normalize_images(batch['images'], batch['image_sizes'], mean, std)
    return model.apply(variables, images, batch['image_sizes'], GroundTruth.from_batch(batch),
                       train=True, rngs={'sampling': key})

  jitted = jax.jit(fn)
  jitted.traces = traces
  return jitted


def _check_finite(out):
  for k in LOSS_KEYS:
    assert np.isfinite(float(out[k])), (k, out[k])


def test_real_batch_losses_finite(loss_fn, variables, batch):
  out = jax.device_get(loss_fn(variables, batch, jax.random.key(1)))
  _check_finite(out)
  assert out['num_positive_anchors'] > 0
  assert out['num_foreground_rois'] > 0
  assert out['fast_rcnn_class_loss'] > 0 and out['mask_loss'] > 0
  np.testing.assert_allclose(
      out['total_loss'], sum(out[k] for k in LOSS_KEYS[:-1]), rtol=1e-5)


def test_no_ground_truth(loss_fn, variables, batch):
  empty = dict(batch)
  empty['gt_valid'] = np.zeros_like(batch['gt_valid'])
  empty['gt_classes'] = np.zeros_like(batch['gt_classes'])
  out = jax.device_get(loss_fn(variables, empty, jax.random.key(1)))
  _check_finite(out)
  assert out['num_positive_anchors'] == 0 and out['num_foreground_rois'] == 0
  assert out['rpn_box_loss'] == 0 and out['fast_rcnn_box_loss'] == 0 and out['mask_loss'] == 0
  assert out['rpn_score_loss'] > 0 and out['fast_rcnn_class_loss'] > 0


def test_crowd_only(loss_fn, variables, batch):
  crowd = dict(batch)
  crowd['gt_is_crowd'] = batch['gt_valid'].copy()
  out = jax.device_get(loss_fn(variables, crowd, jax.random.key(1)))
  _check_finite(out)
  assert out['num_positive_anchors'] == 0 and out['num_foreground_rois'] == 0


def test_same_seed_same_losses_and_one_compile(loss_fn, variables, batch):
  a = jax.device_get(loss_fn(variables, batch, jax.random.key(7)))
  b = jax.device_get(loss_fn(variables, batch, jax.random.key(7)))
  for k in LOSS_KEYS:
    assert a[k] == b[k], k
  other = {k: v.copy() for k, v in batch.items()}
  other['images'] = other['images'][::-1].copy()
  other['image_sizes'] = other['image_sizes'][::-1].copy()
  loss_fn(variables, other, jax.random.key(8))
  assert len(loss_fn.traces) == 1


def test_gradients_reach_exactly_the_trainable_parameters(model, variables, batch, config):
  mean, std = config.data.pixel_mean, config.data.pixel_std

  def total(params):
    images = normalize_images(batch['images'], batch['image_sizes'], mean, std)
    out = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images,
                      batch['image_sizes'], GroundTruth.from_batch(batch),
                      train=True, rngs={'sampling': jax.random.key(1)})
    return out['total_loss']

  # One call: compiled without XLA's backend optimisations (half the compile time).
  grad_fn = jax.jit(jax.grad(total)).lower(variables['params']).compile(
      {'xla_backend_optimization_level': 0})
  grads = jax.device_get(grad_fn(variables['params']))
  frozen = frozen_param_mask(variables['params'], config.model.backbone.freeze_at)
  flat_grads = jax.tree_util.tree_flatten_with_path(grads)[0]
  flat_frozen = jax.tree_util.tree_leaves(frozen)
  assert len(flat_grads) == len(flat_frozen)
  for (path, g), is_frozen in zip(flat_grads, flat_frozen):
    name = jax.tree_util.keystr(path)
    assert np.isfinite(g).all(), name
    if is_frozen:  # stop_frozen_gradients: the frozen stages get exactly zero
      assert not np.any(g), name
    else:
      assert np.any(g), name
  assert any(flat_frozen) and not all(flat_frozen)
