"""Training throughput benchmark (the reference's benchmark_training.py, and more).

Times config.benchmark.num_steps train steps and averages images/s over those after
config.benchmark.warmup_steps, as the reference does (200 steps, the first 100 left out); adds
compile time, FLOPs per image and MFU, device memory, and optionally torchvision's Mask R-CNN side
by side (--torchvision: same canvas, batch and threads, alternating windows), a per-stage
breakdown (--stages) and a profile (--profile_dir). Synthetic data needs no TensorFlow. Batch,
precision, canvas and devices are config keys (bench/cli.py). From the repository root:

  python bench/benchmark_training.py --config=configs/coco_r50.py \\
      --config.train.per_device_batch_size=4 --config.model.precision=bfloat16       # one GPU
  python bench/benchmark_training.py --config.train.per_device_batch_size=4 \\
      --config.model.precision=bfloat16 --config.benchmark.num_devices=8             # 8 GPUs
  $TORCH_VENV/bin/python bench/benchmark_training.py --config.data.image_size='(512, 512)' \\
      --config.train.per_device_batch_size=1 --config.benchmark.num_steps=8 \\
      --config.benchmark.warmup_steps=3 --torchvision --threads 2 --output /tmp/train.json  # CPU

($TORCH_VENV: a venv with torch, torchvision and this package.) What each figure means:
maskrcnn_jax/train/benchmark.py; results: docs/performance.md.
"""

import functools

from absl import app

from maskrcnn_jax import huge_pages

import cli  # bench/, on sys.path as this script's folder

cli.define_flags('training')

if __name__ == '__main__':
  huge_pages.restart_with_huge_pages()
  app.run(functools.partial(cli.main, 'training'))
