#!/usr/bin/env bash
# 4 GPUs, batch 4 each (16): the reference's train_4GPU.sh schedule (lr 0.02, decay at 60k and
# 80k, 90k steps). Usage: launch/train_4gpu.sh WORKDIR [float16|bfloat16|float32] [overrides...]
EXPECTED_GPUS=4 LEARNING_RATE=0.02 TOTAL_STEPS=90000 LR_STEPS='(60000, 80000)' \
  EVAL_EVERY=7500 source "$(dirname "$0")/train_common.sh"
