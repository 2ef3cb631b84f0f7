"""Where a step's time goes: per-stage timings and ``jax.profiler`` trace summaries.

* `stage_breakdown`: each stage of the model (backbone + FPN, RPN + proposals, RoIAlign, heads,
  targets and losses, backward) jitted and timed on its own, one device, synthetic data;
* `trace`: a few more steps of a benchmark runner traced with ``jax.profiler`` and summarised
  by `profile_summary`: time per XLA op and per model stage, the stage of each op read from the
  compiled module's op_name metadata (`hlo_stage_map`, `_STAGE_RULES`).

Used by ``bench/benchmark_training.py`` and ``bench/benchmark_inference.py`` (``--stages``,
``--profile_dir``); `profile_summary(DIR, open(DIR + '/module.hlo.txt').read())` re-summarises a
saved trace.
"""

from __future__ import annotations

import datetime
import glob
import os
import re
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

from maskrcnn_jax import modeling
from maskrcnn_jax.data import synthetic
from maskrcnn_jax.data.spec import TRAIN_KEYS, GroundTruth
from maskrcnn_jax.modeling.model import MaskRCNN
from maskrcnn_jax.ops import targets
from maskrcnn_jax.train import experiment


# ------------------------------------------------------------------------------ stages
def _median_seconds(fn, repeats: int) -> float:
  """Median wall seconds of ``fn()`` (which returns arrays, waited for) after one warm-up."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def stage_breakdown(config, *, train: bool = True, repeats: int = 3, seed: int = 0
                    ) -> dict[str, Any]:
  """Per-stage times of one device's forward (and backward), each stage jitted on its own, at
  the config's canvas, precision and per-device batch (config.train's or config.eval's).

  Training stages: ``backbone_fpn`` (ResNet + FPN forward), ``rpn_proposals`` (RPN head +
  proposal selection with the training top-k and NMS), ``roi_align_box`` (512 RoIs/image at 7x7,
  the first proposals standing in for the sampled RoIs), ``box_head``, ``roi_align_mask`` (128
  RoIs at 14x14), ``mask_head``, ``forward_total`` (the whole training forward with losses),
  ``targets_losses`` (forward_total minus the stages above: anchor labelling, RoI sampling, mask
  targets, losses), ``forward_backward`` (value and gradient of the loss), ``backward``
  (forward_backward minus forward_total); plus ``backbone_fpn_fwd_bwd`` and
  ``roi_align_box_fwd_bwd`` (gradient into the features: the scatter-add) on their own.
  Inference stages: backbone_fpn, rpn_proposals (test settings), roi_align_box (all proposals),
  box_head, ``postprocess_masks`` (detect minus the box pooling and head: per-class NMS, mask
  RoIAlign and mask head), forward_total.

  Times are medians of ``repeats`` runs in ms; separate jits lose cross-stage fusion, so the
  parts do not add up exactly (the derived entries absorb the difference).
  """
  cfg = config
  model = experiment.build_model(cfg, inference=not train)
  dtype = modeling.DTYPES[cfg.model.precision]
  h, w = cfg.data.image_size
  b = int((cfg.train if train else cfg.eval).per_device_batch_size)
  variables = modeling.init_variables(model, jax.random.PRNGKey(0), (h, w))
  host = synthetic.synthetic_batch(b, (h, w), int(cfg.data.max_instances),
                                   int(cfg.data.gt_mask_size), int(cfg.model.num_classes),
                                   seed=seed)
  batch = jax.device_put({k: host[k] for k in TRAIN_KEYS})
  mean, std = tuple(cfg.data.pixel_mean), tuple(cfg.data.pixel_std)
  images = jax.jit(lambda x, s: modeling.normalize_images(x, s, mean, std, dtype))(
      batch['images'], batch['image_sizes'])
  sizes = batch['image_sizes']
  # NumPy constants, as in the model's own trace (anchor_grid is computed at trace time).
  anchors = model.apply(variables, h, w, method=MaskRCNN.anchor_grid)
  key = jax.random.PRNGKey(seed)
  compile_s, times = {}, {}

  def timed(name, fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s[name] = time.perf_counter() - t0
    times[name] = 1e3 * _median_seconds(lambda: compiled(*args), repeats)
    return compiled(*args)

  feats = timed('backbone_fpn', lambda v, x: model.apply(v, x, train, method=MaskRCNN.features),
                variables, images)
  _, _, props = timed(
      'rpn_proposals',
      lambda v, f, s: model.apply(v, f, anchors, s, train, method=MaskRCNN.proposals),
      variables, feats, sizes)
  m = cfg.model

  def pool(size):
    def call_pool(mod, f, r, s):
      return mod._pool(f, r, s)  # pylint: disable=protected-access
    return lambda v, f, r: model.apply(v, f, r, size, method=call_pool)

  def head(name):
    return lambda v, x: model.apply(v, x, method=lambda mod, x: getattr(mod, name)(x))

  if train:
    n_box = int(m.roi.batch_size_per_image)
    n_mask = targets.num_mask_rois(n_box, float(m.roi.fg_fraction))
    box_rois, mask_rois = props.boxes[:, :n_box], props.boxes[:, :n_mask]
  else:
    box_rois = props.boxes
  pooled = timed('roi_align_box', pool(int(m.roi.pooler_size)), variables, feats, box_rois)
  timed('box_head', head('box_head'), variables, pooled)
  if train:
    pooled = timed('roi_align_mask', pool(int(m.mask.pooler_size)), variables, feats, mask_rois)
    timed('mask_head', head('mask_head'), variables, pooled)
    gt = GroundTruth.from_batch(batch)

    # Ground truth and sizes are arguments, not closure constants: as constants XLA would
    # constant-fold the anchor matching at compile time (the real step has them as inputs).
    def loss(params, v, x, s, g, k):
      out = model.apply({**v, 'params': params}, x, s, g, train=True, rngs={'sampling': k})
      return out['total_loss']
    timed('forward_total', loss, variables['params'], variables, images, sizes, gt, key)
    timed('forward_backward', jax.value_and_grad(loss), variables['params'], variables, images,
          sizes, gt, key)

    def feats_loss(params, v, x):
      f = model.apply({**v, 'params': params}, x, True, method=MaskRCNN.features)
      return sum(jnp.sum(t.astype(jnp.float32)) for t in f.values())
    timed('backbone_fpn_fwd_bwd', jax.grad(feats_loss), variables['params'], variables, images)
    box_pool = pool(int(m.roi.pooler_size))

    def pool_loss(f, v, r):
      return jnp.sum(box_pool(v, f, r).astype(jnp.float32))
    timed('roi_align_box_fwd_bwd', jax.grad(pool_loss), feats, variables, box_rois)
    parts = ('backbone_fpn', 'rpn_proposals', 'roi_align_box', 'box_head', 'roi_align_mask',
             'mask_head')
    times['targets_losses'] = times['forward_total'] - sum(times[p] for p in parts)
    times['backward'] = times['forward_backward'] - times['forward_total']
  else:
    timed('detect', lambda v, f, p, s: model.apply(v, f, p, s, method=MaskRCNN.detect),
          variables, feats, props, sizes)
    timed('forward_total', lambda v, x, s: model.apply(v, x, s, train=False), variables, images,
          sizes)
    times['postprocess_masks'] = times.pop('detect') - times['roi_align_box'] - times['box_head']
  return {'benchmark': 'stages_' + ('training' if train else 'inference'),
          'date': datetime.datetime.now().isoformat(timespec='seconds'),
          'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
          'per_device_batch_size': b, 'image_size': [h, w], 'precision': cfg.model.precision,
          'repeats': repeats, 'stage_ms': times, 'compile_s': compile_s}


# ------------------------------------------------------------------------------ profiles
# Stage of an HLO instruction from its op_name (the JAX name stack: transforms, flax module
# paths and the MaskRCNN method names: features, proposals, detect, losses). First match wins;
# 'transpose(' marks the backward pass. The training forward is MaskRCNN.losses, which calls
# features, proposals and the heads; what is left in it is RoIAlign, targets and the losses.
_STAGE_RULES = (
    ('/backbone/', 'backbone'),
    ('/fpn/', 'fpn'),
    ('rpn_head', 'rpn_head'),
    ('MaskRCNN.proposals', 'proposals_nms'),
    ('box_head', 'box_head'),
    ('mask_head', 'mask_head'),
    ('MaskRCNN.detect', 'detect_roi_align_nms'),
    ('MaskRCNN.losses', 'roi_align_targets_losses'),
    ('MaskRCNN', 'model_other'),
)


def _stage_of_op_name(op_name: str) -> str:
  stage = 'optimizer_other'
  for needle, label in _STAGE_RULES:
    if needle in op_name:
      stage = label
      break
  last = op_name.rsplit('/', 1)[-1]
  if stage in ('roi_align_targets_losses', 'detect_roi_align_nms') and (
      last.startswith('gather') or last.startswith('scatter')):
    stage = 'gather_scatter'  # RoIAlign's bilinear gathers and their scatter-add gradients
  if 'transpose(' in op_name:
    stage += ' (bwd)'
  return stage


def hlo_stage_map(hlo_text: str) -> tuple[str | None, dict[str, str]]:
  """(module name, {instruction name: stage}) from a compiled module's ``as_text()``.

  Instructions keep the op_name of the JAX operation they come from, except some that XLA
  creates: a fusion without metadata is labelled by its fused computation's root, and XLA CPU's
  convolution weight gradients (a convolution whose window spans the whole image, rewritten
  with transposed operands) lose their metadata: those are ``conv_weight_grad (bwd)``, the
  operand transposes ``layout_copies``.
  """
  module = re.search(r'^HloModule (\S+?)[,\s]', hlo_text, re.M)
  instr = re.compile(r'^\s*(?:ROOT )?%?([^\s=]+) = \S+ ([\w-]+)\(')
  roots: dict[str, str] = {}  # computation -> opcode of its root
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r'^(?:ENTRY )?%?([^\s(]+) \(', line)
    if head and line.rstrip().endswith('{'):
      current = head.group(1)
      continue
    if current and line.lstrip().startswith('ROOT '):
      m = instr.match(line)
      if m:
        roots[current] = m.group(2)
  stages = {}
  for line in hlo_text.splitlines():
    m = instr.match(line)
    if not m:
      continue
    name, opcode = m.group(1).lstrip('%'), m.group(2)
    op_name = re.search(r'op_name="([^"]*)"', line)
    if op_name and '/' in op_name.group(1):
      stages[name] = _stage_of_op_name(op_name.group(1))
      continue
    called = re.search(r'calls=%?([^\s,}]+)', line)
    kind = roots.get(called.group(1), opcode) if called else opcode
    if kind == 'convolution':
      stages[name] = 'conv_weight_grad (bwd)'
    elif kind in ('copy', 'transpose'):
      stages[name] = 'layout_copies'
  return (module.group(1) if module else None), stages


def profile_summary(trace_dir: str, hlo_text: str | None = None, top: int = 25
                    ) -> dict[str, Any]:
  """Summary of the newest ``jax.profiler`` trace under ``trace_dir``: time per XLA op (the
  ``top`` largest, as [name, ms, stage]) and, given the compiled module's ``hlo_text``, per
  model stage (see `hlo_stage_map`). GPU: the device planes' "XLA Ops" lines; CPU: the host
  events that carry an ``hlo_op`` stat (thunks; a while loop's time includes its body's ops)."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True),
                 key=os.path.getmtime)
  if not files:
    return {'error': f'no .xplane.pb under {trace_dir}'}
  module, stage_of = hlo_stage_map(hlo_text) if hlo_text else (None, {})
  data = ProfileData.from_file(files[-1])
  per_op: dict[str, float] = {}
  per_stage: dict[str, float] = {}
  device_planes = [p for p in data.planes if p.name.startswith('/device:')]
  for plane in device_planes or [p for p in data.planes if p.name.startswith('/host:CPU')]:
    for line in plane.lines:
      on_device = bool(device_planes) and line.name == 'XLA Ops'
      for event in line.events:
        stats = dict(event.stats)
        if not on_device and 'hlo_op' not in stats:
          continue
        mod = str(stats.get('hlo_module', ''))
        if module and mod and mod not in module and module not in mod:
          continue  # another program's op
        name = str(stats.get('hlo_op', event.name))
        ms = event.duration_ns / 1e6
        per_op[name] = per_op.get(name, 0.0) + ms
        stage = stage_of.get(name, 'unmapped')
        per_stage[stage] = per_stage.get(stage, 0.0) + ms
  ops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
  return {'file': files[-1], 'module': module,
          'device_planes': [p.name for p in device_planes], 'total_ms': sum(per_op.values()),
          'stage_ms': dict(sorted(per_stage.items(), key=lambda kv: -kv[1])),
          'top_ops': [[k, round(v, 3), stage_of.get(k, 'unmapped')] for k, v in ops]}


def trace(runner, profile_dir: str, steps: int, start: int) -> dict[str, Any] | None:
  """Traces ``steps`` more steps of a benchmark runner (from step ``start``) into
  ``profile_dir``, keeps the compiled module beside the trace (``module.hlo.txt``) and returns
  `profile_summary`; the drivers' ``profile=`` hook."""
  if steps <= 0:
    return None
  with jax.profiler.trace(profile_dir):
    runner.window(steps, start)
  hlo = runner.compiled.as_text()
  with open(os.path.join(profile_dir, 'module.hlo.txt'), 'w') as f:
    f.write(hlo)
  return profile_summary(profile_dir, hlo)
