"""CPU benchmark of the NMS / proposal and RoIAlign ops against torchvision (not a test).

Usage (from the repository root; torchvision side by side needs a venv with torch, torchvision
and this package, here $TORCH_VENV):

  $TORCH_VENV/bin/python bench/ops.py [--repeats 20] [--json out.json] [--no-torch]
  .venv/bin/python bench/ops.py          # JAX only when torch is not importable

Workloads (the reference's training shapes, 832x1344 canvas, batch 2):

* ``proposals``: :func:`maskrcnn_jax.ops.proposals.multilevel_proposals` on P2-P6 anchors (3 per
  location: 209,664 on P2 down to 819 on P6) with random logits and deltas, 2000
  candidates per level, IoU 0.7, 1000 kept per level and overall. torchvision: the same steps as
  ``RegionProposalNetwork.filter_proposals`` (per-level top-k, ``BoxCoder.decode``,
  ``clip_boxes_to_image``, ``remove_small_boxes``, ``batched_nms`` with the level as the class,
  first 1000), one image at a time as torchvision does.
  ``proposals_clustered``: the same with logits clustered around 20 objects per image.
* ``nms``: plain NMS of 2 x 2000 boxes (the P2 candidates above), ``jax.vmap(nms)`` against a
  loop of ``torchvision.ops.nms``.
* ``roi_align``: :func:`maskrcnn_jax.ops.roi_align.multilevel_roi_align` of 2 x 512 RoIs, 7x7,
  256 channels, P2-P5, forward and forward+backward (gradient w.r.t. the features), against
  ``torchvision.ops.MultiScaleRoIAlign`` on the same data in NCHW.

Times are medians over ``--repeats`` runs after one warm-up; JAX compile time (lower + compile)
is reported separately. Both libraries use all CPU cores (torch.set_num_threads(os.cpu_count())).
The script also prints how far the two results agree and, for NMS, how many fixed-point sweeps
the tiled resolution needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax import huge_pages
from maskrcnn_jax.ops import anchors as anchor_ops
from maskrcnn_jax.ops import nms as nms_ops
from maskrcnn_jax.ops import proposals as proposal_ops
from maskrcnn_jax.ops import roi_align as roi_ops
from maskrcnn_jax.ops.boxes import box_iou, clip_boxes, decode_boxes

CANVAS = (832, 1344)
IMAGE_SIZES = np.array([[832, 1248], [800, 1344]], np.int32)  # valid regions of the 2 images
LEVELS = (2, 3, 4, 5, 6)
PRE_NMS, POST_NMS, NMS_THRESHOLD = 2000, 1000, 0.7


def _median_time(fn, repeats: int) -> float:
  """Median wall seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _compile_time(jitted, *args) -> tuple[float, object]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return time.perf_counter() - start, compiled


def _proposal_inputs(rng: np.random.Generator, clustered: bool):
  """Reference anchors of P2-P6 on the canvas and logits / deltas for batch 2.

  ``clustered=False``: independent N(-2, 2) logits. ``clustered=True``: a trained RPN's pattern,
  logits rising with the anchor's best IoU with 20 random objects per image, so high scores come
  in dense overlapping clusters (longer suppression chains for the fixed-point resolution).
  """
  shapes = {l: anchor_ops.reference_anchor_shapes(l, 1, 8.0, ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)))
            for l in LEVELS}
  anchors = anchor_ops.multilevel_anchors(*CANVAS, LEVELS[0], LEVELS[-1], shapes)
  objects = []
  for _ in range(2):
    size = np.exp(rng.uniform(np.log(24), np.log(600), (20, 2)))
    x1 = rng.uniform(0, CANVAS[1] - size[:, 0])
    y1 = rng.uniform(0, CANVAS[0] - size[:, 1])
    objects.append(np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], -1).astype(np.float32))
  scores, deltas = {}, {}
  for name, a in anchors.items():
    n = a.shape[0]
    if clustered:
      best = np.stack([np.asarray(box_iou(a, o)).max(axis=1) for o in objects])
      scores[name] = (8.0 * best - 4.0 + rng.normal(0.0, 0.5, (2, n))).astype(np.float32)
    else:
      scores[name] = rng.normal(-2.0, 2.0, (2, n)).astype(np.float32)
    # Deltas of a few tenths: boxes near their anchors.
    deltas[name] = rng.normal(0.0, 0.2, (2, n, 4)).astype(np.float32)
  return anchors, scores, deltas


def _sweep_counts(boxes: np.ndarray, valid: np.ndarray, threshold: float, tile: int) -> list[int]:
  """Jacobi sweeps per tile that ``nms`` runs on sorted candidates (NumPy, for the report)."""
  iou = np.asarray(box_iou(boxes, boxes)).astype(np.float64) > threshold
  n = len(boxes)
  keep = np.zeros(n, bool)
  counts = []
  for start in range(0, n, tile):
    end = min(start + tile, n)
    cand = valid[start:end] & ~(iou[start:end, :start] & keep[None, :start]).any(1)
    lower = iou[start:end, start:end] & np.tri(end - start, k=-1, dtype=bool)
    previous, current, sweeps = cand, cand & ~(lower & cand[None]).any(1), 1
    while (previous != current).any():
      previous, current = current, cand & ~(lower & current[None]).any(1)
      sweeps += 1
    keep[start:end] = current
    counts.append(sweeps)
  return counts


def bench_proposals(args, rng, torch_mods, clustered: bool):
  anchors, scores, deltas = _proposal_inputs(rng, clustered)
  fn = jax.jit(lambda s, d, a, sz: proposal_ops.multilevel_proposals(
      s, d, a, sz, PRE_NMS, POST_NMS, NMS_THRESHOLD, 0.0))
  jargs = ({k: jnp.asarray(v) for k, v in scores.items()},
           {k: jnp.asarray(v) for k, v in deltas.items()},
           {k: jnp.asarray(v) for k, v in anchors.items()}, jnp.asarray(IMAGE_SIZES))
  compile_s, compiled = _compile_time(fn, *jargs)
  jax_s = _median_time(lambda: jax.block_until_ready(compiled(*jargs)), args.repeats)
  boxes, out_scores, valid = (np.asarray(x) for x in compiled(*jargs))
  result = {'workload': 'multilevel_proposals B=2 P2-P6 pre=2000 post=1000 iou=0.7, '
                        + ('clustered' if clustered else 'random') + ' scores',
            'jax_compile_s': compile_s, 'jax_s': jax_s}

  # Sorted P2 candidates of image 0: the plain-NMS workload and the sweep statistics.
  top = np.argsort(-scores['p2'], axis=1, kind='stable')[:, :PRE_NMS]
  p2_scores = np.take_along_axis(scores['p2'], top, 1)
  p2_boxes = np.asarray(clip_boxes(decode_boxes(
      np.take_along_axis(deltas['p2'], top[..., None], 1), anchors['p2'][top]),
      IMAGE_SIZES[:, None, 0], IMAGE_SIZES[:, None, 1]))
  sweeps = {}
  for name in scores:
    k = min(PRE_NMS, scores[name].shape[1])
    t = np.argsort(-scores[name][0], kind='stable')[:k]
    b = np.asarray(clip_boxes(decode_boxes(deltas[name][0, t], anchors[name][t]),
                              *IMAGE_SIZES[0]))
    counts = _sweep_counts(b, np.ones(k, bool), NMS_THRESHOLD, nms_ops.DEFAULT_TILE_SIZE)
    sweeps[name] = ' '.join(str(c) for c in counts)
  result['sweeps_per_tile_image0'] = sweeps

  if torch_mods is not None:
    torch, tv = torch_mods
    # pylint: disable-next=import-outside-toplevel
    from torchvision.models.detection._utils import BoxCoder
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    t_scores = {k: torch.from_numpy(v) for k, v in scores.items()}
    t_deltas = {k: torch.from_numpy(v) for k, v in deltas.items()}
    t_anchors = {k: torch.from_numpy(v) for k, v in anchors.items()}

    def torch_proposals():
      out = []
      for b in range(2):
        all_boxes, all_probs, all_logits, all_levels = [], [], [], []
        for i, name in enumerate(sorted(t_scores)):
          s = t_scores[name][b]
          top_s, top_i = s.topk(min(PRE_NMS, s.numel()))
          bx = coder.decode_single(t_deltas[name][b, top_i], t_anchors[name][top_i])
          bx = tv.ops.clip_boxes_to_image(bx, tuple(int(v) for v in IMAGE_SIZES[b]))
          all_boxes.append(bx)
          all_probs.append(torch.sigmoid(top_s))
          all_logits.append(top_s)
          all_levels.append(torch.full_like(top_s, i, dtype=torch.int64))
        bx, pr, lg, lv = (torch.cat(x) for x in (all_boxes, all_probs, all_logits, all_levels))
        keep = tv.ops.remove_small_boxes(bx, 0.0)
        bx, pr, lg, lv = bx[keep], pr[keep], lg[keep], lv[keep]
        keep = tv.ops.batched_nms(bx, pr, lv, NMS_THRESHOLD)[:POST_NMS]
        out.append((bx[keep], lg[keep]))
      return out

    with torch.no_grad():
      result['torch_s'] = _median_time(torch_proposals, args.repeats)
      ref = torch_proposals()
    result['ratio_torch_over_jax'] = result['torch_s'] / jax_s
    # torchvision orders by sigmoid(logit), so equal probabilities may swap places: compare the
    # selected sets (sorted by logit) and the largest coordinate difference.
    same_set, max_err = [], 0.0
    for b in range(2):
      ours_logits, ours_boxes = out_scores[b][valid[b]], boxes[b][valid[b]]
      ref_logits, ref_boxes = ref[b][1].numpy(), ref[b][0].numpy()
      same = len(ours_logits) == len(ref_logits) and np.array_equal(np.sort(ours_logits),
                                                                    np.sort(ref_logits))
      same_set.append(bool(same))
      if same:
        order_o, order_r = np.argsort(ours_logits), np.argsort(ref_logits)
        max_err = max(max_err, float(np.abs(ours_boxes[order_o] - ref_boxes[order_r]).max()))
    result['same_proposals_as_torchvision'] = same_set
    result['max_abs_box_diff_vs_torchvision'] = max_err
  return result, (p2_boxes, p2_scores)


def bench_nms(args, data, torch_mods):
  boxes, scores = data  # (2, 2000, 4), (2, 2000)
  fn = jax.jit(jax.vmap(lambda b, s: nms_ops.nms(b, s, NMS_THRESHOLD, POST_NMS)))
  jargs = (jnp.asarray(boxes), jnp.asarray(scores))
  compile_s, compiled = _compile_time(fn, *jargs)
  jax_s = _median_time(lambda: jax.block_until_ready(compiled(*jargs)), args.repeats)
  result = {'workload': 'nms 2 x 2000 boxes iou=0.7 max 1000', 'jax_compile_s': compile_s,
            'jax_s': jax_s}
  if torch_mods is not None:
    torch, tv = torch_mods
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    run = lambda: [tv.ops.nms(tb[i], ts[i], NMS_THRESHOLD)[:POST_NMS] for i in range(2)]
    result['torch_s'] = _median_time(run, args.repeats)
    result['ratio_torch_over_jax'] = result['torch_s'] / jax_s
    idx, valid = (np.asarray(x) for x in compiled(*jargs))
    ref = run()
    result['equal_to_torchvision'] = all(
        np.array_equal(idx[i][valid[i]], ref[i].numpy()) for i in range(2))
  return result


def _roi_inputs(rng: np.random.Generator):
  features = {f'p{l}': rng.standard_normal(
      (2, -(-CANVAS[0] // 2**l), -(-CANVAS[1] // 2**l), 256)).astype(np.float32)
      for l in (2, 3, 4, 5)}
  # RoI sizes log-uniform in [16, 640] px so that every level gets boxes.
  size = np.exp(rng.uniform(np.log(16), np.log(640), (2, 512, 2)))
  x1 = rng.uniform(0, CANVAS[1] - size[..., 0])
  y1 = rng.uniform(0, CANVAS[0] - size[..., 1])
  boxes = np.stack([x1, y1, x1 + size[..., 0], y1 + size[..., 1]], -1).astype(np.float32)
  cotangent = rng.standard_normal((2, 512, 7, 7, 256)).astype(np.float32)
  return features, boxes, cotangent


def bench_roi_align(args, rng, torch_mods):
  features, boxes, cotangent = _roi_inputs(rng)
  # aligned=False, eps=1e-6: torchvision's MultiScaleRoIAlign.
  op = lambda f, b: roi_ops.multilevel_roi_align(f, b, 7, 2, 5, sampling_ratio=2, aligned=False)
  jfeat = {k: jnp.asarray(v) for k, v in features.items()}
  jboxes, jcot = jnp.asarray(boxes), jnp.asarray(cotangent)
  fwd = jax.jit(op)

  @jax.jit
  def fwd_bwd(f, b, cot):
    out, vjp = jax.vjp(lambda f: op(f, b), f)
    return out, vjp(cot)[0]

  fwd_compile, fwd_c = _compile_time(fwd, jfeat, jboxes)
  bwd_compile, bwd_c = _compile_time(fwd_bwd, jfeat, jboxes, jcot)
  result = {'workload': 'multilevel_roi_align 2 x 512 RoIs 7x7 C=256 P2-P5 832x1344',
            'jax_compile_fwd_s': fwd_compile, 'jax_compile_fwd_bwd_s': bwd_compile,
            'jax_fwd_s': _median_time(lambda: jax.block_until_ready(fwd_c(jfeat, jboxes)),
                                      args.repeats),
            'jax_fwd_bwd_s': _median_time(
                lambda: jax.block_until_ready(fwd_bwd(jfeat, jboxes, jcot)), args.repeats)}
  if torch_mods is not None:
    torch, tv = torch_mods
    pooler = tv.ops.MultiScaleRoIAlign(['p2', 'p3', 'p4', 'p5'], 7, 2)
    t_feat = {k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2)))
              for k, v in features.items()}
    t_boxes = [torch.from_numpy(boxes[i]) for i in range(2)]
    t_cot = torch.from_numpy(np.ascontiguousarray(
        cotangent.reshape(1024, 7, 7, 256).transpose(0, 3, 1, 2)))
    shapes = [CANVAS, CANVAS]

    def torch_fwd():
      with torch.no_grad():
        return pooler(t_feat, t_boxes, shapes)

    def torch_fwd_bwd():
      leaves = {k: v.clone().requires_grad_(True) for k, v in t_feat.items()}
      out = pooler(leaves, t_boxes, shapes)
      out.backward(t_cot)
      return out, leaves

    result['torch_fwd_s'] = _median_time(torch_fwd, args.repeats)
    result['torch_fwd_bwd_s'] = _median_time(torch_fwd_bwd, args.repeats)
    result['ratio_fwd_torch_over_jax'] = result['torch_fwd_s'] / result['jax_fwd_s']
    result['ratio_fwd_bwd_torch_over_jax'] = result['torch_fwd_bwd_s'] / result['jax_fwd_bwd_s']
    out, grads = fwd_bwd(jfeat, jboxes, jcot)
    t_out, leaves = torch_fwd_bwd()
    t_out = t_out.detach().numpy().reshape(2, 512, 256, 7, 7).transpose(0, 1, 3, 4, 2)
    result['max_abs_err_fwd'] = float(np.abs(np.asarray(out) - t_out).max())
    result['max_abs_err_grad'] = float(max(
        np.abs(np.asarray(grads[k]) - leaves[k].grad.numpy().transpose(0, 2, 3, 1)).max()
        for k in features))
  return result


def _import_torch(no_torch: bool):
  if no_torch:
    return None
  try:  # torch is optional: without it the JAX side runs alone
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count())
  return torch, torchvision


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--json', default=None, help='also write the results to this JSON file')
  parser.add_argument('--no-torch', action='store_true', help='skip the torchvision side')
  parser.add_argument('--only', choices=('proposals', 'nms', 'roi_align'), default=None)
  args = parser.parse_args()
  torch_mods = _import_torch(args.no_torch)
  rng = np.random.default_rng(0)
  info = {'jax': jax.__version__, 'backend': jax.default_backend(), 'cpus': os.cpu_count(),
          'machine': platform.processor() or platform.machine(),
          'torch': None if torch_mods is None else torch_mods[0].__version__,
          'torchvision': None if torch_mods is None else torch_mods[1].__version__,
          'date': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  results = {'info': info}
  if args.only in (None, 'proposals', 'nms'):
    results['proposals'], p2 = bench_proposals(args, rng, torch_mods, clustered=False)
    if args.only in (None, 'nms'):
      results['nms'] = bench_nms(args, p2, torch_mods)
    if args.only in (None, 'proposals'):
      results['proposals_clustered'], _ = bench_proposals(args, rng, torch_mods, clustered=True)
  if args.only in (None, 'roi_align'):
    results['roi_align'] = bench_roi_align(args, rng, torch_mods)
  print(json.dumps(results, indent=2))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  huge_pages.restart_with_huge_pages()
  main()
