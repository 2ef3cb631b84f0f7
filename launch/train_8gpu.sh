#!/usr/bin/env bash
# 8 GPUs, batch 4 each (32): the reference's train_8GPU.sh 1x schedule (lr 0.04, decay at 30k and
# 40k, 45k steps, about 12.3 epochs; 0.3796 box AP / 0.3415 mask AP with AMP on 8 x A100).
# Usage: launch/train_8gpu.sh WORKDIR [float16|bfloat16|float32] [overrides...]
EXPECTED_GPUS=8 LEARNING_RATE=0.04 TOTAL_STEPS=45000 LR_STEPS='(30000, 40000)' \
  EVAL_EVERY=3696 source "$(dirname "$0")/train_common.sh"
