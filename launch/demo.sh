#!/usr/bin/env bash
# `make demo`: generates the shapes dataset, prepares it, trains and evaluates on the CPU
# (configs/shapes_demo.py) and prints the final box and mask AP with the elapsed time.
# Usage: launch/demo.sh [DEMO_DIR (default /tmp/maskrcnn_shapes_demo)] [overrides...]
# The workdir is started afresh each time (the figure reported is a whole run); the previous
# run moves to DEMO_DIR/work.previous.
set -euo pipefail
DEMO_DIR=${1:-/tmp/maskrcnn_shapes_demo}
shift $(( $# >= 1 ? 1 : 0 ))
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
cd "$REPO"
START=$(date +%s)
echo "[demo] $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a), cores: $(nproc)"
if [[ ! -f "$DEMO_DIR/raw/annotations/instances_val2017.json" ]]; then
  "$PYTHON" -m maskrcnn_jax.data.shapes --output "$DEMO_DIR/raw" --num_train 2000 --num_val 200 \
    --image_size 96
fi
"$PYTHON" -m maskrcnn_jax.data.prepare --manual_dir "$DEMO_DIR/raw" --data_dir "$DEMO_DIR/tfds" \
  --name shapes --no_progress
echo "[demo] data ready after $(( $(date +%s) - START )) s"
if [[ -d "$DEMO_DIR/work" ]]; then  # keep the previous run (one generation) rather than delete it
  rm -rf "$DEMO_DIR/work.previous"
  mv "$DEMO_DIR/work" "$DEMO_DIR/work.previous"
  echo "[demo] the previous run is kept in $DEMO_DIR/work.previous (the one before it is removed)"
fi
"$PYTHON" -m maskrcnn_jax.main --config=configs/shapes_demo.py --workdir="$DEMO_DIR/work" \
  --config.data.tfds_data_dir="$DEMO_DIR/tfds" "$@" 2>&1 | tee "$DEMO_DIR/train.log" \
  | grep -E "final metrics|error|Error|steps/s|evaluation at step" || true
END=$(date +%s)
"$PYTHON" - "$DEMO_DIR/work/eval_metrics.jsonl" "$(( END - START ))" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
last = lines[-1]
print(f"[demo] step {last['step']}: box AP {last['bbox/AP']:.3f}, mask AP {last['segm/AP']:.3f} "
      f"(AP50 {last['bbox/AP50']:.3f} / {last['segm/AP50']:.3f}); {sys.argv[2]} s end to end")
PY
echo "[demo] outputs: checkpoints $DEMO_DIR/work/checkpoints, metrics $DEMO_DIR/work/eval_metrics.jsonl,"
echo "[demo]   detections $DEMO_DIR/work/coco_results_step*.json, log $DEMO_DIR/train.log"
echo "[demo] draw predictions: python -m maskrcnn_jax.predict --workdir=$DEMO_DIR/work \\"
echo "[demo]   --images=$DEMO_DIR/raw/val2017 --out=$DEMO_DIR/predictions"
