#!/bin/bash
# GPU checks in one go: training (bfloat16, batch 2/4/8 per GPU) and inference (bfloat16, batch
# 2/4/8) throughput on synthetic data at the reference canvas (832x1344), each with compile time,
# FLOPs/image, MFU and device memory, and a jax.profiler trace of a few steps summarised per
# stage (backbone, fpn, rpn_head, box_head, mask_head, other) and per op for batch 4 training
# and batch 8 inference. Results: one JSON per run and summary.txt under $OUT.
#
# The benchmarks are bench/benchmark_training.py and bench/benchmark_inference.py, with the
# config's flags (--config.train.per_device_batch_size=4 --config.model.precision=bfloat16 ...).
# Needs: a GPU machine with jax, flax, optax, orbax-checkpoint and absl (no TensorFlow: synthetic
# data). Without a registry there, bring clu and ml_collections as wheels: the shared folder
# beside the repository keeps them (../shared/wheels-gpu/README.md); copy them into .whl/ in the
# repository root (mkdir -p .whl && cp ../shared/wheels-gpu/*.whl .whl/ ; .whl is git-ignored),
# which this script installs from. With the device tool: carry=[".whl"], timeout_s=600 and
#     bash launch/gpu_checks.sh train && bash launch/gpu_checks.sh infer
# or, with more device time, `bash launch/gpu_checks.sh` (both parts). Each run has a
# 150-second limit; a part is 3 runs of ~1 minute compile + 40 steps on an H200 (an estimate:
# nothing here has run on a GPU yet). Results land in $OUT (on the device tool: the run's $OUT,
# which comes back). STAGES=1 adds the per-stage breakdown to batch-4 training (one more
# compile per stage; only with time to spare). On a CPU, test it with
#     bash launch/gpu_checks.sh --smoke      # tiny model, 64x64, 3 steps; a few minutes on 2 cores
set -uo pipefail

cd "$(dirname "$0")/.."
SMOKE=0
PART=all
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    train|infer|all) PART=$arg ;;
    *) echo "usage: $0 [--smoke] [train|infer|all]" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-/tmp/gpu_checks}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"  # PYTHON=... to choose; the repository's .venv when it has one
[[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export TF_CPP_MIN_LOG_LEVEL=2

if [[ $SMOKE == 1 ]]; then
  CONFIG=configs/tiny_smoke.py; CANVAS="(64, 64)"; BATCHES="1 2"; PROFILE_TRAIN=1
  PROFILE_INFER=2; TRAIN_STEPS=(3 1); INFER_STEPS=(3 1); LIMIT=300
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
else
  CONFIG=configs/coco_r50.py; CANVAS="(832, 1344)"; BATCHES="2 4 8"; PROFILE_TRAIN=4
  PROFILE_INFER=8; TRAIN_STEPS=(40 15); INFER_STEPS=(40 5); LIMIT=150
fi

{
  echo "date: $(date -Is)"; echo "host: $(hostname)"; uptime
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

run() {  # run NAME SCRIPT ARGS...: one benchmark, its log and JSON under $OUT, a time limit
  local name=$1 script=$2; shift 2
  echo "=== $name"
  timeout "$LIMIT" "$PY" "bench/$script" --config="$CONFIG" --config.data.image_size="$CANVAS" \
      --config.model.precision=bfloat16 --output="$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/$name.log"
  [[ $rc == 0 ]] || echo "$name failed (exit $rc), see $OUT/$name.log"
}

for b in $BATCHES; do
  [[ $PART == infer ]] && break
  extra=()
  [[ $b == "$PROFILE_TRAIN" ]] && extra=(--profile_dir="$OUT/trace_train_b$b")
  [[ $b == "$PROFILE_TRAIN" && "${STAGES:-0}" == 1 ]] && extra+=(--stages)
  run "train_bf16_b$b" benchmark_training.py --config.train.per_device_batch_size="$b" \
      --config.benchmark.num_steps="${TRAIN_STEPS[0]}" \
      --config.benchmark.warmup_steps="${TRAIN_STEPS[1]}" "${extra[@]}"
done
for b in $BATCHES; do
  [[ $PART == train ]] && break
  extra=()
  [[ $b == "$PROFILE_INFER" ]] && extra=(--profile_dir="$OUT/trace_infer_b$b")
  run "infer_bf16_b$b" benchmark_inference.py --config.eval.per_device_batch_size="$b" \
      --config.benchmark.num_steps="${INFER_STEPS[0]}" \
      --config.benchmark.warmup_steps="${INFER_STEPS[1]}" "${extra[@]}"
done

# The traces are large: keep the summaries (in the JSONs), drop the raw files unless asked.
[[ "${KEEP_TRACES:-0}" == 1 ]] || rm -rf "$OUT"/trace_*

"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/summary.txt"
import glob, json, os, sys
out = sys.argv[1]
print(f"{'run':<16} {'img/s':>8} {'step ms':>8} {'compile s':>9} {'GFLOP/img':>9} {'MFU %':>6}"
      f" {'mem GiB':>7}  latency p50/p99 ms")
for path in sorted(glob.glob(os.path.join(out, '*.json'))):
  r = json.load(open(path))
  if 'images_per_sec' not in r:
    continue
  mem = (r.get('memory') or {}).get('peak_bytes_in_use')
  lat = r.get('latency_ms')
  mfu = f"{100 * r['mfu']:6.1f}" if r.get('mfu') is not None else f"{'-':>6}"
  mem = f"{mem / 2**30:7.2f}" if mem else f"{'-':>7}"
  lat = f"{lat['p50']:.0f}/{lat['p99']:.0f}" if lat else '-'
  print(f"{os.path.basename(path)[:-5]:<16} {r['images_per_sec']:8.2f} {r['step_time_ms']:8.1f}"
        f" {r['compile_s']:9.1f} {(r['flops_per_image'] or 0) / 1e9:9.1f} {mfu} {mem}  {lat}")
  prof = r.get('profile')
  if prof and 'stage_ms' in prof:
    total = prof['total_ms'] or 1.0
    stages = ', '.join(f'{k} {100 * v / total:.0f}%' for k, v in
                       sorted(prof['stage_ms'].items(), key=lambda kv: -kv[1]))
    print(f"  profile ({prof['total_ms']:.0f} ms device time): {stages}")
    for op, ms, stage in prof["top_ops"][:8]:
      print(f"    {ms:9.1f} ms  {op[:60]}  {stage}")
PYEOF
