"""maskrcnn_jax: Mask R-CNN instance segmentation in JAX/Flax."""

__version__ = '0.1.0'
