"""Inference throughput and latency benchmark (the reference's benchmark_inference.py, and more).

Times --num_steps batches of the inference step (backbone to masks of the 100 detections) and
averages images/s over those after --warmup_steps; then a latency pass waits for every batch
and reports p50/p90/p95/p99 (the reference's later version prints p90/p95/p99). The
reference's run is 1200 images: --num_steps = 1200 / batch + warm-up. Adds compile time, FLOPs
per image and MFU, device memory, and optionally torchvision's Mask R-CNN in eval mode under
torch.no_grad side by side (--torchvision). Examples:

  python launch/benchmark_inference.py --batch_size 8 --precision bfloat16 --num_steps 160
  /work/tvenv/bin/python launch/benchmark_inference.py --image_size 512 --batch_size 1 \\
      --num_steps 8 --warmup_steps 2 --torchvision --threads 2 --output /tmp/infer.json  # CPU

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
  benchmark.add_arguments(parser, 'inference')
  benchmark.run_from_args(parser.parse_args(argv), 'inference')
  return 0


if __name__ == '__main__':
  sys.exit(main())
