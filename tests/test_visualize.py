"""Tests for maskrcnn_jax.visualize: mask blending, boxes, labels, thresholds, inputs, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from maskrcnn_jax.visualize import category_color, draw_instances

H, W = 40, 60


def _image(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _record(n: int = 1, with_masks: bool = False, **overrides) -> dict:
  record = dict(boxes=np.array([[10.0, 8.0, 40.0, 30.0]] * n).reshape(n, 4),
                scores=np.full((n,), 0.9), category_ids=np.arange(1, n + 1))
  if with_masks:
    mask = np.zeros((n, H, W), bool)
    mask[:, 10:26, 15:41] = True
    record['masks'] = mask
  record.update(overrides)
  return record


def test_mask_blend_matches_formula_inside_and_leaves_outside_unchanged():
  image = _image()
  record = _record(with_masks=True, category_ids=np.array([7]))
  alpha = 0.3
  out = draw_instances(image, record, alpha=alpha, draw_boxes=False, draw_labels=False)
  color = np.array(category_color(7), np.float64)
  expected = np.round((1 - alpha) * image.astype(np.float64) + alpha * color).astype(np.uint8)
  # Inside the mask, one pixel away from its edge (where the outline may be drawn).
  np.testing.assert_array_equal(out[11:25, 16:40], expected[11:25, 16:40])
  outside = ~record['masks'][0]
  np.testing.assert_array_equal(out[outside], image[outside])
  # The blend really changed the pixels (the test image is not already the colour).
  assert not np.array_equal(out[11:25, 16:40], image[11:25, 16:40])


def test_alpha_one_paints_the_colour_and_alpha_zero_keeps_the_image():
  image = _image(1)
  record = _record(with_masks=True)
  full = draw_instances(image, record, alpha=1.0, draw_boxes=False, draw_labels=False)
  assert (full[12:24, 17:39] == np.array(category_color(1), np.uint8)).all()
  none = draw_instances(image, record, alpha=0.0, draw_boxes=False, draw_labels=False)
  np.testing.assert_array_equal(none[11:25, 16:40], image[11:25, 16:40])


def test_input_is_not_modified_and_output_is_uint8_hxwx3():
  image = _image()
  before = image.copy()
  out = draw_instances(image, _record(with_masks=True))
  np.testing.assert_array_equal(image, before)
  assert out.dtype == np.uint8 and out.shape == (H, W, 3)
  assert out is not image and not np.shares_memory(out, image)


def test_box_outline_takes_the_colour_and_inside_is_unchanged():
  image = np.full((H, W, 3), 128, np.uint8)
  out = draw_instances(image, _record(category_ids=np.array([3])), draw_labels=False)
  color = np.array(category_color(3), np.uint8)
  for y, x in [(8, 25), (30, 25), (20, 10), (20, 40)]:  # top, bottom, left, right edges
    np.testing.assert_array_equal(out[y, x], color)
  np.testing.assert_array_equal(out[20, 25], image[20, 25])
  np.testing.assert_array_equal(out[2, 2], image[2, 2])


def test_line_width_widens_the_outline():
  image = np.full((H, W, 3), 128, np.uint8)
  thin = draw_instances(image, _record(), draw_labels=False, line_width=1)
  thick = draw_instances(image, _record(), draw_labels=False, line_width=3)
  np.testing.assert_array_equal(thin[10, 25], image[10, 25])
  np.testing.assert_array_equal(thick[10, 25], np.array(category_color(1), np.uint8))


def test_instance_below_score_threshold_is_not_drawn():
  image = _image()
  record = _record(with_masks=True, scores=np.array([0.4]))
  out = draw_instances(image, record, score_threshold=0.5)
  np.testing.assert_array_equal(out, image)
  assert not np.array_equal(draw_instances(image, record, score_threshold=0.4), image)


def test_higher_score_is_drawn_on_top():
  image = _image()
  record = _record(n=2, with_masks=True, scores=np.array([0.9, 0.5]))
  out = draw_instances(image, record, alpha=1.0, draw_boxes=False, draw_labels=False)
  np.testing.assert_array_equal(out[15, 20], np.array(category_color(1), np.uint8))


def test_category_color_is_stable_and_distinct_for_neighbours():
  assert category_color(1) == category_color(1)
  assert category_color(1) != category_color(2)
  colors = [category_color(i) for i in range(1, 81)]
  assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
             for c in colors)
  assert all(a != b for a, b in zip(colors, colors[1:]))


def test_no_instances_returns_an_identical_copy():
  image = _image()
  record = dict(boxes=np.zeros((0, 4)), scores=np.zeros((0,)), category_ids=np.zeros((0,), int),
                masks=np.zeros((0, H, W), bool))
  out = draw_instances(image, record)
  np.testing.assert_array_equal(out, image)
  assert out is not image and not np.shares_memory(out, image)


def test_pil_and_path_inputs_match_the_array(tmp_path):
  image = _image()
  record = _record(with_masks=True, category_names=['person'])
  expected = draw_instances(image, record)
  np.testing.assert_array_equal(draw_instances(Image.fromarray(image), record), expected)
  path = tmp_path / 'image.png'
  Image.fromarray(image).save(path)
  np.testing.assert_array_equal(draw_instances(path, record), expected)
  np.testing.assert_array_equal(draw_instances(str(path), record), expected)
  np.testing.assert_array_equal(draw_instances(Image.fromarray(image).convert('RGBA'), record),
                                expected)


def test_labels_draw_near_the_box_top_left():
  image = np.full((H, W * 2, 3), 128, np.uint8)  # wide enough that the label needs no shift
  record = _record(category_names=['person'])
  plain = draw_instances(image, record, draw_labels=False)
  labelled = draw_instances(image, record, draw_labels=True)
  assert np.any(labelled != plain)
  # Without the box outline in the way, the label's own extent shows.
  ys, xs = np.nonzero(np.any(draw_instances(image, record, draw_boxes=False) != image, axis=-1))
  assert ys.size
  # No room above the box (top at y=8): the label starts at its top-left corner, just inside.
  assert xs.min() == 10 and ys.min() == 8 and ys.max() < 30
  # The filled background is in the category's colour.
  np.testing.assert_array_equal(labelled[9, 11], np.array(category_color(1), np.uint8))
  # Without a name the category id is written, a different text from "person 0.90".
  by_id = draw_instances(image, _record(), draw_labels=True)
  assert not np.array_equal(by_id, labelled)


def test_label_is_kept_inside_a_narrow_image():
  image = np.full((H, W, 3), 128, np.uint8)
  record = _record(category_names=['a rather long category name'])
  plain = draw_instances(image, record, draw_labels=False)
  labelled = draw_instances(image, record, draw_labels=True)
  ys, xs = np.nonzero(np.any(labelled != plain, axis=-1))
  assert ys.size and xs.min() <= 10 and ys.min() >= 0


def test_label_goes_above_a_box_with_room():
  image = np.full((H * 2, W * 2, 3), 128, np.uint8)
  record = _record(boxes=np.array([[20.0, 50.0, 80.0, 70.0]]))
  plain = draw_instances(image, record, draw_labels=False)
  labelled = draw_instances(image, record)
  ys, _ = np.nonzero(np.any(labelled != plain, axis=-1))
  assert ys.size and ys.max() < 50


@pytest.mark.parametrize('overrides, field', [
    (dict(boxes=np.zeros((1, 3))), 'boxes'),
    (dict(scores=np.zeros((2,))), 'scores'),
    (dict(category_ids=np.zeros((3,), int)), 'category_ids'),
    (dict(masks=np.zeros((1, H, W + 1), bool)), 'masks'),
    (dict(masks=np.zeros((2, H, W), bool)), 'masks'),
    (dict(category_names=['a', 'b']), 'category_names'),
])
def test_bad_record_fields_raise_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    draw_instances(_image(), _record(**overrides))


@pytest.mark.parametrize('image', [np.zeros((H, W), np.uint8), np.zeros((H, W, 4), np.uint8),
                                   np.zeros((H, W, 3), np.float32)])
def test_bad_image_raises_naming_the_image(image):
  with pytest.raises(ValueError, match='image'):
    draw_instances(image, _record())
