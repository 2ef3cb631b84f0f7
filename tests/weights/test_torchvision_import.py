"""Importing torchvision state dicts: layouts, error messages, file loading (no torch needed)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.configs import load_config, validate_config
from maskrcnn_jax.modeling import ResNet, build_model, init_variables
from maskrcnn_jax.weights import (WeightImportError, from_torchvision, load_pretrained,
                                  load_state_dict, resnet_from_torchvision)
from maskrcnn_jax.weights.synthetic import synthetic_torchvision_state_dict

ROOT = pathlib.Path(__file__).resolve().parents[2]
MANIFEST = ROOT / 'tests/modeling/goldens/torchvision_maskrcnn_r50_manifest.json'


def _manifest():
  return [(k, tuple(s)) for k, s in json.loads(MANIFEST.read_text())['state_dict']]


def _resnet18_names_and_shapes():
  """torchvision resnet18 state-dict names and shapes (with BatchNorm2d counters and fc)."""
  out = [('conv1.weight', (64, 3, 7, 7))]

  def bn(prefix, c):
    return [(f'{prefix}.weight', (c,)), (f'{prefix}.bias', (c,)), (f'{prefix}.running_mean', (c,)),
            (f'{prefix}.running_var', (c,)), (f'{prefix}.num_batches_tracked', ())]

  out += bn('bn1', 64)
  cin = 64
  for i, c in enumerate((64, 128, 256, 512)):
    for j in range(2):
      p = f'layer{i + 1}.{j}'
      out += [(f'{p}.conv1.weight', (c, cin if j == 0 else c, 3, 3))] + bn(f'{p}.bn1', c)
      out += [(f'{p}.conv2.weight', (c, c, 3, 3))] + bn(f'{p}.bn2', c)
      if j == 0 and i > 0:
        out += [(f'{p}.downsample.0.weight', (c, cin, 1, 1))] + bn(f'{p}.downsample.1', c)
    cin = c
  return out + [('fc.weight', (1000, 512)), ('fc.bias', (1000,))]


def test_resnet18_import_layout_and_forward():
  sd = synthetic_torchvision_state_dict(_resnet18_names_and_shapes(), seed=1)
  variables = resnet_from_torchvision(sd, 18)
  np.testing.assert_array_equal(variables['params']['conv1']['kernel'],
                                sd['conv1.weight'].transpose(2, 3, 1, 0))
  bn = variables['batch_stats']['layer2']['block0']['downsample_bn']
  np.testing.assert_array_equal(bn['var'], sd['layer2.0.downsample.1.running_var'])
  out = ResNet(18).apply(variables, jnp.ones((1, 64, 64, 3)))
  assert out['c5'].shape == (1, 2, 2, 512)
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_resnet50_import_from_maskrcnn_prefix_and_trainable_bn():
  sd = synthetic_torchvision_state_dict(
      [(k, s) for k, s in _manifest() if k.startswith('backbone.body.')], seed=0)
  frozen = resnet_from_torchvision(sd, 50, prefix='backbone.body.')
  trainable = resnet_from_torchvision(sd, 50, finetune_bn=True, prefix='backbone.body.')
  np.testing.assert_array_equal(frozen['batch_stats']['bn1']['scale'],
                                trainable['params']['bn1']['scale'])
  assert set(trainable['batch_stats']['bn1']) == {'mean', 'var'}
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
  a = ResNet(50).apply(frozen, x)['c5']
  b = ResNet(50, finetune_bn=True).apply(trainable, x)['c5']  # running averages in eval mode
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_errors_name_missing_unexpected_and_mismatched_keys():
  names = _resnet18_names_and_shapes()
  sd = synthetic_torchvision_state_dict(names, seed=1)
  broken = dict(sd)
  del broken['layer3.1.conv2.weight']
  broken['layer9.0.conv1.weight'] = np.zeros((1,), np.float32)
  broken['layer1.0.bn1.running_mean'] = np.zeros((65,), np.float32)
  with pytest.raises(WeightImportError) as info:
    resnet_from_torchvision(broken, 18)
  message = str(info.value)
  assert 'layer3.1.conv2.weight' in message
  assert 'layer9.0.conv1.weight' in message
  assert 'layer1.0.bn1.running_mean' in message and '(65,)' in message
  with pytest.raises(WeightImportError, match='missing'):
    resnet_from_torchvision(sd, 34)


def test_maskrcnn_import_accepts_legacy_names():
  config = load_config(ROOT / 'configs/torchvision_r50.py')
  sd = synthetic_torchvision_state_dict(_manifest(), seed=0)
  legacy = {}
  for k, v in sd.items():
    k = k.replace('rpn.head.conv.0.0.', 'rpn.head.conv.')
    for i in range(4):
      k = k.replace(f'roi_heads.mask_head.{i}.0.', f'roi_heads.mask_head.mask_fcn{i + 1}.')
      k = k.replace(f'fpn.inner_blocks.{i}.0.', f'fpn.inner_blocks.{i}.')
      k = k.replace(f'fpn.layer_blocks.{i}.0.', f'fpn.layer_blocks.{i}.')
    legacy[k] = v
  model = build_model(config.model)
  target = jax.eval_shape(lambda k: init_variables(model, k, (128, 128)), jax.random.key(0))
  kwargs = dict(pooler_size=config.model.roi.pooler_size, min_level=config.model.min_level)
  a = from_torchvision(sd, target, **kwargs)
  b = from_torchvision(legacy, target, **kwargs)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  # fc6 rows: torchvision flattens (C, 7, 7), the model (7, 7, C).
  w = sd['roi_heads.box_head.fc6.weight']
  ours = a['params']['box_head']['fc6']['kernel']
  np.testing.assert_array_equal(ours[(2 * 7 + 3) * 256 + 5], w[:, 5 * 49 + 2 * 7 + 3])
  deconv = sd['roi_heads.mask_predictor.conv5_mask.weight']  # (in, out, 2, 2)
  np.testing.assert_array_equal(a['params']['mask_head']['deconv']['kernel'][1, 0],
                                deconv[:, :, 1, 0])


def test_load_state_dict_npz_and_errors(tmp_path):
  sd = {'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3), 'a.bias': np.ones(2, np.float32)}
  np.savez(tmp_path / 'w.npz', **sd)
  loaded = load_state_dict(tmp_path / 'w.npz')
  assert set(loaded) == set(sd)
  np.testing.assert_array_equal(loaded['a.weight'], sd['a.weight'])
  with pytest.raises(FileNotFoundError):
    load_state_dict(tmp_path / 'missing.npz')
  (tmp_path / 'w.bin').write_bytes(b'')
  with pytest.raises(ValueError, match='unsupported'):
    load_state_dict(tmp_path / 'w.bin')


def test_load_pretrained_backbone_into_a_whole_model(tmp_path):
  """config.init.torchvision_backbone: an ImageNet resnet18 file replaces the backbone only."""
  config = load_config(ROOT / 'configs/tiny.py')
  sd = synthetic_torchvision_state_dict(_resnet18_names_and_shapes(), seed=3)
  path = tmp_path / 'resnet18.npz'
  np.savez(path, **sd)
  config.init.torchvision_backbone = str(path)
  validate_config(config)
  model = build_model(config.model)
  fresh = jax.device_get(init_variables(model, jax.random.key(0), (64, 64)))
  loaded = load_pretrained(fresh, backbone_path=str(path), depth=18, finetune_bn=False,
                           pooler_size=config.model.roi.pooler_size,
                           min_level=config.model.min_level)
  # torchvision conv (O, I, kh, kw) -> flax (kh, kw, I, O); the rest of the model is untouched.
  np.testing.assert_array_equal(loaded['params']['backbone']['conv1']['kernel'],
                                np.transpose(sd['conv1.weight'], (2, 3, 1, 0)))
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(fresh)
  for a, b in zip(jax.tree_util.tree_leaves(loaded['params']['fpn']),
                  jax.tree_util.tree_leaves(fresh['params']['fpn'])):
    np.testing.assert_array_equal(a, b)
  # A missing file is named with its config key at validation time.
  config.init.torchvision_backbone = str(tmp_path / 'missing.npz')
  with pytest.raises(Exception, match='init.torchvision_backbone'):
    validate_config(config)
