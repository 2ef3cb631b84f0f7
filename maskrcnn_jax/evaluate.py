"""Command line: score a COCO results file against a COCO annotation file.

  python -m maskrcnn_jax.evaluate --annotations=GT.json --results=R.json \
    [--iou_types=bbox,segm] [--engine=pycocotools|faster_coco_eval] [--output=METRICS.json]

The results may come from any tool (``coco_results_step<N>.json`` of a training run, the
``predictions.json`` of `maskrcnn_jax.predict`, another framework): a JSON list of
{image_id, category_id, bbox [x, y, w, h], score, segmentation (RLE)}. The command prints the
twelve COCO stats of each IoU type as a table and, with ``--output``, writes them as
``{"bbox/AP": ..., "segm/AP50": ...}``, the keys of a run's ``eval_metrics.jsonl``. The
evaluation is `maskrcnn_jax.evaluation.coco.coco_metrics`'s: annotation ids renumbered 1..n (an
id 0 would count as unmatched in pycocotools), crowd regions ignored as COCOeval does, images
without results scored as misses. An unusable file is one line ``error: FILE: ...`` and exit
status 1 (results for an image the annotations do not have, results without masks when segm is
asked, invalid JSON). No JAX is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

from maskrcnn_jax import files
from maskrcnn_jax.evaluation import coco
from maskrcnn_jax.settings import ConfigError

# What each of the twelve stats averages (pycocotools' summary lines).
STAT_DESCRIPTIONS = {
    'AP': 'precision  IoU=0.50:0.95  area=all     maxDets=100',
    'AP50': 'precision  IoU=0.50       area=all     maxDets=100',
    'AP75': 'precision  IoU=0.75       area=all     maxDets=100',
    'APs': 'precision  IoU=0.50:0.95  area=small   maxDets=100',
    'APm': 'precision  IoU=0.50:0.95  area=medium  maxDets=100',
    'APl': 'precision  IoU=0.50:0.95  area=large   maxDets=100',
    'AR1': 'recall     IoU=0.50:0.95  area=all     maxDets=1',
    'AR10': 'recall     IoU=0.50:0.95  area=all     maxDets=10',
    'AR100': 'recall     IoU=0.50:0.95  area=all     maxDets=100',
    'ARs': 'recall     IoU=0.50:0.95  area=small   maxDets=100',
    'ARm': 'recall     IoU=0.50:0.95  area=medium  maxDets=100',
    'ARl': 'recall     IoU=0.50:0.95  area=large   maxDets=100',
}


class CommandError(Exception):
  """An input the command cannot use; the message names the file."""


def _iou_types(text: str) -> tuple[str, ...]:
  types = tuple(t.strip() for t in text.split(',') if t.strip())
  if not types or any(t not in coco.IOU_TYPES for t in types) or len(set(types)) < len(types):
    raise argparse.ArgumentTypeError(f'{text!r}: a comma-separated subset of '
                                     f'{",".join(coco.IOU_TYPES)}')
  return types


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m maskrcnn_jax.evaluate',
      description='COCO bbox/segm metrics of a results file against an annotation file.')
  parser.add_argument('--annotations', required=True, metavar='GT.json',
                      help='COCO annotation file (images, annotations, categories).')
  parser.add_argument('--results', required=True, metavar='R.json',
                      help='COCO results file: a list of detections.')
  parser.add_argument('--iou_types', type=_iou_types, default=coco.IOU_TYPES,
                      metavar='bbox,segm', help='IoU types to score (default: bbox,segm).')
  parser.add_argument('--engine', choices=coco.ENGINES, default='pycocotools',
                      help='COCOeval implementation (default: pycocotools, the reference).')
  parser.add_argument('--output', metavar='METRICS.json',
                      help='Write the metrics here as {"bbox/AP": ..., ...}.')
  return parser.parse_args(argv)


def read_json(path: str) -> Any:
  """The JSON value of `path`; `CommandError` naming the file otherwise."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    raise CommandError(f'{path}: no such file') from None
  except json.JSONDecodeError as e:
    raise CommandError(f'{path}: not valid JSON ({e.msg} at line {e.lineno} column '
                       f'{e.colno})') from None
  except UnicodeDecodeError as e:
    raise CommandError(f'{path}: not valid JSON (not UTF-8 text: {e.reason} at byte '
                       f'{e.start})') from None
  except OSError as e:
    raise CommandError(f'{path}: {e.strerror or e}') from None


def format_table(metrics: dict[str, float], iou_types: Sequence[str]) -> str:
  """The stats as rows (name, what it averages) by columns (IoU types)."""
  width = max(len(d) for d in STAT_DESCRIPTIONS.values())
  lines = [f'{"":6}  {"":{width}}' + ''.join(f'{t:>9}' for t in iou_types)]
  for name in coco.STAT_NAMES:
    lines.append(f'{name:6}  {STAT_DESCRIPTIONS[name]:{width}}'
                 + ''.join(f'{metrics[f"{t}/{name}"]:9.4f}' for t in iou_types))
  if any(metrics[f'{t}/{name}'] < 0 for t in iou_types for name in coco.STAT_NAMES):
    lines.append('(-1: the annotations have no object in that area range)')
  return '\n'.join(lines)


def evaluate(args: argparse.Namespace) -> dict[str, float]:
  """The metrics of ``args.results`` against ``args.annotations`` (prints the table)."""
  start = time.time()
  annotations = read_json(args.annotations)
  try:
    ground_truth = coco.index_ground_truth(annotations, args.engine)
    if 'segm' in args.iou_types and not ground_truth.has_masks:
      raise coco.GroundTruthFormatError(
          "an annotation has no 'segmentation': segm cannot be scored (--iou_types=bbox)")
  except coco.GroundTruthFormatError as e:
    raise CommandError(f'{args.annotations}: {e}') from None
  except ConfigError as e:  # the engine's package is missing
    raise CommandError(f'--engine={args.engine}: {e}') from None
  del annotations
  results = read_json(args.results)
  try:
    metrics = coco.coco_metrics(ground_truth, results, args.iou_types)
  except coco.ResultsFormatError as e:
    raise CommandError(f'{args.results}: {e}') from None
  unknown = sorted({r['category_id'] for r in results} - ground_truth.category_ids, key=str)
  if unknown:
    count = sum(r['category_id'] in unknown for r in results)
    print(f'warning: {count} results have category ids the annotations do not have (COCOeval '
          f'ignores them): {", ".join(map(str, unknown[:10]))}', file=sys.stderr)
  images = len({r['image_id'] for r in results})
  print(f'{args.results}: {len(results)} results on {images} of '
        f'{len(ground_truth.image_sizes)} images of {args.annotations} ({args.engine}, '
        f'{time.time() - start:.1f} s)')
  print(format_table(metrics, args.iou_types))
  return metrics


def write_metrics(path: str, metrics: dict[str, float]) -> None:
  """``{"bbox/AP": ..., ...}`` as JSON (atomically)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_open(path) as f:
    json.dump(metrics, f, indent=2)
    f.write('\n')


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    metrics = evaluate(args)
    if args.output:
      try:
        write_metrics(args.output, metrics)
      except OSError as e:
        raise CommandError(f'{args.output}: {e.strerror or e}') from None
  except CommandError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if args.output:
    print(f'metrics written to {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
