"""Input pipeline throughput: images per second per CPU core at the reference canvas, with masks.

Builds `coco_instances` from tests/data/coco_sample (six COCO val2017 images; the five with
annotations are repeated, epoch after epoch) in a temporary directory, then runs the training
pipeline (decode, flip, resize into 832x1344, pad, 116x116 mask crops, batching) and reports
images/s, process CPU seconds per image, and images per CPU-core-second:

  .venv/bin/python bench/input_pipeline.py --num_images 400 --num_workers 1

Use --num_workers N to measure scaling on N cores; --data_dir to reuse a prepared dataset.
"""

import argparse
import os
import pathlib
import tempfile
import time

from maskrcnn_jax import configs
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data import prepare
from maskrcnn_jax.train import experiment
from machine import cpu_model  # bench/, on sys.path as this script's folder

REPO = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=400)
  parser.add_argument('--batch_size', type=int, default=4)
  parser.add_argument('--num_workers', type=int, default=1)
  parser.add_argument('--data_dir', default='')
  args = parser.parse_args()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow is imported by prepare below

  data_dir = args.data_dir or tempfile.mkdtemp(prefix='bench_input_')
  if not args.data_dir:
    prepare.prepare(data_dir, manual_dir=str(REPO / 'tests' / 'data' / 'coco_sample'),
                    show_progress=False)
  config = configs.load_config(REPO / 'configs' / 'coco_r50.py')
  config.data.tfds_data_dir = data_dir
  config.data.train_split = 'validation'
  source = pipeline.Source(config.data.tfds_name, 'validation', data_dir)
  it = experiment.build_train_iterator(config, args.batch_size, source=source, process_index=0,
                                       process_count=1, num_workers=args.num_workers)
  for _ in range(3):  # warm-up: thread pool, first reads
    next(it)
  steps = max(1, args.num_images // args.batch_size)
  wall, cpu = time.perf_counter(), time.process_time()
  instances = 0
  for _ in range(steps):
    batch = next(it)
    instances += int(batch['gt_valid'].sum())
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  images = steps * args.batch_size
  print(f'canvas {tuple(config.data.image_size)}, masks {batch["gt_masks"].shape[-1]}^2, '
        f'{instances / images:.1f} instances/image, batch {args.batch_size}, '
        f'{args.num_workers} worker thread(s), CPU {cpu_model()}')
  print(f'{images} images in {wall:.2f} s: {images / wall:.1f} img/s wall, '
        f'{1000 * cpu / images:.1f} ms CPU/image, {images / cpu:.1f} img/s per CPU core')


if __name__ == '__main__':
  main()
