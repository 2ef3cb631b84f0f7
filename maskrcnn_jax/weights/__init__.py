"""Weight importers: torchvision ResNet / Mask R-CNN state dicts -> flax variables, checkpoints of
ours as the start of another run (``config.init.checkpoint``, also with another number of
classes), and the deterministic synthetic state dicts used by the parity tests."""

from maskrcnn_jax.weights.torchvision import (from_torchvision, load_pretrained, load_state_dict,
                                              resnet_from_torchvision)
from maskrcnn_jax.weights.transfer import (CLASS_DEPENDENT, CheckpointMismatchError,
                                           WeightImportError, checkpoint_item_dir, from_variables,
                                           load_checkpoint, read_checkpoint_variables)

__all__ = ['CLASS_DEPENDENT', 'CheckpointMismatchError', 'WeightImportError',
           'checkpoint_item_dir', 'from_torchvision', 'from_variables', 'load_checkpoint',
           'load_pretrained', 'load_state_dict', 'read_checkpoint_variables',
           'resnet_from_torchvision']
