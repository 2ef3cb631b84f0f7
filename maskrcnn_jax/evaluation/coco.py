"""COCO evaluation: ground truth from the dataset, detections -> COCO results, COCO metrics.

* `ground_truth_from_records` rebuilds a COCO annotation dict from the prepared TFDS records
  (the dataset metadata does not record the original annotation file, and rebuilding from the
  records keeps any COCO-format dataset working): boxes from the stored normalized yxyx, masks
  from the stored COCO RLE, COCO's ``area`` and ``iscrowd`` as stored, categories from the
  metadata. The preparation step clipped boxes to the image and dropped degenerate ones, so for
  COCO 2017 this ground truth can differ from the raw JSON by those (rare) objects.
* `detections_to_results` maps the model's fixed-size detections (canvas pixels, class indices)
  to COCO results: boxes divided by the resize scale and clipped to the original image, class
  indices mapped back to category ids, masks pasted at the original size
  (`maskrcnn_jax.ops.masks.paste_masks`), thresholded at 0.5 and RLE-encoded.
* `index_ground_truth` builds an engine's COCO index of a ground truth once (`GroundTruth`);
  `coco_metrics` scores a results list against it (or against a plain annotation dict) with
  COCOeval for bbox and segm and returns the twelve stats of each as
  ``{'bbox/AP': ..., 'segm/ARl': ...}``.

Engines (`ENGINES`, ``config.eval.engine``): 'pycocotools', the reference, and
'faster_coco_eval' (the C++ matching and accumulation of the faster-coco-eval package, with its
pycocotools-compatible COCO/COCOeval API and its extras, LVIS rules and extra statistics, off),
which gives the same twelve stats (``tests/evaluation/test_engines.py``) in less time
(``docs/performance.md``). Neither needs JAX: only mask pasting imports it.

Inputs are checked before COCOeval sees them (`CocoFormatError`, naming the entry): results for
an image the ground truth does not have (pycocotools stops on an assertion), results without
masks when segm is asked (pycocotools would silently score the box outline as the mask), masks
of another size than their image, missing keys. Without any result the stats are COCOeval's
for an empty detection list (0, or -1 for an area range without ground truth).

Annotation ids. pycocotools treats a matched ground-truth id of 0 as "unmatched" (``dtm`` holds
the matched id and is tested for truth in ``accumulate``), so a dataset whose annotation ids start
at 0 loses recall. The ground truth's annotation ids are therefore renumbered 1..n, in their
order (the order COCOeval's matching depends on is kept).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax import files
from maskrcnn_jax import settings
from maskrcnn_jax.settings import ConfigError

ENGINES = settings.EVAL_ENGINES
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm',
              'ARl')
IOU_TYPES = ('bbox', 'segm')
METRIC_KEYS = tuple(f'{t}/{s}' for t in IOU_TYPES for s in STAT_NAMES)


# ------------------------------------------------------------------------------ ground truth
def ground_truth_from_records(records: Iterable[Mapping[str, Any]],
                              categories: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """A COCO annotation dict from `coco_instances` records (see `maskrcnn_jax.data.coco_builder`).

  records: dicts with image_id, height, width, file_name and objects {bbox (normalized yxyx),
  category_id, is_crowd, area, mask (COCO compressed RLE counts)}. Annotation ids are 1..n.
  """
  images, annotations = [], []
  for record in records:
    image_id, h, w = int(record['image_id']), int(record['height']), int(record['width'])
    name = record.get('file_name', '')
    name = name.decode() if isinstance(name, bytes) else str(name)
    images.append({'id': image_id, 'height': h, 'width': w, 'file_name': name})
    objects = record['objects']
    boxes = np.asarray(objects['bbox'], np.float64).reshape(-1, 4)
    for k in range(boxes.shape[0]):
      y0, x0, y1, x1 = boxes[k] * [h, w, h, w]
      counts = objects['mask'][k]
      counts = counts.decode() if isinstance(counts, bytes) else str(counts)
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image_id,
          'category_id': int(objects['category_id'][k]),
          'iscrowd': int(bool(objects['is_crowd'][k])),
          'area': float(objects['area'][k]),
          'bbox': [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
          'segmentation': {'size': [h, w], 'counts': counts}})
  return {'info': {'description': 'rebuilt from the prepared dataset records'},
          'images': images, 'annotations': annotations,
          'categories': [dict(c) for c in categories]}


def ground_truth_from_source(source, num_examples: int = -1) -> dict[str, Any]:
  """`ground_truth_from_records` over the first num_examples (-1 = all) records of a
  `maskrcnn_jax.data.pipeline.Source` (the evaluation split, in the eval iterator's order)."""
  total = len(source) if num_examples < 0 else min(num_examples, len(source))
  return ground_truth_from_records((source[i] for i in range(total)),
                                   source.metadata['categories'])


# ------------------------------------------------------------------------------ detections
def class_to_category_map(metadata: Mapping[str, Any]) -> dict[int, int]:
  """Class index -> COCO category id from the dataset metadata (identity if absent)."""
  table = metadata.get('class_index_to_category_id')
  if not table:
    return {int(c['id']): int(c['id']) for c in metadata.get('categories', [])}
  return {int(k): int(v) for k, v in table.items()}


def _paste_fn():
  """paste_masks thresholded at 0.5, jitted per (padded) output size."""
  # JAX is imported here, not with the module: the metrics (and the evaluate command) need none.
  import jax  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.ops import masks as mask_ops  # pylint: disable=import-outside-toplevel

  @jax.jit
  def paste(masks, boxes, template):
    height, width = template.shape
    return mask_ops.paste_masks(masks, boxes, height, width) >= 0.5

  return paste


_PASTE = None
# Output canvases are rounded up to this many pixels so that images of many sizes share a few
# compiled paste functions; pixel centres do not depend on the canvas, so cropping is exact.
_PASTE_BUCKET = 128


def paste_binary_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int
                       ) -> np.ndarray:
  """(K, m, m) probabilities in box coordinates, (K, 4) xyxy original-image boxes ->
  (height, width, K) uint8 {0, 1} Fortran-ordered (pycocotools' layout).

  K should be the same for every call (the detections per image, invalid ones with empty boxes)
  so that the few canvas buckets are the only shapes compiled.
  """
  global _PASTE  # a cache of compiled functions, not configuration
  if _PASTE is None:
    _PASTE = _paste_fn()
  hp = -(-height // _PASTE_BUCKET) * _PASTE_BUCKET
  wp = -(-width // _PASTE_BUCKET) * _PASTE_BUCKET
  pasted = np.asarray(_PASTE(np.asarray(masks, np.float32), np.asarray(boxes, np.float32),
                             np.zeros((hp, wp), np.bool_)))[:, :height, :width]
  return np.asfortranarray(pasted.transpose(1, 2, 0).astype(np.uint8))


def original_boxes(boxes, scale: float, height: int, width: int) -> np.ndarray:
  """(N, 4) xyxy canvas boxes -> float64 original-image pixels (/ scale), clipped to the image."""
  return np.clip(np.asarray(boxes, np.float64) / scale, 0.0, [width, height, width, height])


def detections_to_results(detections: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                          class_to_category: Mapping[int, int], with_masks: bool = True
                          ) -> list[dict[str, Any]]:
  """COCO results of one batch of detections.

  Args:
    detections: boxes (B, D, 4) float32 xyxy canvas pixels, scores (B, D), classes (B, D) int32
      class indices, masks (B, D, M, M) probabilities, valid (B, D) bool (NumPy).
    batch: the batch's image_ids (B,), original_sizes (B, 2) (height, width), scales (B,),
      example_valid (B,) bool.
    class_to_category: class index -> category id.

  Returns:
    A list of {image_id, category_id, bbox [x, y, w, h] original pixels, score,
    segmentation (compressed RLE, counts as str)}.
  """
  results = []
  for b in np.flatnonzero(np.asarray(batch['example_valid'])):
    valid = np.asarray(detections['valid'][b], bool)
    if not valid.any():
      continue
    h, w = (int(v) for v in batch['original_sizes'][b])
    boxes = original_boxes(detections['boxes'][b][valid], float(batch['scales'][b]), h, w)
    scores = np.asarray(detections['scores'][b][valid], np.float64)
    classes = np.asarray(detections['classes'][b][valid])
    rles = None
    if with_masks:
      # All D slots are pasted (invalid ones with empty boxes paste nothing): one compiled shape.
      all_boxes = np.zeros((valid.shape[0], 4), np.float32)
      all_boxes[valid] = boxes
      pasted = paste_binary_masks(np.asarray(detections['masks'][b]), all_boxes, h, w)
      rles = mask_util.encode(np.asfortranarray(pasted[:, :, valid]))
    image_id = int(batch['image_ids'][b])
    for k in range(boxes.shape[0]):
      x0, y0, x1, y1 = boxes[k]
      result = {'image_id': image_id,
                'category_id': int(class_to_category.get(int(classes[k]), int(classes[k]))),
                'bbox': [round(float(x0), 3), round(float(y0), 3), round(float(x1 - x0), 3),
                         round(float(y1 - y0), 3)],
                'score': round(float(scores[k]), 5)}
      if rles is not None:
        rle = rles[k]
        result['segmentation'] = {'size': [int(s) for s in rle['size']],
                                  'counts': rle['counts'].decode('ascii')}
      results.append(result)
  return results


# ------------------------------------------------------------------------------ metrics
class CocoFormatError(ValueError):
  """A ground truth or results list that COCOeval would reject, or silently misread; the
  message names the entry at fault."""


class GroundTruthFormatError(CocoFormatError):
  """The ground truth (a COCO annotation dict) is not usable."""


class ResultsFormatError(CocoFormatError):
  """The results list does not fit its ground truth or the IoU types asked."""


def check_engine(engine: str) -> str:
  """`engine` when it is one of `ENGINES`; `ConfigError` naming ``eval.engine`` otherwise."""
  if engine not in ENGINES:
    raise ConfigError(f"config key 'eval.engine' = {engine!r}: must be one of {list(ENGINES)}")
  return engine


def _check_iou_types(iou_types: Sequence[str]) -> None:
  if isinstance(iou_types, str) or not iou_types or any(t not in IOU_TYPES for t in iou_types):
    raise ValueError(f'iou_types {iou_types!r}: must be a non-empty sequence of {IOU_TYPES}')


@dataclasses.dataclass(frozen=True, eq=False)
class GroundTruth:
  """A COCO ground truth indexed once by one engine (`index_ground_truth`), for any number of
  `coco_metrics` calls: COCOeval only reads it (and caches per-annotation masks in it).

  engine: one of `ENGINES`; coco: that engine's ``COCO`` object, annotation ids 1..n;
  image_sizes: image id -> (height, width); category_ids: the categories evaluated;
  has_masks: every annotation has a 'segmentation' (segm can be scored).
  """
  engine: str
  coco: Any
  image_sizes: Mapping[int, tuple[int, int]]
  category_ids: frozenset
  has_masks: bool

  @property
  def image_ids(self) -> tuple[int, ...]:
    return tuple(sorted(self.image_sizes))


def _checked_image_sizes(ground_truth: Any) -> dict[Any, tuple[int, int]]:
  """image id -> (height, width) of a COCO annotation dict; `GroundTruthFormatError` naming the
  first entry COCOeval cannot use."""
  if not isinstance(ground_truth, Mapping):
    raise GroundTruthFormatError(
        f'must be a COCO annotation object {{"images": [...], "annotations": [...], '
        f'"categories": [...]}}, not a {type(ground_truth).__name__}')
  for key in ('images', 'annotations', 'categories'):
    if not isinstance(ground_truth.get(key), list):
      raise GroundTruthFormatError(f'has no {key!r} list')
  sizes = {}
  for i, image in enumerate(ground_truth['images']):
    if not isinstance(image, Mapping) or any(k not in image for k in ('id', 'height', 'width')):
      raise GroundTruthFormatError(f"image {i} needs an 'id', a 'height' and a 'width'")
    if image['id'] in sizes:
      raise GroundTruthFormatError(f"image id {image['id']!r} appears twice")
    sizes[image['id']] = (int(image['height']), int(image['width']))
  for i, category in enumerate(ground_truth['categories']):
    if not isinstance(category, Mapping) or 'id' not in category:
      raise GroundTruthFormatError(f"category {i} has no 'id'")
  for i, ann in enumerate(ground_truth['annotations']):
    if not isinstance(ann, Mapping):
      raise GroundTruthFormatError(f'annotation {i} is not an object')
    # COCOeval reads each of these (iscrowd and area without a default).
    for key in ('image_id', 'category_id', 'bbox', 'area', 'iscrowd'):
      if key not in ann:
        raise GroundTruthFormatError(f"annotation {i} (id {ann.get('id')!r}) has no {key!r}")
  return sizes


def _renumbered(ground_truth: Mapping[str, Any]) -> dict[str, Any]:
  """A copy with annotation ids 1..n (see the module docstring). The entries are copied one
  level deep, enough for COCOeval's in-place additions (ignore flags, masks) to stay in the copy;
  polygons and RLE counts are shared, never modified."""
  gt = {k: v for k, v in ground_truth.items() if k not in ('images', 'annotations', 'categories')}
  gt['images'] = [dict(image) for image in ground_truth['images']]
  gt['categories'] = [dict(category) for category in ground_truth['categories']]
  gt['annotations'] = [dict(ann, id=i + 1) for i, ann in enumerate(ground_truth['annotations'])]
  gt.setdefault('info', {})
  gt.setdefault('licenses', [])
  return gt


def index_ground_truth(ground_truth: Mapping[str, Any], engine: str = 'pycocotools'
                       ) -> GroundTruth:
  """`ground_truth` (a COCO annotation dict: images, annotations, categories) indexed by
  `engine` (one of `ENGINES`, else `ConfigError`), annotation ids renumbered 1..n.

  `GroundTruthFormatError` names the first image, category or annotation COCOeval cannot use.
  The caller's dict is not modified.
  """
  check_engine(engine)
  sizes = _checked_image_sizes(ground_truth)
  data = _renumbered(ground_truth)
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
    if engine == 'pycocotools':
      index = COCO()
      index.dataset = data
      index.createIndex()
    else:
      try:
        import faster_coco_eval  # pylint: disable=import-outside-toplevel  # only when chosen
      except ImportError:
        raise ConfigError("config key 'eval.engine' = 'faster_coco_eval': the faster-coco-eval "
                          'package is not installed (pip install -r requirements.txt)') from None
      index = faster_coco_eval.COCO(data)
  return GroundTruth(
      engine=engine, coco=index, image_sizes=sizes,
      category_ids=frozenset(c['id'] for c in data['categories']),
      has_masks=all('segmentation' in ann for ann in data['annotations']))


def _is_number(value) -> bool:
  """A finite int or float (NumPy's too), not a bool."""
  kind = type(value)
  if kind is float or kind is int:  # the common case first: checks run on every result
    return math.isfinite(value)
  return isinstance(value, (np.integer, np.floating)) and math.isfinite(value)


def _is_mapping(value) -> bool:
  return type(value) is dict or isinstance(value, Mapping)


def check_results(results: Sequence[Mapping[str, Any]], ground_truth: GroundTruth,
                  iou_types: Sequence[str] = IOU_TYPES) -> None:
  """Raises `ResultsFormatError` naming the first result COCOeval would reject or misread.

  Every result needs image_id (an image of `ground_truth`), an integer category_id, a finite
  score, and a bbox [x, y, w, h] (or, in no result at all: boxes then come from the masks, as
  pycocotools does); with 'segm' in iou_types a segmentation too (compressed or uncompressed RLE
  of the image's size, or polygons). Category ids the ground truth does not have are allowed:
  COCOeval ignores those results. About 1.5 s per million results.
  """
  if not isinstance(results, (list, tuple)):
    raise ResultsFormatError(f'must be a list (a JSON array) of detections, not a '
                             f'{type(results).__name__}')
  sizes = {k: list(v) for k, v in ground_truth.image_sizes.items()}
  with_masks = 'segm' in iou_types
  first_has_bbox = None
  unknown_images = {}
  for i, result in enumerate(results):
    if not _is_mapping(result):
      raise ResultsFormatError(f'result {i} is not an object: {str(result)[:60]}')
    try:
      image_id, category_id, score = result['image_id'], result['category_id'], result['score']
    except KeyError as e:
      raise ResultsFormatError(f'result {i} has no {e.args[0]!r}') from None
    try:
      size = None if isinstance(image_id, bool) else sizes.get(image_id)
    except TypeError:  # unhashable, e.g. a list
      size = None
    if size is None:
      unknown_images.setdefault(image_id if isinstance(image_id, int) else repr(image_id), i)
      continue
    if not _is_number(score):
      raise ResultsFormatError(f'result {i} (image {image_id}): score {score!r} is not a finite '
                               f'number')
    if type(category_id) is not int and not isinstance(category_id, np.integer):
      raise ResultsFormatError(f'result {i} (image {image_id}): category_id {category_id!r} is '
                               f'not an integer')
    has_bbox = 'bbox' in result
    if first_has_bbox is None:
      first_has_bbox = has_bbox
    elif has_bbox != first_has_bbox:
      raise ResultsFormatError(
          f"result {i} (image {image_id}) {'has' if has_bbox else 'has no'} 'bbox' but the "
          f"first result {'has' if first_has_bbox else 'has none'}: give a box in every result "
          f'or in none (boxes then come from the masks)')
    box = result.get('bbox')
    if has_bbox and not (type(box) in (list, tuple) and len(box) == 4 and _is_number(box[0])
                         and _is_number(box[1]) and _is_number(box[2]) and _is_number(box[3])):
      raise ResultsFormatError(f"result {i} (image {image_id}): bbox {box!r} is not "
                               f'[x, y, width, height]')
    segmentation = result.get('segmentation')
    if segmentation is None:
      if with_masks:
        raise ResultsFormatError(
            f"result {i} (image {image_id}) has no 'segmentation': scoring segm needs a mask in "
            f'every result (evaluate bbox alone for box-only results)')
      if not has_bbox:
        raise ResultsFormatError(f"result {i} (image {image_id}) has neither 'bbox' nor "
                                 f"'segmentation'")
    elif _is_mapping(segmentation):
      mask_size = segmentation.get('size')
      if 'counts' not in segmentation or mask_size is None:
        raise ResultsFormatError(f"result {i} (image {image_id}): an RLE segmentation needs "
                                 f"'size' and 'counts'")
      if mask_size != size and [int(s) for s in mask_size] != size:
        raise ResultsFormatError(
            f'result {i} (image {image_id}): mask size {list(mask_size)} is not the image size '
            f'{size} (height, width)')
      if not has_bbox and not isinstance(segmentation['counts'], (str, bytes)):
        raise ResultsFormatError(f'result {i} (image {image_id}): without a bbox, the mask must '
                                 f'be compressed RLE (counts a string)')
    elif not (isinstance(segmentation, list) and has_bbox):
      raise ResultsFormatError(f'result {i} (image {image_id}): segmentation must be an RLE '
                               f"object {{'size', 'counts'}} (or polygons, with a 'bbox')")
  if unknown_images:
    image_id, index = next(iter(unknown_images.items()))
    more = (f' ({len(unknown_images)} such image ids: '
            f'{", ".join(str(k) for k in list(unknown_images)[:5])}'
            f'{", ..." if len(unknown_images) > 5 else ""})' if len(unknown_images) > 1 else '')
    raise ResultsFormatError(f'result {index}: image_id {image_id} is not an image of the ground '
                             f'truth{more}')


def _load_results(ground_truth: GroundTruth, results: Sequence[Mapping[str, Any]]):
  """The engine's results COCO object of `results` (copied: loadRes adds keys to each)."""
  copies = [dict(r) for r in results]
  if copies or ground_truth.engine != 'pycocotools':
    return ground_truth.coco.loadRes(copies)
  # pycocotools' loadRes cannot take an empty list; an empty detection set is still evaluable.
  empty = COCO()
  empty.dataset = {'images': list(ground_truth.coco.dataset['images']), 'annotations': [],
                   'categories': copy.deepcopy(ground_truth.coco.dataset['categories'])}
  empty.createIndex()
  return empty


def _cocoeval(ground_truth: GroundTruth, detections, iou_type: str):
  """The engine's COCOeval with COCO's standard parameters."""
  if ground_truth.engine == 'pycocotools':
    return COCOeval(ground_truth.coco, detections, iouType=iou_type)
  from faster_coco_eval import COCOeval_faster  # pylint: disable=import-outside-toplevel
  # Its extras off: no LVIS rules, no extra matching statistics; evaluation and accumulation in
  # one C++ pass (separate_eval=False gives the same numbers with less memory).
  return COCOeval_faster(ground_truth.coco, detections, iouType=iou_type, print_function=print,
                         extra_calc=False, lvis_style=False, separate_eval=False)


def coco_metrics(ground_truth: Mapping[str, Any] | GroundTruth,
                 results: Sequence[Mapping[str, Any]], iou_types: Sequence[str] = IOU_TYPES,
                 image_ids: Sequence[int] | None = None, engine: str | None = None
                 ) -> dict[str, float]:
  """COCOeval stats: {'bbox/AP': ..., ..., 'segm/ARl': ...} (the 12 of each IoU type).

  Args:
    ground_truth: a COCO annotation dict, or a `GroundTruth` indexed once (`index_ground_truth`).
    results: COCO results [{image_id, category_id, bbox, score, segmentation}] (`check_results`;
      `ResultsFormatError` otherwise). None of them is modified.
    iou_types: a subset of `IOU_TYPES`.
    image_ids: the images evaluated (default: every image of the ground truth).
    engine: one of `ENGINES`; None: the `GroundTruth`'s, or 'pycocotools' for a dict.

  Without any result, every stat is COCOeval's for an empty detection set: 0, or -1 where the
  ground truth has no object (e.g. APs without small objects). The printed summary goes to the log.
  """
  _check_iou_types(iou_types)
  if isinstance(ground_truth, GroundTruth):
    if engine is not None and check_engine(engine) != ground_truth.engine:
      raise ValueError(f'engine {engine!r}: the ground truth was indexed by '
                       f'{ground_truth.engine!r}')
  else:
    ground_truth = index_ground_truth(ground_truth, engine or 'pycocotools')
  if 'segm' in iou_types and not ground_truth.has_masks:
    raise GroundTruthFormatError("an annotation has no 'segmentation': segm cannot be scored")
  check_results(results, ground_truth, iou_types)
  out = {}
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    detections = _load_results(ground_truth, results)
    for iou_type in iou_types:
      evaluator = _cocoeval(ground_truth, detections, iou_type)
      if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
      evaluator.evaluate()
      evaluator.accumulate()
      print(f'--- {iou_type} ({ground_truth.engine})')
      evaluator.summarize()
      stats = np.asarray(evaluator.stats, np.float64)
      assert stats.shape == (len(STAT_NAMES),), stats.shape
      for name, value in zip(STAT_NAMES, stats):
        out[f'{iou_type}/{name}'] = float(value)
  logging.info('COCO evaluation:\n%s', text.getvalue())
  return out


def write_results(path: str, results: Sequence[Mapping[str, Any]]) -> None:
  """Writes the COCO results JSON (atomically: a reader never sees a partial file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_open(path) as f:
    json.dump(list(results), f)


def append_metrics_line(path: str, step: int, metrics: Mapping[str, float]) -> dict[str, Any]:
  """Appends ``{"step": step, "bbox/AP": ..., ...}`` as one JSON line to `path`; returns it."""
  line = {'step': int(step)}
  line.update({k: float(v) for k, v in metrics.items()})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a') as f:
    f.write(json.dumps(line) + '\n')
  return line
