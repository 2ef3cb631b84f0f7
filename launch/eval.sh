#!/usr/bin/env bash
# Evaluates a checkpoint of a COCO run on val2017 (5000 images) with pycocotools, as the
# reference's evaluation.sh; batch 8 per GPU. Writes <WORKDIR>/coco_results_step<N>.json and
# appends a line to <WORKDIR>/eval_metrics.jsonl.
# Usage: launch/eval.sh WORKDIR [STEP (default: the latest)] [float16|bfloat16|float32] [overrides...]
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 WORKDIR [STEP] [PRECISION] [--config.key=value ...]" >&2
  exit 2
fi
WORKDIR=$1
STEP=${2:--1}
PRECISION=${3:-float32}
shift $(( $# >= 3 ? 3 : $# ))
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}
cd "$REPO"
exec "$PYTHON" -m maskrcnn_jax.main --config=configs/coco_r50.py --workdir="$WORKDIR" \
  --config.mode=eval \
  --config.data.tfds_data_dir="$TFDS_DATA_DIR" \
  --config.model.precision="$PRECISION" \
  --config.eval.checkpoint_step="$STEP" \
  --config.eval.per_device_batch_size=8 \
  "$@"
