"""Weight importers: torchvision ResNet / Mask R-CNN state dicts -> flax variables, and the
deterministic synthetic state dicts used by the parity tests."""

from maskrcnn_jax.weights.torchvision import (WeightImportError, from_torchvision,
                                              load_pretrained, load_state_dict,
                                              resnet_from_torchvision)

__all__ = ['WeightImportError', 'from_torchvision', 'load_pretrained', 'load_state_dict',
           'resnet_from_torchvision']
