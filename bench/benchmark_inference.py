"""Inference throughput and latency benchmark (the reference's benchmark_inference.py, and more).

Times config.benchmark.num_steps batches of the inference step (backbone to the masks of the 100
detections) and averages images/s over those after config.benchmark.warmup_steps; then a latency
pass waits for every batch and reports p50/p90/p95/p99 (the reference's later version prints
p90/p95/p99). The reference's run is 1200 images: num_steps = 1200 / global batch + warm-up. Adds
compile time, FLOPs per image and MFU, device memory, and optionally torchvision's Mask R-CNN in
eval mode under torch.no_grad side by side (--torchvision). The batch is
config.eval.per_device_batch_size (bench/cli.py for the flags). From the repository root:

  python bench/benchmark_inference.py --config=configs/coco_r50.py \\
      --config.eval.per_device_batch_size=8 --config.model.precision=bfloat16 \\
      --config.benchmark.num_steps=160 --config.benchmark.warmup_steps=10
  $TORCH_VENV/bin/python bench/benchmark_inference.py --config.data.image_size='(512, 512)' \\
      --config.eval.per_device_batch_size=1 --config.benchmark.num_steps=8 \\
      --config.benchmark.warmup_steps=2 --torchvision --threads 2 --output /tmp/infer.json  # CPU

($TORCH_VENV: a venv with torch, torchvision and this package.) What each figure means:
maskrcnn_jax/train/benchmark.py; results: docs/performance.md.
"""

import functools

from absl import app

from maskrcnn_jax import huge_pages

import cli  # bench/, on sys.path as this script's folder

cli.define_flags('inference')

if __name__ == '__main__':
  huge_pages.restart_with_huge_pages()
  app.run(functools.partial(cli.main, 'inference'))
