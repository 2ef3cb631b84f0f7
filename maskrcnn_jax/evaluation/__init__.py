"""COCO evaluation: detections -> COCO results (RLE masks), ground truth from the dataset, metrics.

  coco        pure conversions and pycocotools metrics (no JAX model needed)
  evaluator   inference over the evaluation split and the metrics of one set of variables
"""
