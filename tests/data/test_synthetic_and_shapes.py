"""Synthetic batches and the shapes dataset: contract, determinism, no TensorFlow needed."""

import json
import subprocess
import sys

import numpy as np
from pycocotools import mask as mask_util

from data_helpers import REPO
from maskrcnn_jax.data import shapes
from maskrcnn_jax.data import spec
from maskrcnn_jax.data import synthetic

_BLOCK_TF = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, _Block())
import maskrcnn_jax.data as data
from maskrcnn_jax.data import synthetic, shapes, spec
b = data.synthetic_batch(2, (128, 192), 5, 8)
assert b['images'].shape == (2, 128, 192, 3)
assert not any(m.startswith('tensorflow') for m in sys.modules)
print('ok')
"""


def test_imports_without_tensorflow():
  result = subprocess.run([sys.executable, '-c', _BLOCK_TF], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr


def test_synthetic_batch_follows_the_spec():
  expected = spec.batch_spec(3, (256, 384), 10, 16)
  batch = synthetic.synthetic_batch(3, (256, 384), 10, 16, num_classes=5, seed=1)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch['example_valid'].all()
  for b in range(3):
    h, w = batch['image_sizes'][b]
    valid = batch['gt_valid'][b]
    boxes = batch['gt_boxes'][b][valid]
    assert valid.any() and (boxes[:, 2:] > boxes[:, :2]).all()
    assert (boxes[:, [2]] <= w + 1e-3).all() and (boxes[:, [3]] <= h + 1e-3).all()
    assert ((batch['gt_classes'][b][valid] >= 1) & (batch['gt_classes'][b][valid] < 5)).all()
    assert not batch['gt_masks'][b][~valid].any() and batch['gt_masks'][b][valid].max() == 255
  again = synthetic.synthetic_batch(3, (256, 384), 10, 16, num_classes=5, seed=1)
  for key in batch:
    np.testing.assert_array_equal(batch[key], again[key])
  it = synthetic.synthetic_batches(2, (128, 128), 4, 8, start_step=0)
  first = [next(it) for _ in range(3)]
  resumed = next(synthetic.synthetic_batches(2, (128, 128), 4, 8, start_step=2))
  np.testing.assert_array_equal(resumed['images'], first[2]['images'])


def test_shapes_dataset(tmp_path):
  shapes.main(['--output', str(tmp_path / 'a'), '--num_train', '12', '--num_val', '3',
               '--image_size', '96'])
  shapes.write_dataset(str(tmp_path / 'b'), 12, 3, 96)
  for split in ('train', 'val'):
    a = (tmp_path / 'a' / 'annotations' / f'instances_{split}2017.json').read_bytes()
    assert a == (tmp_path / 'b' / 'annotations' / f'instances_{split}2017.json').read_bytes()
  coco = json.loads((tmp_path / 'a' / 'annotations' / 'instances_train2017.json').read_text())
  assert [c['id'] for c in coco['categories']] == [1, 2, 3]
  assert len(coco['images']) == 12 and (tmp_path / 'a' / 'train2017' / '000000000012.jpg').exists()
  for image in coco['images']:
    anns = [a for a in coco['annotations'] if a['image_id'] == image['id']]
    assert 1 <= len(anns) <= 4
    masks = [mask_util.decode(a['segmentation']) for a in anns]
    # Occlusion leaves the visible masks disjoint; areas are pixel counts, boxes tight.
    assert (np.sum(masks, axis=0) <= 1).all()
    for ann, mask in zip(anns, masks):
      assert ann['area'] == mask.sum() >= shapes.MIN_VISIBLE_PIXELS
      ys, xs = np.nonzero(mask)
      assert ann['bbox'] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


def test_shapes_dataset_builds(tmp_path):
  from data_helpers import build  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  shapes.write_dataset(str(tmp_path / 'shapes'), 4, 2, 64)
  build(tmp_path / 'shapes', tmp_path / 'tfds')
  source = pipeline.Source('coco_instances', 'train', str(tmp_path / 'tfds'))
  assert len(source) == 4 and source.metadata['num_classes'] == 4
