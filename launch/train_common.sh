#!/usr/bin/env bash
# Shared body of the train_{1,4,8}gpu.sh scripts (sourced, not run): trains Mask R-CNN R50-FPN
# on COCO 2017 with the reference's schedule for the GPU count, per-GPU batch 4.
# Arguments: WORKDIR [PRECISION] [extra --config.* overrides...]
#   PRECISION: float16 (the reference's AMP scripts; dynamic loss scaling), bfloat16 or float32.
# Environment: TFDS_DATA_DIR (default ~/tensorflow_datasets) holding coco_instances/coco2017
#   (python -m maskrcnn_jax.data.prepare --manual_dir /data/coco --data_dir ...).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 WORKDIR [float16|bfloat16|float32] [--config.key=value ...]" >&2
  exit 2
fi
WORKDIR=$1
PRECISION=${2:-float16}
shift $(( $# >= 2 ? 2 : 1 ))
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}
NUM_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
if [[ "$NUM_GPUS" -lt "$EXPECTED_GPUS" ]]; then
  echo "warning: $EXPECTED_GPUS GPUs expected, $NUM_GPUS visible" >&2
fi
cd "$REPO"
exec "$PYTHON" -m maskrcnn_jax.main --config=configs/coco_r50.py --workdir="$WORKDIR" \
  --config.mode=train_and_eval \
  --config.data.tfds_data_dir="$TFDS_DATA_DIR" \
  --config.model.precision="$PRECISION" \
  --config.train.per_device_batch_size=4 \
  --config.train.learning_rate="$LEARNING_RATE" \
  --config.train.total_steps="$TOTAL_STEPS" \
  --config.train.learning_rate_steps="$LR_STEPS" \
  --config.train.checkpoint_every_steps="$EVAL_EVERY" \
  --config.eval.every_steps="$EVAL_EVERY" \
  "$@"
