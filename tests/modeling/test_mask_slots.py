"""config.model.mask.train_slots: the 'bucketed' mask head (a conditional over slot counts) gives
the 'fixed' one's losses and gradients, on batches that pick the small and the full bucket."""

import pathlib

import jax
import numpy as np
import pytest

from maskrcnn_jax import modeling
from maskrcnn_jax.configs import load_config
from maskrcnn_jax.data import synthetic
from maskrcnn_jax.data.spec import GroundTruth
from maskrcnn_jax.modeling.model import mask_slot_buckets

ROOT = pathlib.Path(__file__).resolve().parents[2]
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def test_buckets():
  assert mask_slot_buckets(128) == (16, 32, 64, 128)
  assert mask_slot_buckets(32) == (16, 32)
  assert mask_slot_buckets(100) == (16, 25, 50, 100)
  assert mask_slot_buckets(16) == (16,) and mask_slot_buckets(8) == (8,)


def test_auto_is_bucketed_on_cpu_and_resolved_by_build_model():
  assert jax.default_backend() == 'cpu'
  assert modeling.resolve_mask_train_slots('auto') == 'bucketed'
  assert modeling.resolve_mask_train_slots('fixed') == 'fixed'
  config = load_config(ROOT / 'configs/tiny.py')
  assert config.model.mask.train_slots == 'auto'
  assert modeling.build_model(config.model).mask.train_slots == 'bucketed'


def _config(train_slots: str):
  config = load_config(ROOT / 'configs/tiny.py')
  config.data.max_instances = 24
  config.model.roi.batch_size_per_image = 128  # 32 foreground slots: buckets (16, 32)
  config.model.mask.train_slots = train_slots
  return config


def _batch(config, num_objects: int):
  """One synthetic image with exactly ``num_objects`` objects: 24 x 24 boxes on a grid."""
  d = config.data
  batch = synthetic.synthetic_batch(1, tuple(d.image_size), int(d.max_instances),
                                    int(d.gt_mask_size), seed=num_objects)
  h, w = batch['image_sizes'][0]
  for i in range(num_objects):
    x, y = 4 + (i % 5) * (w - 32) / 4, 4 + (i // 5) * (h - 32) / 4
    batch['gt_boxes'][0, i] = (x, y, x + 24, y + 24)
  batch['gt_valid'][0] = np.arange(int(d.max_instances)) < num_objects
  batch['gt_classes'][0] = np.where(batch['gt_valid'][0], 1 + np.arange(int(d.max_instances)), 0)
  batch['gt_masks'][0] = batch['gt_masks'][0, :1]  # every object the same elliptic mask
  return batch


@pytest.fixture(scope='module')
def variables():
  config = _config('fixed')
  return modeling.init_variables(modeling.build_model(config.model), jax.random.key(0),
                                 tuple(config.data.image_size))


@pytest.fixture(scope='module')
def grad_fns(variables):
  """train_slots -> (jitted (params, batch) -> (grads, losses), whether it has a conditional);
  compiled once per mode for both batches."""
  fns = {}
  for mode in ('fixed', 'bucketed'):
    config = _config(mode)
    model = modeling.build_model(config.model)
    mean, std = config.data.pixel_mean, config.data.pixel_std

    def total(params, batch, model=model, mean=mean, std=std):
      images = modeling.normalize_images(batch['images'], batch['image_sizes'], mean, std)
      out = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images,
                        batch['image_sizes'], GroundTruth.from_batch(batch), train=True,
                        rngs={'sampling': jax.random.key(3)})
      return out['total_loss'], out

    fn = jax.jit(jax.grad(total, has_aux=True))
    example = variables['params'], _batch(config, 1)
    jaxpr = str(jax.make_jaxpr(fn)(*example))
    # Both batches have the example's shapes. Compiled without XLA's backend optimisations (both
    # modes alike): half the compile time of these two programs, which run twice each.
    fns[mode] = fn.lower(*example).compile(FAST_COMPILE), 'cond[' in jaxpr
  return fns


@pytest.mark.parametrize('num_objects', [3, 20])
def test_bucketed_equals_fixed(num_objects, variables, grad_fns):
  batch = _batch(_config('fixed'), num_objects)
  (fixed_fn, fixed_cond), (bucketed_fn, bucketed_cond) = grad_fns['fixed'], grad_fns['bucketed']
  assert bucketed_cond and not fixed_cond
  fixed_grads, fixed = jax.device_get(fixed_fn(variables['params'], batch))
  bucketed_grads, bucketed = jax.device_get(bucketed_fn(variables['params'], batch))
  # 3 objects fit the 16-slot branch; 20 (each ground truth is a foreground candidate) need
  # the full 32.
  foreground = int(fixed['num_foreground_rois'])
  assert (foreground <= 16) == (num_objects == 3), foreground
  assert foreground > 0 and fixed['mask_loss'] > 0
  for k, v in fixed.items():
    np.testing.assert_allclose(bucketed[k], v, rtol=1e-6, err_msg=k)
  assert jax.tree_util.tree_structure(bucketed_grads) == jax.tree_util.tree_structure(fixed_grads)
  flat_fixed = jax.tree_util.tree_flatten_with_path(fixed_grads)[0]
  for (path, g), b in zip(flat_fixed, jax.tree_util.tree_leaves(bucketed_grads)):
    scale = float(np.max(np.abs(g))) or 1.0
    np.testing.assert_allclose(b, g, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
