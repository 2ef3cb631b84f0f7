"""COCO evaluation: ground truth from the dataset, detections -> COCO results, pycocotools metrics.

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
* `coco_metrics` runs pycocotools' COCOeval for bbox and segm and returns the twelve stats of
  each as ``{'bbox/AP': ..., 'segm/ARl': ...}``.

Annotation ids. pycocotools treats a matched ground-truth id of 0 as "unmatched" (``dtm`` holds
the matched id and is tested for truth in ``accumulate``), so a dataset whose annotation ids start
at 0 loses recall. `coco_metrics` therefore renumbers the ground truth's annotation ids 1..n.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax.ops import masks as mask_ops

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
def _renumbered(ground_truth: Mapping[str, Any]) -> dict[str, Any]:
  gt = copy.deepcopy(dict(ground_truth))
  for i, ann in enumerate(gt['annotations']):
    ann['id'] = i + 1
  gt.setdefault('info', {})
  gt.setdefault('licenses', [])
  return gt


def coco_metrics(ground_truth: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                 iou_types: Sequence[str] = IOU_TYPES, image_ids: Sequence[int] | None = None
                 ) -> dict[str, float]:
  """pycocotools COCOeval stats: {'bbox/AP': ..., ..., 'segm/ARl': ...} (12 per IoU type).

  image_ids: the images evaluated (default: every image of the ground truth). Without any
  result every stat is 0. pycocotools' printed summary goes to the log.
  """
  out = {}
  if not results:
    return {f'{t}/{s}': 0.0 for t in iou_types for s in STAT_NAMES}
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    gt = COCO()
    gt.dataset = _renumbered(ground_truth)
    gt.createIndex()
    dt = gt.loadRes([dict(r) for r in results])
    for iou_type in iou_types:
      evaluator = COCOeval(gt, dt, iouType=iou_type)
      if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
      evaluator.evaluate()
      evaluator.accumulate()
      print(f'--- {iou_type}')
      evaluator.summarize()
      for name, value in zip(STAT_NAMES, evaluator.stats):
        out[f'{iou_type}/{name}'] = float(value)
  logging.info('COCO evaluation:\n%s', text.getvalue())
  return out


def write_results(path: str, results: Sequence[Mapping[str, Any]]) -> None:
  """Writes the COCO results JSON (atomically: a reader never sees a partial file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(list(results), f)
  os.replace(tmp, path)


def append_metrics_line(path: str, step: int, metrics: Mapping[str, float]) -> dict[str, Any]:
  """Appends ``{"step": step, "bbox/AP": ..., ...}`` as one JSON line to `path`; returns it."""
  line = {'step': int(step)}
  line.update({k: float(v) for k, v in metrics.items()})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a') as f:
    f.write(json.dumps(line) + '\n')
  return line
