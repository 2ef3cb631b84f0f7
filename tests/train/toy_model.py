"""A tiny stand-in for Mask R-CNN with the same call contract, for fast tests of the train step.

Its parameters are named like the real backbone's (``backbone/conv1``, ``bn1``, ``layer1``,
``layer2``) so that `maskrcnn_jax.modeling.frozen_param_mask` applies, plus a dense head with a
bias. The loss is a per-example mean (a regression of the mean ground-truth box from pooled
features), so the gradient of a batch is the mean of per-example gradients and data parallelism
must reproduce the single-device update exactly. With ``batch_axis`` (``loss_normalization=
'global'``) its normaliser, the per-device batch size, is averaged over the devices.
"""

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from maskrcnn_jax.modeling import layers


class ToyBackbone(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.conv(4, 3, 2, dtype=self.dtype, name='conv1')(x)
    x = layers.batch_norm('bn1', True, False, 1e-5, self.dtype)(x)
    x = nn.relu(layers.conv(4, 3, 1, use_bias=True, dtype=self.dtype, name='layer1')(x))
    x = nn.relu(layers.conv(8, 3, 2, use_bias=True, dtype=self.dtype, name='layer2')(x))
    return x


class ToyDetector(nn.Module):
  """images (B, H, W, 3) -> losses (train) or 1 detection per image (inference)."""
  dtype: jnp.dtype = jnp.float32
  num_detections: int = 3
  mask_size: int = 4

  @nn.compact
  def __call__(self, images, image_sizes, gt=None, train=False, batch_axis=None):
    feat = ToyBackbone(self.dtype, name='backbone')(images)
    pooled = feat.astype(jnp.float32).mean((1, 2))
    pred = nn.Dense(4, name='box_head')(pooled)  # (B, 4)
    if not train:
      b = images.shape[0]
      d = self.num_detections
      boxes = jnp.broadcast_to(jnp.abs(pred[:, None, :]) * 10 + jnp.array([0, 0, 8, 8.]),
                               (b, d, 4))
      return {'boxes': boxes, 'scores': jnp.full((b, d), 0.5),
              'classes': jnp.ones((b, d), jnp.int32),
              'masks': jnp.ones((b, d, self.mask_size, self.mask_size)) * 0.9,
              'valid': jnp.ones((b, d), bool)}
    self.make_rng('sampling')  # the real model needs this stream; fail if it is missing
    valid = gt.valid.astype(jnp.float32)[..., None]
    target = (gt.boxes * valid).sum(1) / jnp.maximum(valid.sum(1), 1.0) / 100.0
    per_example = jnp.sum((pred - target) ** 2, axis=-1)
    if batch_axis is None:
      loss = jnp.mean(per_example)
    else:
      loss = jnp.sum(per_example) / lax.pmean(jnp.float32(per_example.shape[0]), batch_axis)
    zero = jnp.zeros((), jnp.float32)
    return {'rpn_score_loss': loss, 'rpn_box_loss': zero, 'fast_rcnn_class_loss': zero,
            'fast_rcnn_box_loss': zero, 'mask_loss': zero, 'total_loss': loss,
            'num_positive_anchors': jnp.sum(gt.valid).astype(jnp.int32),
            'num_foreground_rois': jnp.sum(gt.valid).astype(jnp.int32)}
