"""The parameterised heads of Mask R-CNN: RPN head, box head (two-FC + predictor), mask head.

Heads hold parameters only; anchor labelling, proposal selection, box coding, sampling and losses
are pure functions in :mod:`maskrcnn_jax.ops`. Outputs that feed box arithmetic or losses are
returned in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import MSRA_FILL, Deconv2x2, Dense, conv

Dtype = Any


class RPNHead(nn.Module):
  """Shared 3x3 conv + ReLU, then a 1x1 objectness conv (A outputs) and a 1x1 box-delta conv
  (4A outputs), applied to every level with the same weights (torchvision's ``RPNHead``).

  Attributes:
    num_anchors: A, anchor shapes per location.
    channels: channels of the shared conv (= the FPN's).
    dtype: compute dtype; parameters are float32.
    conv_kernel_grad: 'xla' or 'matmul' (:mod:`maskrcnn_jax.ops.conv`).
    products: 'float32' or 'bfloat16' (:class:`maskrcnn_jax.modeling.layers.Conv`).
  """
  num_anchors: int
  channels: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_kernel_grad: str = 'xla'
  products: str = 'float32'

  @nn.compact
  def __call__(self, features: Mapping[str, jnp.ndarray]):
    """features: level -> (B, Hl, Wl, C).

    Returns:
      scores: level -> (B, Hl * Wl * A) float32 objectness logits, location-major (y, x, a) as
        :mod:`maskrcnn_jax.ops.anchors`.
      deltas: level -> (B, Hl * Wl * A, 4) float32 (dx, dy, dw, dh), same order.
    """
    init = nn.initializers.normal(0.01)  # torchvision and the reference
    layer = functools.partial(conv, use_bias=True, dtype=self.dtype, kernel_init=init,
                              kernel_grad=self.conv_kernel_grad, products=self.products)
    shared = layer(self.channels, 3, name='conv')
    objectness = layer(self.num_anchors, 1, name='objectness')
    box_deltas = layer(4 * self.num_anchors, 1, name='deltas')
    scores, deltas = {}, {}
    for level in sorted(features):
      x = nn.relu(shared(features[level]))
      b = x.shape[0]
      # Channel a of the objectness conv and channels 4a..4a+3 of the delta conv belong to
      # anchor shape a (torchvision's permute_and_flatten order).
      scores[level] = objectness(x).astype(jnp.float32).reshape(b, -1)
      deltas[level] = box_deltas(x).astype(jnp.float32).reshape(b, -1, 4)
    return scores, deltas


class BoxHead(nn.Module):
  """Two fully connected layers with ReLU on flattened RoI features, then the class logits and
  the class-specific box deltas (torchvision's ``TwoMLPHead`` + ``FastRCNNPredictor``; the
  reference's ``fast_rcnn_mlp_head``).

  Attributes:
    num_classes: K, background included.
    mlp_dim: width of ``fc6`` and ``fc7`` (1024).
    products: 'float32' or 'bfloat16' (:class:`maskrcnn_jax.modeling.layers.Conv`).
  """
  num_classes: int
  mlp_dim: int = 1024
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  products: str = 'float32'

  @nn.compact
  def __call__(self, roi_features):
    """roi_features: (B, R, S, S, C) pooled features.

    Returns:
      class_logits: (B, R, K) float32.
      box_deltas: (B, R, K, 4) float32, per class (dx, dy, dw, dh) for weights (10, 10, 5, 5).
    """
    b, r = roi_features.shape[:2]
    # Flattened (S, S, C)-major: the weight importer permutes torchvision's (C, S, S) rows.
    x = roi_features.reshape(b, r, -1).astype(self.dtype)
    dense = lambda n, name, init=nn.initializers.lecun_normal(): Dense(
        n, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init,
        products=self.products, name=name)
    x = nn.relu(dense(self.mlp_dim, 'fc6')(x))
    x = nn.relu(dense(self.mlp_dim, 'fc7')(x))
    logits = dense(self.num_classes, 'class_logits', nn.initializers.normal(0.01))(x)
    deltas = dense(4 * self.num_classes, 'box_deltas', nn.initializers.normal(0.001))(x)
    return (logits.astype(jnp.float32),
            deltas.astype(jnp.float32).reshape(b, r, self.num_classes, 4))


class MaskHead(nn.Module):
  """``num_convs`` 3x3 convs + ReLU, a 2x2 stride-2 deconvolution + ReLU, and a 1x1 conv to one
  mask logit per class (torchvision's ``MaskRCNNHeads`` + ``MaskRCNNPredictor``; the reference's
  ``mask_rcnn_heads``).

  Attributes:
    num_classes: K, background included (its channel is never used).
    num_convs: number of 3x3 convs (4).
    conv_dim: their channels and the deconvolution's (256).
    predictor_init_std: init of the 1x1 logits conv: 0 = MSRA fill (He normal, fan-out: std
      ``sqrt(2 / num_classes)``), as every other conv here and as the reference's
      ``mask_fcn_logits`` and torchvision's ``MaskRCNNPredictor``; > 0 = normal(std)
      (Detectron's 0.001, which starts the mask branch ~150x more weakly coupled: its gradients
      into the head's convs are scaled by the predictor's weights).
  """
  num_classes: int
  num_convs: int = 4
  conv_dim: int = 256
  predictor_init_std: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv_kernel_grad: str = 'xla'
  products: str = 'float32'

  @nn.compact
  def __call__(self, roi_features):
    """roi_features: (B, R, S, S, C) -> (B, R, 2S, 2S, K) float32 mask logits."""
    b, r, s = roi_features.shape[:3]
    x = roi_features.reshape((b * r,) + roi_features.shape[2:]).astype(self.dtype)
    for i in range(self.num_convs):
      x = nn.relu(conv(self.conv_dim, 3, use_bias=True, dtype=self.dtype,
                       kernel_grad=self.conv_kernel_grad, products=self.products,
                       name=f'mask_fcn{i + 1}')(x))
    x = nn.relu(Deconv2x2(self.conv_dim, dtype=self.dtype, products=self.products,
                          name='deconv')(x))
    init = (nn.initializers.normal(self.predictor_init_std) if self.predictor_init_std > 0
            else MSRA_FILL)
    x = conv(self.num_classes, 1, use_bias=True, dtype=self.dtype, kernel_init=init,
             kernel_grad=self.conv_kernel_grad, products=self.products, name='mask_logits')(x)
    return x.astype(jnp.float32).reshape(b, r, 2 * s, 2 * s, self.num_classes)
