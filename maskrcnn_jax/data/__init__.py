"""Input data: the `coco_instances` TFDS builder, train/eval pipelines, synthetic and shapes data.

Importing this package does not import TensorFlow; the names below are loaded on first use.
`synthetic`, `shapes` and `spec` never import TensorFlow (benchmarks run where it is absent).

Batch contract
--------------
Every pipeline (`train_iterator`, `eval_iterator`, `synthetic.synthetic_batches`) yields dicts of
NumPy arrays whose shapes never change during a run (`spec.batch_spec` gives them). With B the
batch size on this host, (H, W) = config.data.image_size, N = config.data.max_instances and
S = config.data.gt_mask_size + 2 * spec.MASK_PADDING (the one owner of the margin, 2):

  images          (B, H, W, 3) uint8   RGB, the resized image at the top-left, zero padding;
                                       normalisation (mean/std) happens on the device.
  image_sizes     (B, 2) int32         (height, width) of the valid resized region.
  image_ids       (B,) int64           COCO image id (0 for padding examples).
  original_sizes  (B, 2) int32         (height, width) of the original image.
  scales          (B,) float32         resized = original * scale (same for x and y).
  example_valid   (B,) bool            False for the padding of a final partial eval batch.
  gt_boxes        (B, N, 4) float32    xyxy in canvas pixels (after resize and flip).
  gt_classes      (B, N) int32         class indices (0 = padding); COCO ids, or the dataset's
                                       contiguous mapping (metadata `class_index_to_category_id`).
  gt_is_crowd     (B, N) bool          crowd objects (never present in training by default).
  gt_valid        (B, N) bool          real instances; the rest is zero padding.
  gt_masks        (B, N, S, S) uint8   each mask cropped to its box, resized bilinearly to
                                       gt_mask_size, zero-padded by 2: round(255 * value),
                                       255 = fully inside. The S grid covers the box expanded by
                                       2 / gt_mask_size of its size on each side, sample centres
                                       at half-pixel offsets (`preprocess` module docstring).

Entry points
------------
  train_iterator(source, settings, batch_size, start_step, seed=)  resumable, per-host sharded
  eval_iterator(source, settings, batch_size, num_examples=-1)     one pass, padded final batch
  (settings: `maskrcnn_jax.settings.InputSettings.from_config(config.data)`; from a config,
  `maskrcnn_jax.train.experiment.build_train_iterator` / `build_eval_iterator` do both.)
  synthetic.synthetic_batches(...)                                 random batches, no TensorFlow
  python -m maskrcnn_jax.data.prepare ...                          builds the TFDS dataset
  python -m maskrcnn_jax.data.shapes ...                           writes the shapes demo dataset
See docs/data.md.
"""

import importlib

_LAZY = {
    'train_iterator': 'pipeline',
    'eval_iterator': 'pipeline',
    'num_eval_batches': 'pipeline',
    'Source': 'pipeline',
    'batch_spec': 'spec',
    'empty_batch': 'spec',
    'synthetic_batch': 'synthetic',
    'synthetic_batches': 'synthetic',
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
