"""Builds the `coco_instances` TFDS dataset (array_record files) from COCO-format data.

COCO 2017 in its download layout (annotations/instances_{train,val}2017.json, {train,val}2017/):
  python -m maskrcnn_jax.data.prepare --manual_dir /data/coco --data_dir ~/tensorflow_datasets

Any COCO-format annotation file and image folder (either pair may be omitted):
  python -m maskrcnn_jax.data.prepare --data_dir ~/tensorflow_datasets --name mydata \
    --version 1.0.0 --train_annotations train.json --train_images train/ \
    --val_annotations val.json --val_images val/
then train with --config.data.tfds_name=coco_instances/mydata.

Prints the per-split counts (images, objects, dropped degenerate boxes, clipped boxes, dropped
polygons, converted images) at the end; they are also in the dataset's metadata.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from maskrcnn_jax.data import annotations


def prepare(data_dir: str | None, manual_dir: str | None = None, name: str | None = None,
            version: str = '1.0.0', show_progress: bool = True, **paths) -> str:
  """Builds the dataset; returns its directory. paths: see `coco_builder.config_from_paths`.

  Without paths, the COCO 2017 layout under manual_dir is read (config 'coco2017'). Raises
  `annotations.DatasetError` on bad input; nothing is left that looks prepared in that case.
  """
  # TensorFlow boundary: building the dataset is the one TFDS/TensorFlow step.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.data import coco_builder  # pylint: disable=g-import-not-at-top
  paths = {k: v for k, v in paths.items() if v}
  if paths:
    config = coco_builder.config_from_paths(name or 'custom', version, **paths)
    # TFDS insists on a manual_dir for this builder; relative paths are read from it.
    manual_dir = manual_dir or os.getcwd()
  elif name in (None, 'coco2017') and version == '1.0.0':
    config = 'coco2017'
  else:
    config = coco_builder.CocoInstancesConfig(
        name=name, version=version, description='COCO layout under manual_dir.')
  builder = coco_builder.CocoInstances(config=config, data_dir=data_dir or None,
                                       file_format='array_record', show_progress=show_progress)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))
  return builder.data_dir


def summary(dataset_dir: str) -> str:
  """Human-readable per-split counts from the dataset's metadata.json."""
  with open(os.path.join(dataset_dir, 'metadata.json')) as f:
    metadata = json.load(f)
  lines = [f'{dataset_dir}: {len(metadata["categories"])} categories, class mapping '
           f'{metadata["mapping"]}, num_classes {metadata["num_classes"]}']
  for split, info in metadata['splits'].items():
    lines.append(f'  {split}: ' + ', '.join(f'{k} {v}' for k, v in info['stats'].items()))
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--data_dir', default='', help='TFDS data_dir (default ~/tensorflow_datasets)')
  parser.add_argument('--manual_dir', default='',
                      help='COCO layout root; relative paths below are read from it too')
  parser.add_argument('--name', default=None,
                      help="builder config name (default 'coco2017', or 'custom' with paths)")
  parser.add_argument('--version', default='1.0.0')
  for split in ('train', 'val'):
    parser.add_argument(f'--{split}_annotations', default=None, help='COCO-format JSON file')
    parser.add_argument(f'--{split}_images', default=None, help='folder of its images')
  parser.add_argument('--no_progress', action='store_true', help='hide the progress bars')
  args = parser.parse_args(argv)
  try:
    dataset_dir = prepare(
        args.data_dir, args.manual_dir, args.name, args.version, not args.no_progress,
        train_annotations=args.train_annotations, train_images=args.train_images,
        val_annotations=args.val_annotations, val_images=args.val_images)
  except (annotations.DatasetError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(summary(dataset_dir))
  return 0


if __name__ == '__main__':
  sys.exit(main())
