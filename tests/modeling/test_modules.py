"""Unit tests of the modeling building blocks against NumPy references (small shapes)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.configs import load_config
from maskrcnn_jax.modeling import (ResNet, build_model, frozen_param_mask,
                                   init_variables, normalize_images)
from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.heads import MaskHead, RPNHead
from maskrcnn_jax.modeling.layers import Deconv2x2, FrozenBatchNorm, upsample_nearest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_frozen_batch_norm_formula():
  x = np.random.default_rng(0).normal(size=(2, 3, 3, 4)).astype(np.float32)
  stats = {'scale': np.array([1., 2., .5, 1.5], np.float32), 'bias': np.arange(4, dtype=np.float32),
           'mean': np.array([.1, -.2, .3, 0.], np.float32), 'var': np.array([1., 2., .5, 3.], np.float32)}
  y = FrozenBatchNorm(epsilon=1e-5).apply({'batch_stats': stats}, x)
  ref = (x - stats['mean']) / np.sqrt(stats['var'] + 1e-5) * stats['scale'] + stats['bias']
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_deconv_matches_loop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 3, 2, 4)).astype(np.float32)
  module = Deconv2x2(5)
  v = module.init(jax.random.key(0), x)
  k, b = np.asarray(v['params']['kernel']), np.asarray(v['params']['bias'])
  ref = np.zeros((1, 6, 4, 5), np.float32)
  for i in range(3):
    for j in range(2):
      for di in range(2):
        for dj in range(2):
          ref[0, 2 * i + di, 2 * j + dj] = x[0, i, j] @ k[di, dj] + b
  np.testing.assert_allclose(module.apply(v, x), ref, rtol=1e-5, atol=1e-5)


def test_upsample_nearest_is_torch_rule():
  x = jnp.arange(2 * 3 * 1, dtype=jnp.float32).reshape(1, 2, 3, 1)
  np.testing.assert_array_equal(upsample_nearest(x, (4, 6))[0, ..., 0],
                                np.repeat(np.repeat(np.asarray(x[0, ..., 0]), 2, 0), 2, 1))
  # Odd target (torch: src = floor(dst * in / out)).
  out = upsample_nearest(x, (3, 5))[0, ..., 0]
  rows, cols = (np.arange(3) * 2) // 3, (np.arange(5) * 3) // 5
  np.testing.assert_array_equal(out, np.asarray(x[0, ..., 0])[rows][:, cols])


@pytest.mark.parametrize('depth', [18, 50])
def test_resnet_fpn_shapes_odd_sizes(depth):
  x = jnp.zeros((1, 100, 76, 3))
  resnet = ResNet(depth)
  feats = jax.eval_shape(lambda: resnet.init_with_output(jax.random.key(0), x)[0])
  for level in range(2, 6):
    stride = 2 ** level
    assert feats[f'c{level}'].shape[1:3] == (-(-100 // stride), -(-76 // stride))
  fpn = FPN(2, 6, 16)
  out = jax.eval_shape(lambda f: fpn.init_with_output(jax.random.key(0), f)[0], feats)
  for level in range(2, 7):
    stride = 2 ** level
    assert out[f'p{level}'].shape == (1, -(-100 // stride), -(-76 // stride), 16)


def test_rpn_head_is_location_major():
  feats = {'p2': jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 3, 4)), jnp.float32)}
  head = RPNHead(num_anchors=3, channels=4)
  v = head.init(jax.random.key(0), feats)
  scores, deltas = head.apply(v, feats)
  assert scores['p2'].shape == (1, 2 * 3 * 3) and deltas['p2'].shape == (1, 18, 4)
  # Entry (y=1, x=2, a=1) is flat index (1 * 3 + 2) * 3 + 1.
  h = jax.nn.relu(jax.lax.conv_general_dilated(
      feats['p2'], v['params']['conv']['kernel'], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + v['params']['conv']['bias'])
  obj = h[0, 1, 2] @ v['params']['objectness']['kernel'][0, 0] + v['params']['objectness']['bias']
  np.testing.assert_allclose(scores['p2'][0, (1 * 3 + 2) * 3 + 1], obj[1], rtol=1e-5, atol=1e-5)
  box = h[0, 1, 2] @ v['params']['deltas']['kernel'][0, 0] + v['params']['deltas']['bias']
  np.testing.assert_allclose(deltas['p2'][0, (1 * 3 + 2) * 3 + 1], box[4:8], rtol=1e-5, atol=1e-5)


def test_normalize_images_zeroes_padding():
  images = np.full((2, 4, 5, 3), 200, np.uint8)
  out = np.asarray(normalize_images(images, np.array([[4, 5], [2, 3]]), (0.5, 0.5, 0.5),
                                    (0.25, 0.25, 0.25)))
  value = (200 / 255 - 0.5) / 0.25
  np.testing.assert_allclose(out[0], value, rtol=1e-6)
  np.testing.assert_allclose(out[1, :2, :3], value, rtol=1e-6)
  assert not out[1, 2:].any() and not out[1, :, 3:].any()


def test_frozen_param_mask_names():
  config = load_config(ROOT / 'configs/tiny.py')
  model = build_model(config.model)
  shapes = jax.eval_shape(lambda k: init_variables(model, k, (64, 64)), jax.random.key(0))
  mask = frozen_param_mask(shapes['params'], 2)
  assert all(jax.tree_util.tree_leaves(mask['backbone']['conv1']))
  assert all(jax.tree_util.tree_leaves(mask['backbone']['layer1']))
  assert not any(jax.tree_util.tree_leaves(mask['backbone']['layer2']))
  assert not any(jax.tree_util.tree_leaves(mask['fpn']))
  assert not any(jax.tree_util.tree_leaves(frozen_param_mask(shapes['params'], 0)))


@pytest.mark.parametrize('precision', ['bfloat16', 'float16'])
def test_low_precision_keeps_float32_params_and_outputs(precision):
  config = load_config(ROOT / 'configs/tiny.py')
  config.model.precision = precision
  model = build_model(config.model)
  shapes = jax.eval_shape(lambda k: init_variables(model, k, (64, 64)), jax.random.key(0))
  assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  feats = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3)), method='features'),
                         shapes)
  assert feats['p2'].dtype == jnp.dtype(precision)


def test_finetune_bn_updates_only_unfrozen_statistics():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  resnet = ResNet(18, finetune_bn=True, freeze_at=2)
  v = resnet.init(jax.random.key(0), x)
  _, updated = resnet.apply(v, x, train=True, mutable=['batch_stats'])
  before, after = v['batch_stats'], updated['batch_stats']
  for name in ('bn1', 'layer1'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, before[name], after[name])
  assert not np.allclose(before['layer2']['block0']['bn1']['mean'],
                         after['layer2']['block0']['bn1']['mean'])


@pytest.mark.parametrize('std', [0.0, 0.001])
def test_mask_predictor_init(std):
  """The mask logits conv starts as the reference's mask_fcn_logits (MSRA fill: normal with std
  sqrt(2 / (1 * 1 * num_classes))) unless a std is configured (Detectron's 0.001)."""
  head = MaskHead(num_classes=91, num_convs=1, conv_dim=64, predictor_init_std=std)
  v = head.init(jax.random.key(0), jnp.zeros((1, 2, 7, 7, 16)))
  kernel = np.asarray(v['params']['mask_logits']['kernel'])
  assert kernel.shape == (1, 1, 64, 91)
  expected = std if std > 0 else np.sqrt(2.0 / 91)
  np.testing.assert_allclose(kernel.std(), expected, rtol=0.05)
  assert abs(kernel.mean()) < 0.05 * expected
  assert not np.asarray(v['params']['mask_logits']['bias']).any()
