"""Parameter counts equal torchvision's (counts recorded in the goldens manifest)."""

import json
import pathlib

import jax
import numpy as np

from maskrcnn_jax.configs import load_config
from maskrcnn_jax.modeling import ResNet, build_model, init_variables

ROOT = pathlib.Path(__file__).resolve().parents[2]
MANIFEST = ROOT / 'tests/modeling/goldens/torchvision_maskrcnn_r50_manifest.json'


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _counts():
  return json.loads(MANIFEST.read_text())['parameter_counts']


def test_resnet50_backbone_matches_torchvision():
  # Frozen batch norm: its four tensors are constants (batch_stats), as torchvision's
  # FrozenBatchNorm2d buffers, so only the convolutions count.
  shapes = jax.eval_shape(ResNet(50).init, jax.random.key(0), np.zeros((1, 64, 64, 3)))
  assert _count(shapes['params']) == _counts()['backbone_body_resnet50']


def test_resnet50_trainable_bn_matches_torchvision_imagenet_without_fc():
  shapes = jax.eval_shape(ResNet(50, finetune_bn=True).init, jax.random.key(0),
                          np.zeros((1, 64, 64, 3)))
  fc = 2048 * 1000 + 1000
  assert _count(shapes['params']) == _counts()['resnet50_imagenet'] - fc


def test_whole_model_matches_torchvision():
  config = load_config(ROOT / 'configs/torchvision_r50.py')
  model = build_model(config.model)
  shapes = jax.eval_shape(lambda k: init_variables(model, k, (128, 128)), jax.random.key(0))
  assert _count(shapes['params']) == _counts()['maskrcnn_resnet50_fpn']
  assert set(shapes) == {'params', 'batch_stats'}
