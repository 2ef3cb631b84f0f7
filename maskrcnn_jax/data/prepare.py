"""Builds the `coco_instances` TFDS dataset (array_record files) from COCO-format data.

COCO 2017 in its download layout (annotations/instances_{train,val}2017.json, {train,val}2017/):
  python -m maskrcnn_jax.data.prepare --manual_dir /data/coco --data_dir ~/tensorflow_datasets

Any COCO-format annotation file and image folder (either pair may be omitted):
  python -m maskrcnn_jax.data.prepare --data_dir ~/tensorflow_datasets --name mydata \
    --version 1.0.0 --train_annotations train.json --train_images train/ \
    --val_annotations val.json --val_images val/
then train with --config.data.tfds_name=coco_instances/mydata.

Prints the per-split counts (images, objects, dropped degenerate boxes, clipped boxes, dropped
polygons, converted images, EXIF orientations applied or ignored) at the end; they are also in the
dataset's metadata.json. It also prints how many images and objects exceed --max_instances objects
per image (default: data.max_instances of configs/coco_r50.py), the ones the input pipeline drops.

A rerun into an existing build reuses it when it was prepared from the same inputs (annotation
files, image files, records format: see `fingerprint`) and stops with a one-line error naming what
differs otherwise. --overwrite rebuilds it: into a temporary sibling directory, swapped in only
once complete, so the old build stays readable until then and a failed or interrupted rebuild
leaves it as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

from maskrcnn_jax.data import annotations
from maskrcnn_jax.data import fingerprint


class InputsChangedError(annotations.DatasetError):
  """The dataset directory holds a build of other inputs (and overwrite was not asked for)."""


def prepare(data_dir: str | None, manual_dir: str | None = None, name: str | None = None,
            version: str = '1.0.0', show_progress: bool = True, overwrite: bool = False,
            **paths) -> str:
  """Builds the dataset; returns its directory. paths: see `coco_builder.config_from_paths`.

  Without paths, the COCO 2017 layout under manual_dir is read (config 'coco2017'). Raises
  `annotations.DatasetError` on bad input; nothing is left that looks prepared in that case.
  An existing build is reused when its inputs are the same, else `InputsChangedError` is raised,
  unless overwrite: then it is rebuilt and replaced once the new build is complete.
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

  def make_builder(root):
    return coco_builder.CocoInstances(config=config, data_dir=root, file_format='array_record',
                                      show_progress=show_progress)

  builder = make_builder(data_dir or None)
  # TFDS's default manual_dir, named here so that a rebuild elsewhere reads the same files.
  manual_dir = manual_dir or os.fspath(builder.data_dir_root / 'downloads' / 'manual')
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  if overwrite and os.path.exists(builder.data_dir):
    _rebuild(make_builder, builder.data_dir, download_config)
  elif builder.is_prepared():
    _check_inputs(builder.data_dir, builder.split_paths(manual_dir))
  else:
    builder.download_and_prepare(download_config=download_config)
  return builder.data_dir


def _check_inputs(dataset_dir: str, split_paths: dict[str, tuple[str, str]]) -> None:
  """Raises `InputsChangedError` unless dataset_dir was prepared from the files of split_paths."""
  with open(os.path.join(dataset_dir, 'metadata.json')) as f:
    recorded = json.load(f).get('inputs')
  advice = 'Rerun with --overwrite to rebuild it, or give another --name or --data_dir'
  if recorded is None:  # a build of an older version: kept (rebuilding COCO takes an hour)
    print(f'warning: {dataset_dir} has no record of the inputs it was prepared from (an older '
          f'version of prepare made it): reused unchecked. {advice}', file=sys.stderr)
    return
  current = fingerprint.current_inputs(
      split_paths, recorded, lambda path: annotations.load_json(path)['images'])
  differences = fingerprint.differences(recorded, current)
  if differences:
    raise InputsChangedError(
        f'{dataset_dir} was prepared from other inputs: {"; ".join(differences)}. {advice}')


def _rebuild(make_builder, target: str, download_config) -> None:
  """Builds into a temporary sibling of `target` (``.<version>.rebuild-*``), then swaps it in.

  Until the swap (two renames) the old build is untouched and readable; a failed build removes
  the temporary directory (a killed one leaves it behind, to be deleted).
  """
  tmp_root = tempfile.mkdtemp(prefix=f'.{os.path.basename(target)}.rebuild-',
                              dir=os.path.dirname(target))
  try:
    builder = make_builder(tmp_root)
    builder.download_and_prepare(download_config=download_config)
    old = os.path.join(tmp_root, 'old')
    os.rename(target, old)
    try:
      os.rename(builder.data_dir, target)
    except BaseException:
      os.rename(old, target)
      raise
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)


def default_max_instances() -> int | None:
  """data.max_instances of this repository's configs/coco_r50.py (None when it is absent)."""
  path = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'coco_r50.py'
  if not path.is_file():
    return None
  from maskrcnn_jax import configs  # pylint: disable=g-import-not-at-top
  return int(configs.import_config_module(path).get_config().data.max_instances)


def summary(dataset_dir: str, max_instances: int | None = None) -> str:
  """Human-readable per-split counts from the dataset's metadata.json; with max_instances, also
  the images and objects beyond that many objects per image (`pipeline.objects_over_cap`)."""
  with open(os.path.join(dataset_dir, 'metadata.json')) as f:
    metadata = json.load(f)
  lines = [f'{dataset_dir}: {len(metadata["categories"])} categories, class mapping '
           f'{metadata["mapping"]}, num_classes {metadata["num_classes"]}']
  for split, info in metadata['splits'].items():
    stats = info['stats']
    lines.append(f'  {split}: ' + ', '.join(f'{k} {v}' for k, v in stats.items()))
    rotated, raw = stats.get('exif_rotated', 0), stats.get('exif_kept_raw', 0)
    if rotated or raw:
      lines.append(f'    exif: {rotated} rotated, {raw} kept raw (annotation size matches the '
                   'raw pixels)')
    if max_instances:
      from maskrcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
      images, objects = pipeline.objects_over_cap(info, max_instances, skip_crowd=True)
      all_images, all_objects = pipeline.objects_over_cap(info, max_instances, skip_crowd=False)
      lines.append(f'    over max_instances = {max_instances}: {images} images, {objects} objects '
                   f'without crowd objects (what training drops); {all_images} images, '
                   f'{all_objects} objects with them')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--data_dir', default='',
                      help='TFDS data_dir (default ~/tensorflow_datasets)')
  parser.add_argument('--manual_dir', default='',
                      help='COCO layout root; relative paths below are read from it too')
  parser.add_argument('--name', default=None,
                      help="builder config name (default 'coco2017', or 'custom' with paths)")
  parser.add_argument('--version', default='1.0.0')
  for split in ('train', 'val'):
    parser.add_argument(f'--{split}_annotations', default=None, help='COCO-format JSON file')
    parser.add_argument(f'--{split}_images', default=None, help='folder of its images')
  parser.add_argument('--no_progress', action='store_true', help='hide the progress bars')
  parser.add_argument('--overwrite', action='store_true',
                      help='rebuild an existing build of other inputs (swapped in when complete)')
  parser.add_argument('--max_instances', type=int, default=None,
                      help='report images with more objects than this (default: data.max_instances '
                      'of configs/coco_r50.py; 0: no report)')
  args = parser.parse_args(argv)
  try:
    dataset_dir = prepare(
        args.data_dir, args.manual_dir, args.name, args.version, not args.no_progress,
        args.overwrite, train_annotations=args.train_annotations, train_images=args.train_images,
        val_annotations=args.val_annotations, val_images=args.val_images)
  except (annotations.DatasetError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  max_instances = default_max_instances() if args.max_instances is None else args.max_instances
  print(summary(dataset_dir, max_instances))
  return 0


if __name__ == '__main__':
  sys.exit(main())
