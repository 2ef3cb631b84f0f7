#!/usr/bin/env bash
# 1 GPU, batch 4: the reference's train_1GPU.sh schedule (lr 0.005, decay at 240k and 320k,
# 360k steps). Usage: launch/train_1gpu.sh WORKDIR [float16|bfloat16|float32] [overrides...]
EXPECTED_GPUS=1 LEARNING_RATE=0.005 TOTAL_STEPS=360000 LR_STEPS='(240000, 320000)' \
  EVAL_EVERY=20000 source "$(dirname "$0")/train_common.sh"
