#!/usr/bin/env bash
# Two hosts without a scheduler: run this on each host with its own process id; the coordinator
# is host 0 (any free port). Every local GPU of each host is used; each host reads its own share
# of every batch (the global batch is per-device batch x all GPUs).
#
#   host 0:  COORDINATOR=host0:12345 PROCESS_ID=0 launch/train_2hosts.sh WORKDIR [overrides...]
#   host 1:  COORDINATOR=host0:12345 PROCESS_ID=1 launch/train_2hosts.sh WORKDIR [overrides...]
#
# WORKDIR must be on a filesystem both hosts see (process 0 writes the metrics, configs and
# results; Orbax writes each checkpoint collectively). The same environment variables run the
# two-process test on one machine: tests/test_multihost.py (127.0.0.1, two fake CPU devices each).
set -euo pipefail
WORKDIR=${1:?usage: COORDINATOR=host:port PROCESS_ID=0|1 $0 WORKDIR [overrides...]}
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
export JAX_COORDINATOR_ADDRESS=${COORDINATOR:?set COORDINATOR=host0:port}
export JAX_NUM_PROCESSES=${NUM_PROCESSES:-2}
export JAX_PROCESS_ID=${PROCESS_ID:?set PROCESS_ID (0 on the coordinator host)}
cd "$REPO"
exec "$PYTHON" -m maskrcnn_jax.main --config=configs/coco_r50.py --workdir="$WORKDIR" \
  --config.data.tfds_data_dir="${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}" "$@"
