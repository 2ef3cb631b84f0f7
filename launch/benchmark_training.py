"""Training throughput benchmark (the reference's benchmark_training.py, and more).

Times --num_steps train steps and averages images/s over those after --warmup_steps, as the
reference does (200 steps, the first 100 left out); adds compile time, FLOPs per image and MFU,
device memory, and optionally torchvision's Mask R-CNN side by side (--torchvision, same canvas,
batch and threads, alternating windows) and a per-stage breakdown (--stages). Synthetic data
needs no TensorFlow. Examples:

  python launch/benchmark_training.py --batch_size 4 --precision bfloat16        # one GPU
  python launch/benchmark_training.py --gpus 8 --batch_size 4 --precision bfloat16
  /work/tvenv/bin/python launch/benchmark_training.py --image_size 512 --batch_size 1 \\
      --num_steps 8 --warmup_steps 3 --torchvision --threads 2 --output /tmp/train.json  # CPU

See maskrcnn_jax/benchmark.py for what each figure means and docs/performance.md for results.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  # Fake CPU devices must be requested before JAX starts.
  for i, a in enumerate(argv):
    if a.startswith('--cpu_devices'):
      n = a.split('=', 1)[1] if '=' in a else argv[i + 1]
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                                 + f' --xla_force_host_platform_device_count={n}').strip()
  from maskrcnn_jax import benchmark  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  benchmark.add_arguments(parser, 'training')
  benchmark.run_from_args(parser.parse_args(argv), 'training')
  return 0


if __name__ == '__main__':
  sys.exit(main())
