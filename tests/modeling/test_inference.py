"""Inference entry point of the tiny model: output contract (shapes, dtypes, masks, clipping)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.configs import load_config
from maskrcnn_jax.modeling import build_model, init_variables, normalize_images

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_inference_contract():
  config = load_config(ROOT / 'configs/tiny.py')
  model = build_model(config.model)
  h, w = config.data.image_size
  variables = init_variables(model, jax.random.key(0), (h, w))
  rng = np.random.default_rng(0)
  images_u8 = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
  sizes = np.array([[h, w], [96, 80]], np.int32)
  images = normalize_images(images_u8, sizes, config.data.pixel_mean, config.data.pixel_std)
  out = jax.device_get(jax.jit(model.apply)(variables, images, jnp.asarray(sizes)))
  d = config.model.test.detections_per_image
  m = config.model.mask.resolution
  assert out['boxes'].shape == (2, d, 4) and out['boxes'].dtype == np.float32
  assert out['scores'].shape == (2, d) and out['classes'].dtype == np.int32
  assert out['masks'].shape == (2, d, m, m) and out['valid'].dtype == bool
  assert out['valid'].any()
  for b in range(2):
    valid = out['valid'][b]
    scores = out['scores'][b][valid]
    assert np.all(np.diff(scores) <= 0)  # descending
    assert np.all(out['classes'][b][valid] >= 1)
    assert np.all(out['classes'][b][~valid] == 0) and not out['masks'][b][~valid].any()
    boxes = out['boxes'][b][valid]
    assert np.all(boxes[:, [0, 2]] <= sizes[b, 1]) and np.all(boxes[:, [1, 3]] <= sizes[b, 0])
    assert np.all(boxes >= 0)
    masks = out['masks'][b][valid]
    assert np.all((masks >= 0) & (masks <= 1))
  with pytest.raises(ValueError, match='needs the ground truth'):
    model.apply(variables, images, sizes, train=True)
