"""Fine-tuning on the shapes demo dataset from a trained model of configs/shapes_demo.py's
architecture: `config.init.checkpoint` = its workdir (the latest checkpoint; or one
``<workdir>/checkpoints/<step>`` directory).

The model is configs/shapes_demo.py's (ResNet-18-FPN at 96x96, 4 classes). The source must have
the same architecture; its number of classes may differ (a model trained on other data): then
the box classifier, box regressor and mask predictor start freshly initialised (one log line per
tensor, ``init: class-dependent ... not loaded: source ... -> target ...``) and everything else
is loaded. Only the source's params and batch_stats are read: the run starts at step 0 with a
fresh optimizer. A small learning rate (1/10 of the demo's, short warmup) and gradient clipping
(global norm 5) for a start from trained weights: with fresh class layers the gradient norm is
~5 over the first 25 steps, under 2 afterwards.

After `make demo` (data in /tmp/maskrcnn_shapes_demo/tfds, the trained source in .../work):
  python -m maskrcnn_jax.main --config=configs/finetune_shapes.py \
    --workdir=/tmp/maskrcnn_shapes_demo/finetune \
    --config.init.checkpoint=/tmp/maskrcnn_shapes_demo/work \
    --config.data.tfds_data_dir=/tmp/maskrcnn_shapes_demo/tfds
(`init.checkpoint` defaults to that demo workdir.) To see the class-change path with the demo's
source, add ``--config.model.num_classes=5`` (one spare class): the six class-dependent tensors
start fresh, the rest is the demo's.

Measured (2026-12-02, 2 CPU cores, load average ~3 with other jobs running; the source a
`make demo` workdir at box AP 0.633 / mask AP 0.591 after its 400 steps): 157 s end to end (compilation, 150 steps at ~10 images/s,
evaluation of the 200 validation images), box AP 0.739 / mask AP 0.734 (AP50 0.954 / 0.950); the
total loss, averaged over 25 steps, from 0.56 (steps 1-25) to 0.46 (126-150). With
num_classes=5 (fresh class layers): 170 s, total loss 2.41 (steps 1-25), 0.91 (26-50), 0.53
(126-150), box AP 0.731 / mask AP 0.672.
"""

import pathlib

from maskrcnn_jax.configs import import_config_module

shapes_demo = import_config_module(pathlib.Path(__file__).resolve().parent / 'shapes_demo.py')

DEMO_WORKDIR = '/tmp/maskrcnn_shapes_demo/work'  # `make demo`'s workdir (Makefile DEMO_DIR)


def get_config(arg=None):
  config = shapes_demo.get_config(arg)
  config.init.checkpoint = DEMO_WORKDIR

  train = config.train
  train.learning_rate = 0.004           # the demo's 0.04 / 10
  train.warmup_steps = 20
  train.warmup_learning_rate = 0.0
  train.total_steps = 150
  train.learning_rate_steps = (120,)
  train.learning_rate_decay_factors = (0.1,)
  train.gradient_clip_norm = 5.0        # global norm; the demo's grad_norm is ~2-3 when trained
  train.checkpoint_every_steps = 150
  train.log_every_steps = 25

  config.eval.every_steps = 150         # once, at the end (the whole validation split)
  return config
