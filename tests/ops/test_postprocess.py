"""Detection post-processing (maskrcnn_jax/ops/postprocess.py) on a hand-checked case."""

import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.ops.postprocess import detections_from_boxes


def test_detections_from_boxes_small_case():
  # Two proposals, three classes (0 = background). Zero deltas: boxes are the proposals.
  proposals = jnp.array([[0., 0., 10., 10.], [1., 1., 11., 11.]])
  logits = jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.2, 0.5, 0.3]]))
  deltas = jnp.zeros((2, 3, 4))
  boxes, scores, classes, valid = detections_from_boxes(
      proposals, jnp.array([True, True]), logits, deltas, jnp.array([8, 20]),
      box_weights=(10., 10., 5., 5.), score_threshold=0.25, min_box_size=0.0, pre_nms_topk=10,
      nms_threshold=0.5, max_detections=4)
  # Class 1: 0.6 (roi 0) suppresses 0.5 (roi 1, IoU 0.68); class 2: 0.3 and 0.3 -> roi 0 first
  # (lower candidate index on ties), then suppresses roi 1.
  np.testing.assert_array_equal(valid, [True, True, False, False])
  np.testing.assert_allclose(scores[:2], [0.6, 0.3], rtol=1e-5)
  np.testing.assert_array_equal(classes[:2], [1, 2])
  np.testing.assert_allclose(boxes[0], [0., 0., 10., 8.])  # clipped to height 8
