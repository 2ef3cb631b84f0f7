"""Training and inference throughput benchmarks (the reference's benchmark scripts, and more).

The reference (NVIDIA TF2 Mask R-CNN) times ``num_steps`` steps, drops the first ones as warm-up
and reports the average images/s of the rest. Here, in addition:

* batch size per device, compute precision, number of local devices (``jax.pmap``), canvas size;
* synthetic batches (:mod:`maskrcnn_jax.data.synthetic`, no TensorFlow) or the prepared TFDS
  dataset through :mod:`maskrcnn_jax.data.pipeline` (``data='real'``);
* compile time reported apart from the timed steps; FLOPs per image from XLA's cost analysis of the
  compiled step and the model FLOP utilisation against a peak (`PEAK_TFLOPS` or an argument);
* device memory where the backend reports it (``device.memory_stats()``; None on CPU);
* latency percentiles per batch for inference (a separate pass that waits for every batch);
* optionally torchvision's Mask R-CNN R50-FPN on the same canvas, batch and threads, timed in
  the same process in alternating windows so that both see the same machine load, and the ratio;
* optionally a per-stage breakdown (`stage_breakdown`): each part of the model jitted and timed
  on its own (backbone, RPN + proposals, RoIAlign, heads, targets and losses, backward).

The host stays out of the loop: synthetic batches are put on the devices before timing (a ring
of a few distinct batches), real batches are prefetched two ahead, and the timers wait for the
devices only at the end of each timed window. The entry points return a JSON-able dict (see
`RESULT_KEYS`) and `write_json` stores it. ``launch/benchmark_{training,inference}.py`` and
``python -m maskrcnn_jax.main --config.mode=benchmark_train|benchmark_inference`` call them.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Dense (no sparsity) peak TFLOP/s per device by compute precision, from NVIDIA's data sheets:
# H100 SXM / H200 (same Hopper SM, 989 TFLOP/s BF16/FP16, 495 TF32), A100 SXM (312 BF16/FP16,
# 156 TF32), V100 SXM2 (125 FP16 tensor, 15.7 FP32). float32 uses the TF32 figure because XLA's
# default matmul/conv precision on Ampere and later runs float32 through TF32 tensor cores.
# Matched by substring of ``device.device_kind`` (first match wins). Override with
# ``peak_tflops=``.
PEAK_TFLOPS = (
    ('H200', {'bfloat16': 989.0, 'float16': 989.0, 'float32': 495.0}),
    ('H100', {'bfloat16': 989.0, 'float16': 989.0, 'float32': 495.0}),
    ('A100', {'bfloat16': 312.0, 'float16': 312.0, 'float32': 156.0}),
    ('V100', {'bfloat16': None, 'float16': 125.0, 'float32': 15.7}),
)

# Keys every result dict carries (the test checks them).
RESULT_KEYS = ('benchmark', 'framework', 'date', 'host', 'load_average', 'jax_version', 'backend',
               'device_kind', 'num_devices', 'per_device_batch_size', 'global_batch_size',
               'image_size', 'precision', 'data', 'num_steps', 'warmup_steps', 'timed_steps',
               'compile_s', 'images_per_sec', 'step_time_ms', 'flops_per_image',
               'peak_tflops_per_device', 'mfu', 'memory', 'torchvision')
INFERENCE_KEYS = ('latency_ms',)


# ------------------------------------------------------------------------------ configuration
def prepare_config(config: ml_collections.ConfigDict, *, per_device_batch_size: int | None = None,
                   precision: str | None = None, image_size: tuple[int, int] | None = None,
                   train: bool = True) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the benchmark's overrides applied (None keeps the config's)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  if per_device_batch_size is not None:
    if train:
      cfg.train.per_device_batch_size = int(per_device_batch_size)
    else:
      cfg.eval.per_device_batch_size = int(per_device_batch_size)
  if precision is not None:
    cfg.model.precision = precision
  if image_size is not None:
    cfg.data.image_size = tuple(int(v) for v in image_size)
  return cfg


def peak_tflops_for(device_kind: str, precision: str) -> float | None:
  """Dense peak TFLOP/s of one device of this kind at this precision, or None if unknown."""
  for name, table in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return table.get(precision)
  return None


def _devices(num_devices: int | None):
  devices = jax.local_devices()
  if num_devices is None or num_devices <= 0:
    return devices
  if num_devices > len(devices):
    raise ValueError(f'num_devices={num_devices} but only {len(devices)} local devices')
  return devices[:num_devices]


def _load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _memory(devices) -> dict[str, Any] | None:
  """bytes_in_use / peak_bytes_in_use / bytes_limit of the first device, None if not reported."""
  stats = devices[0].memory_stats()
  if not stats:
    return None
  keys = ('bytes_in_use', 'peak_bytes_in_use', 'bytes_limit', 'largest_alloc_size')
  return {k: int(stats[k]) for k in keys if k in stats}


def _flops(compiled) -> float | None:
  """FLOPs of one execution of the compiled (per-device) program, per XLA's cost analysis.

  XLA counts each while-loop body once (NMS rounds are data dependent), so the figure is a
  lower bound dominated by the convolutions and matmuls.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def _base_result(kind: str, cfg, devices, per_device_batch: int, data: str, num_steps: int,
                 warmup_steps: int) -> dict[str, Any]:
  return {
      'benchmark': kind,
      'framework': 'maskrcnn_jax',
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'host': platform.node(),
      'cpu': platform.processor() or platform.machine(),
      'cpu_count': os.cpu_count(),
      'load_average': _load_average(),
      'jax_version': jax.__version__,
      'backend': jax.default_backend(),
      'device_kind': devices[0].device_kind,
      'num_devices': len(devices),
      'per_device_batch_size': per_device_batch,
      'global_batch_size': per_device_batch * len(devices),
      'image_size': list(cfg.data.image_size),
      'precision': cfg.model.precision,
      'data': data,
      'num_steps': num_steps,
      'warmup_steps': warmup_steps,
      'timed_steps': num_steps - warmup_steps,
  }


def _finish_result(result, compiled, devices, per_device_batch: int, seconds: float,
                   timed_images: int, peak_tflops: float | None) -> dict[str, Any]:
  """Adds throughput, FLOPs, MFU and memory to ``result``."""
  timed_steps = result['timed_steps']
  result['images_per_sec'] = timed_images / seconds if seconds > 0 else None
  result['step_time_ms'] = 1e3 * seconds / max(timed_steps, 1)
  flops = _flops(compiled)
  result['flops_per_image'] = flops / per_device_batch if flops else None
  if peak_tflops is None:
    peak_tflops = peak_tflops_for(devices[0].device_kind, result['precision'])
  result['peak_tflops_per_device'] = peak_tflops
  if peak_tflops and result['flops_per_image'] and result['images_per_sec']:
    achieved = result['flops_per_image'] * result['images_per_sec'] / len(devices)
    result['mfu'] = achieved / (peak_tflops * 1e12)
  else:
    result['mfu'] = None
  result['memory'] = _memory(devices)
  return result


# ------------------------------------------------------------------------------ data
def _host_batches(cfg, global_batch: int, data: str, train: bool, seed: int) -> Iterator[dict]:
  """Host batches (spec.batch_spec) of ``global_batch`` examples: synthetic or the real split."""
  if data == 'synthetic':
    from maskrcnn_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    return synthetic.synthetic_batches(global_batch, tuple(cfg.data.image_size),
                                       cfg.data.max_instances, cfg.data.gt_mask_size,
                                       cfg.model.num_classes, seed=seed)
  if data == 'real':
    from maskrcnn_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    if train:
      return pipeline.train_iterator(cfg, global_batch, seed=seed)

    def forever():  # repeat the evaluation split as long as the benchmark needs
      while True:
        yield from pipeline.eval_iterator(cfg, global_batch)
    return forever()
  raise ValueError(f"data must be 'synthetic' or 'real', not {data!r}")


def _shard(batch: dict, keys, num_devices: int) -> dict:
  return {k: np.asarray(batch[k]).reshape((num_devices, -1) + batch[k].shape[1:]) for k in keys}


def _device_batches(cfg, devices, per_device_batch: int, data: str, train: bool, keys,
                    seed: int, ring: int) -> tuple[Callable[[int], dict], dict]:
  """A function step -> device batch, and the first host batch (for torchvision).

  Synthetic: ``ring`` distinct batches transferred to the devices once, used in turn. Real: the
  pipeline's batches prefetched two ahead to the devices (flax.jax_utils.prefetch_to_device).
  """
  import flax.jax_utils  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  n = len(devices)
  host = _host_batches(cfg, per_device_batch * n, data, train, seed)
  first = next(host)
  if data == 'synthetic':
    # Sharded over a mesh axis named like pmap's, as step_lib.replicate does: a different axis
    # name would make the compiled step reject or re-shard the inputs.
    mesh = jax.sharding.Mesh(np.array(devices), (step_lib.AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(step_lib.AXIS))
    host_ring = [first] + [next(host) for _ in range(ring - 1)]
    dev_ring = [jax.device_put(_shard(b, keys, n), sharding) for b in host_ring]
    return (lambda step: dev_ring[step % len(dev_ring)]), first

  def sharded():
    yield _shard(first, keys, n)
    for b in host:
      yield _shard(b, keys, n)
  it = flax.jax_utils.prefetch_to_device(sharded(), 2, devices, axis_name=step_lib.AXIS)
  return (lambda step: next(it)), first


# ------------------------------------------------------------------------------ runners
class _Runner:
  """Something timed in windows: ``warmup(n)``, ``window(n) -> seconds``, ``latencies(n)``."""
  name = ''
  images_per_step = 0

  def step(self, i: int):  # returns something to wait on
    raise NotImplementedError

  def wait(self, out) -> None:
    del out

  def window(self, num_steps: int, start: int = 0) -> float:
    """Seconds for ``num_steps`` steps, waiting for the device at the end only."""
    t0 = time.perf_counter()
    out = None
    for i in range(num_steps):
      out = self.step(start + i)
    self.wait(out)
    return time.perf_counter() - t0

  def latencies(self, num_steps: int, start: int = 0) -> list[float]:
    """Seconds of each of ``num_steps`` steps, each waited for."""
    times = []
    for i in range(num_steps):
      t0 = time.perf_counter()
      self.wait(self.step(start + i))
      times.append(time.perf_counter() - t0)
    return times


class _JaxTrain(_Runner):
  """Our pmapped train step (the train package's builders) on synthetic or real batches."""
  name = 'maskrcnn_jax'

  def __init__(self, cfg, devices, data: str, seed: int, ring: int = 2,
               conv_weight_grad: str = 'xla'):
    from maskrcnn_jax import modeling  # pylint: disable=import-outside-toplevel
    from maskrcnn_jax.train import loop  # pylint: disable=import-outside-toplevel
    from maskrcnn_jax.train import precision  # pylint: disable=import-outside-toplevel
    from maskrcnn_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
    from maskrcnn_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
    self.devices = devices
    b = int(cfg.train.per_device_batch_size)
    self.images_per_step = b * len(devices)
    model = loop.build_model(cfg)
    h, w = cfg.data.image_size
    key = jax.random.PRNGKey(int(cfg.seed))
    t0 = time.perf_counter()
    variables = jax.jit(lambda k: modeling.init_variables(model, k, h, w))(key)
    params = variables['params']
    tx, schedule = loop.build_optimizer(cfg, params)
    frozen = loop.build_frozen_mask(cfg, params)
    loss_scale = loop.build_loss_scale(cfg)
    state = jax.jit(lambda v: state_lib.create_train_state(v, tx, loss_scale))(variables)
    self.state = step_lib.replicate(state, devices)
    jax.block_until_ready(self.state)
    self.init_s = time.perf_counter() - t0
    step_fn = step_lib.make_train_step(
        model, tx, schedule, jax.random.PRNGKey(1), tuple(cfg.data.pixel_mean),
        tuple(cfg.data.pixel_std), precision.DTYPES[cfg.model.precision],
        mutable_batch_stats=bool(cfg.model.backbone.finetune_bn),
        accumulation_steps=int(cfg.train.gradient_accumulation_steps),
        l2_weight_decay=float(cfg.train.l2_weight_decay),
        trainable_mask=jax.tree_util.tree_map(lambda f: not f, frozen))
    pmapped = jax.pmap(step_fn, axis_name=step_lib.AXIS, donate_argnums=(0,), devices=devices)
    self.batch_at, self.first_host_batch = _device_batches(
        cfg, devices, b, data, True, step_lib.TRAIN_KEYS, seed, ring)
    t0 = time.perf_counter()
    with _ConvSwap(conv_weight_grad == 'im2col'):
      self.compiled = pmapped.lower(self.state, self.batch_at(0)).compile()
    self.compile_s = time.perf_counter() - t0
    self.metrics = None

  def step(self, i):
    self.state, self.metrics = self.compiled(self.state, self.batch_at(i))
    return self.state.step

  def wait(self, out):
    jax.block_until_ready(out)

  def last_loss(self) -> float:
    # Replicated over devices (already reduced by the step): keep device 0's copy, as the loop.
    m = jax.tree_util.tree_map(lambda x: x[0], self.metrics).compute()
    return float(jax.device_get(m['total_loss']))


class _JaxInfer(_Runner):
  """Our pmapped inference step on synthetic or real images."""
  name = 'maskrcnn_jax'

  def __init__(self, cfg, devices, data: str, seed: int, ring: int = 2):
    from maskrcnn_jax import modeling  # pylint: disable=import-outside-toplevel
    from maskrcnn_jax.train import loop  # pylint: disable=import-outside-toplevel
    from maskrcnn_jax.train import precision  # pylint: disable=import-outside-toplevel
    from maskrcnn_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
    b = int(cfg.eval.per_device_batch_size)
    self.images_per_step = b * len(devices)
    model = loop.build_model(cfg)
    h, w = cfg.data.image_size
    t0 = time.perf_counter()
    variables = jax.jit(lambda k: modeling.init_variables(model, k, h, w))(
        jax.random.PRNGKey(int(cfg.seed)))
    self.variables = step_lib.replicate(variables, devices)
    jax.block_until_ready(self.variables)
    self.init_s = time.perf_counter() - t0
    # make_infer_step pmaps over all local devices; the benchmark chooses the devices.
    fn = functools.partial(step_lib.infer_step, model=model,
                           pixel_mean=tuple(cfg.data.pixel_mean),
                           pixel_std=tuple(cfg.data.pixel_std),
                           dtype=precision.DTYPES[cfg.model.precision])
    pmapped = jax.pmap(fn, axis_name=step_lib.AXIS, devices=devices)
    self.batch_at, self.first_host_batch = _device_batches(
        cfg, devices, b, data, False, step_lib.INFER_KEYS, seed, ring)
    t0 = time.perf_counter()
    self.compiled = pmapped.lower(self.variables, self.batch_at(0)).compile()
    self.compile_s = time.perf_counter() - t0

  def step(self, i):
    return self.compiled(self.variables, self.batch_at(i))

  def wait(self, out):
    jax.block_until_ready(out)


# ------------------------------------------------------------------------------ torchvision
def torchvision_available() -> bool:
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
    import torchvision  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def build_torchvision_model(cfg):
  """torchvision's ``maskrcnn_resnet50_fpn`` architecture with random weights, configured like
  ours: frozen batch norm and conv1 + layer1 frozen (what ``maskrcnn_resnet50_fpn`` builds with
  pretrained weights; with ``weights=None, weights_backbone=None`` it would train every batch
  norm), the reference's proposal counts, no score threshold, no resizing (the transform is
  bypassed: `TorchvisionRunner` calls backbone, rpn and roi_heads on an ImageList)."""
  # pylint: disable=import-outside-toplevel
  from torchvision.models import resnet50
  from torchvision.models.detection import MaskRCNN
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
  from torchvision.ops import misc as misc_nn_ops
  m = cfg.model
  backbone = resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
  # torchvision counts trainable stages from the top: freeze_at=2 (conv1 + layer1) -> 3.
  backbone = _resnet_fpn_extractor(backbone, min(5, max(0, 5 - int(m.backbone.freeze_at))))
  h, w = cfg.data.image_size
  return MaskRCNN(
      backbone, num_classes=int(m.num_classes), min_size=min(h, w), max_size=max(h, w),
      rpn_pre_nms_top_n_train=int(m.rpn.train_pre_nms_topk),
      rpn_post_nms_top_n_train=int(m.rpn.train_post_nms_topk),
      rpn_pre_nms_top_n_test=int(m.rpn.test_pre_nms_topk),
      rpn_post_nms_top_n_test=int(m.rpn.test_post_nms_topk),
      rpn_nms_thresh=float(m.rpn.test_nms_threshold),
      rpn_batch_size_per_image=int(m.rpn.batch_size_per_image),
      box_batch_size_per_image=int(m.roi.batch_size_per_image),
      box_positive_fraction=float(m.roi.fg_fraction),
      box_score_thresh=float(m.test.score_threshold),
      box_nms_thresh=float(m.test.nms_threshold),
      box_detections_per_img=int(m.test.detections_per_image))


class TorchvisionRunner(_Runner):
  """torchvision Mask R-CNN on the same host batch: train mode with an SGD step (momentum 0.9,
  L2 1e-4), or eval mode under ``torch.no_grad``. Images go in as uint8 NCHW and are normalised
  inside the step, as ours are; ground-truth masks are full-canvas (torchvision's format), filled
  boxes of the same instances."""
  name = 'torchvision'

  def __init__(self, cfg, host_batch: dict, train: bool, threads: int):
    import torch  # pylint: disable=import-outside-toplevel
    # pylint: disable-next=import-outside-toplevel
    from torchvision.models.detection.image_list import ImageList
    self.torch, self.ImageList, self.train = torch, ImageList, train
    torch.set_num_threads(threads)
    self.threads = torch.get_num_threads()
    torch.manual_seed(0)
    self.model = build_torchvision_model(cfg)
    self.model.train(train)
    self.images = torch.from_numpy(np.ascontiguousarray(
        np.transpose(host_batch['images'], (0, 3, 1, 2))))
    self.images_per_step = self.images.shape[0]
    self.sizes = [tuple(int(v) for v in s) for s in host_batch['image_sizes']]
    self.mean = torch.tensor(cfg.data.pixel_mean).view(1, 3, 1, 1)
    self.std = torch.tensor(cfg.data.pixel_std).view(1, 3, 1, 1)
    self.targets = None
    if train:
      h, w = self.images.shape[2:]
      self.targets = []
      for b in range(self.images_per_step):
        valid = host_batch['gt_valid'][b] & ~host_batch['gt_is_crowd'][b]
        boxes = host_batch['gt_boxes'][b][valid]
        masks = np.zeros((len(boxes), h, w), np.uint8)
        for i, (x1, y1, x2, y2) in enumerate(np.round(boxes).astype(int)):
          masks[i, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)] = 1
        self.targets.append({
            'boxes': torch.from_numpy(boxes.astype(np.float32)),
            'labels': torch.from_numpy(host_batch['gt_classes'][b][valid].astype(np.int64)),
            'masks': torch.from_numpy(masks)})
      params = [p for p in self.model.parameters() if p.requires_grad]
      self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    self.compile_s = 0.0
    self.init_s = 0.0

  def _forward(self):
    x = (self.images.float() / 255.0 - self.mean) / self.std
    image_list = self.ImageList(x, self.sizes)
    features = self.model.backbone(image_list.tensors)
    proposals, rpn_losses = self.model.rpn(image_list, features, self.targets)
    detections, roi_losses = self.model.roi_heads(features, proposals, image_list.image_sizes,
                                                  self.targets)
    return detections, {**rpn_losses, **roi_losses}

  def step(self, i):
    del i
    if self.train:
      self.optimizer.zero_grad(set_to_none=True)
      _, losses = self._forward()
      loss = sum(losses.values())
      loss.backward()
      self.optimizer.step()
      return loss.detach()
    with self.torch.no_grad():
      return self._forward()[0]


# ------------------------------------------------------------------------------ drivers
def _interleaved(runners: list[_Runner], warmup_steps: int, timed_steps: int,
                 rounds: int) -> list[float]:
  """Warm-up of every runner, then ``rounds`` windows each in turn (ours, theirs, ours, ...) so
  that a change of machine load hits both; returns the total timed seconds of each runner."""
  for r in runners:
    if warmup_steps:
      r.window(warmup_steps, 0)
  rounds = max(1, min(rounds, timed_steps))
  sizes = [timed_steps // rounds + (1 if i < timed_steps % rounds else 0) for i in range(rounds)]
  totals = [0.0] * len(runners)
  done = warmup_steps
  for size in sizes:
    for j, r in enumerate(runners):
      totals[j] += r.window(size, done)
    done += size
  return totals


def _same_architecture(cfg) -> bool:
  """Whether config.model is the R50-FPN that torchvision's side builds (else the ratio only
  exercises the code path, as with the tiny test configs)."""
  m = cfg.model
  return (int(m.backbone.depth) == 50 and int(m.fpn_channels) == 256
          and int(m.roi.mlp_head_dim) == 1024 and int(m.mask.conv_dim) == 256
          and int(m.mask.num_convs) == 4 and int(m.min_level) == 2 and int(m.max_level) == 6)


def _torch_summary(runner: TorchvisionRunner, seconds: float, timed_steps: int,
                   ours_ips: float | None, cfg) -> dict[str, Any]:
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  ips = runner.images_per_step * timed_steps / seconds
  return {
      'torch_version': torch.__version__,
      'torchvision_version': torchvision.__version__,
      'threads': runner.threads,
      'images_per_sec': ips,
      'step_time_ms': 1e3 * seconds / timed_steps,
      'ratio_ours_over_torchvision': (ours_ips / ips) if ours_ips else None,
      'same_architecture': _same_architecture(cfg),
  }


def benchmark_training(config, *, num_steps: int = 200, warmup_steps: int = 100,
                       per_device_batch_size: int | None = None, precision: str | None = None,
                       num_devices: int | None = None, image_size=None, data: str = 'synthetic',
                       peak_tflops: float | None = None, seed: int = 0,
                       torchvision: bool = False, torch_threads: int | None = None,
                       rounds: int = 1, profile_dir: str | None = None,
                       profile_steps: int = 3, conv_weight_grad: str = 'xla') -> dict[str, Any]:
  """Training throughput: ``num_steps`` steps, the first ``warmup_steps`` excluded.

  Args:
    config: a full config (configs/coco_r50.py); the keyword arguments override it.
    per_device_batch_size, precision, image_size: overrides of config.train.per_device_batch_size,
      config.model.precision and config.data.image_size.
    num_devices: local devices to pmap over (None: all).
    data: 'synthetic' (no TensorFlow) or 'real' (the prepared TFDS training split).
    peak_tflops: per-device dense peak for the MFU (None: `PEAK_TFLOPS` by device kind).
    torchvision: also time torchvision's Mask R-CNN on the same first batch (one device's worth
      of images when num_devices is 1; the global batch otherwise) with ``torch_threads``.
    rounds: timed windows per framework, alternated when comparing.
    profile_dir: if set, ``profile_steps`` more steps are traced with ``jax.profiler`` there
      after the timing, and ``result['profile']`` summarises the trace (`profile_summary`).
    conv_weight_grad: 'xla' (the model as built), 'im2col' (prototype, see `im2col_conv`) or
      'both' (xla as the result, im2col timed in alternating windows: ``result['im2col']``).

  Returns:
    The result dict (`RESULT_KEYS`), with ``init_s``, ``final_loss``.
  """
  if not 0 <= warmup_steps < num_steps:
    raise ValueError(f'need 0 <= warmup_steps < num_steps, got {warmup_steps}, {num_steps}')
  cfg = prepare_config(config, per_device_batch_size=per_device_batch_size, precision=precision,
                       image_size=image_size, train=True)
  devices = _devices(num_devices)
  b = int(cfg.train.per_device_batch_size)
  result = _base_result('training', cfg, devices, b, data, num_steps, warmup_steps)
  if conv_weight_grad not in ('xla', 'im2col', 'both'):
    raise ValueError(f"conv_weight_grad must be 'xla', 'im2col' or 'both', not "
                     f'{conv_weight_grad!r}')
  both = conv_weight_grad == 'both'
  result['conv_weight_grad'] = 'xla' if both else conv_weight_grad
  ours = _JaxTrain(cfg, devices, data, seed, conv_weight_grad=result['conv_weight_grad'])
  runners: list[_Runner] = [ours]
  if torchvision:
    runners.append(TorchvisionRunner(cfg, ours.first_host_batch, True,
                                     torch_threads or os.cpu_count()))
  if both:  # A/B of the im2col prototype in alternating windows of the same run
    runners.append(_JaxTrain(cfg, devices, data, seed, conv_weight_grad='im2col'))
  timed = num_steps - warmup_steps
  totals = _interleaved(runners, warmup_steps, timed, rounds)
  if both:
    alt = runners[-1]
    ips = alt.images_per_step * timed / totals[-1]
    result['im2col'] = {'images_per_sec': ips, 'step_time_ms': 1e3 * totals[-1] / timed,
                        'compile_s': alt.compile_s, 'final_loss': alt.last_loss(),
                        'speedup_over_xla': ips * totals[0] / (ours.images_per_step * timed)}
  result['compile_s'] = ours.compile_s
  result['init_s'] = ours.init_s
  _finish_result(result, ours.compiled, devices, b, totals[0], ours.images_per_step * timed,
                 peak_tflops)
  result['final_loss'] = ours.last_loss()
  result['profile'] = _profile(ours, profile_dir, profile_steps, num_steps)
  result['torchvision'] = (_torch_summary(runners[1], totals[1], timed,
                                          result['images_per_sec'], cfg)
                           if torchvision else None)
  return result


def benchmark_inference(config, *, num_steps: int = 150, warmup_steps: int = 10,
                        per_device_batch_size: int | None = None, precision: str | None = None,
                        num_devices: int | None = None, image_size=None,
                        data: str = 'synthetic', peak_tflops: float | None = None,
                        seed: int = 0, latency_steps: int | None = None,
                        torchvision: bool = False, torch_threads: int | None = None,
                        rounds: int = 1, profile_dir: str | None = None,
                        profile_steps: int = 3) -> dict[str, Any]:
  """Inference throughput and latency.

  Throughput: ``num_steps`` batches, the first ``warmup_steps`` excluded, waiting for the
  devices at the end of each window only. Latency: then ``latency_steps`` batches (default: as
  many as were timed) each waited for; p50/p90/p95/p99 in ms per batch. The reference's
  1200-image evaluation is ``num_steps = 1200 / global batch``. Other arguments as
  `benchmark_training` (the batch size overrides config.eval.per_device_batch_size).
  """
  if not 0 <= warmup_steps < num_steps:
    raise ValueError(f'need 0 <= warmup_steps < num_steps, got {warmup_steps}, {num_steps}')
  cfg = prepare_config(config, per_device_batch_size=per_device_batch_size, precision=precision,
                       image_size=image_size, train=False)
  devices = _devices(num_devices)
  b = int(cfg.eval.per_device_batch_size)
  result = _base_result('inference', cfg, devices, b, data, num_steps, warmup_steps)
  ours = _JaxInfer(cfg, devices, data, seed)
  runners: list[_Runner] = [ours]
  if torchvision:
    runners.append(TorchvisionRunner(cfg, ours.first_host_batch, False,
                                     torch_threads or os.cpu_count()))
  timed = num_steps - warmup_steps
  totals = _interleaved(runners, warmup_steps, timed, rounds)
  result['compile_s'] = ours.compile_s
  result['init_s'] = ours.init_s
  _finish_result(result, ours.compiled, devices, b, totals[0], ours.images_per_step * timed,
                 peak_tflops)
  n_lat = timed if latency_steps is None else latency_steps
  result['latency_ms'] = _percentiles(ours.latencies(n_lat, num_steps)) if n_lat > 0 else None
  result['profile'] = _profile(ours, profile_dir, profile_steps, num_steps + n_lat)
  result['torchvision'] = None
  if torchvision:
    result['torchvision'] = _torch_summary(runners[1], totals[1], timed,
                                           result['images_per_sec'], cfg)
    if n_lat > 0:
      result['torchvision']['latency_ms'] = _percentiles(runners[1].latencies(n_lat))
  return result


def _profile(runner: _Runner, profile_dir: str | None, steps: int, start: int):
  if not profile_dir or steps <= 0:
    return None
  with jax.profiler.trace(profile_dir):
    runner.window(steps, start)
  hlo = runner.compiled.as_text()
  with open(os.path.join(profile_dir, 'module.hlo.txt'), 'w') as f:
    f.write(hlo)  # profile_summary(profile_dir, hlo) can be rerun on the saved trace
  return profile_summary(profile_dir, hlo)


def _percentiles(seconds: list[float]) -> dict[str, float]:
  ms = np.asarray(seconds) * 1e3
  out = {f'p{q}': float(np.percentile(ms, q)) for q in (50, 90, 95, 99)}
  out['mean'] = float(ms.mean())
  out['count'] = int(ms.size)
  return out


def write_json(result: dict[str, Any], path: str) -> None:
  """Writes ``result`` as indented JSON (directories created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True, default=float)
    f.write('\n')


def summary_line(result: dict[str, Any]) -> str:
  """One human-readable line of a result."""
  r = result
  parts = [f"{r['benchmark']}: {r['images_per_sec']:.3f} img/s",
           f"step {r['step_time_ms']:.1f} ms",
           f"batch {r['per_device_batch_size']}x{r['num_devices']} {r['device_kind']}",
           f"{r['image_size'][0]}x{r['image_size'][1]} {r['precision']}",
           f"compile {r['compile_s']:.1f} s"]
  if r.get('flops_per_image'):
    parts.append(f"{r['flops_per_image'] / 1e9:.1f} GFLOP/img")
  if r.get('mfu') is not None:
    parts.append(f"MFU {100 * r['mfu']:.1f}%")
  if r.get('latency_ms'):
    lat = r['latency_ms']
    parts.append('latency p50/p90/p95/p99 ' + '/'.join(f"{lat[k]:.0f}" for k in
                                                        ('p50', 'p90', 'p95', 'p99')) + ' ms')
  if r.get('im2col'):
    parts.append(f"im2col prototype {r['im2col']['images_per_sec']:.3f} img/s "
                 f"({r['im2col']['speedup_over_xla']:.2f}x)")
  if r.get('torchvision'):
    t = r['torchvision']
    parts.append(f"torchvision {t['images_per_sec']:.3f} img/s ({t['threads']} threads), "
                 f"ratio {t['ratio_ours_over_torchvision']:.2f}x")
  parts.append(f"load {r['load_average']}")
  return ', '.join(parts)


# ------------------------------------------------------------------------------ conv prototype
# XLA:CPU computes a convolution's kernel gradient as a convolution whose window spans the whole
# image, on transposed copies of the operands: 3-9x slower than the forward convolution, and half
# of a CPU training step (docs/performance.md). `im2col_conv` is the proposed fix (for
# maskrcnn_jax/modeling/layers.py: ``nn.Conv(..., conv_general_dilated=im2col_conv)`` on CPU):
# the forward and the input gradient stay XLA's convolutions, the kernel gradient becomes one
# matmul of the im2col patches. The benchmarks can try it without the modeling change
# (``conv_weight_grad='im2col'``), which swaps it in for ``lax.conv_general_dilated`` while the
# model is traced.
_XLA_CONV = jax.lax.conv_general_dilated


def _im2col_patches(x, kernel_hw, strides, padding):
  """(N, Ho, Wo, kh*kw*C) patches of NHWC ``x`` (tap-major, channel-minor)."""
  kh, kw = kernel_hw
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho = (xp.shape[1] - kh) // strides[0] + 1
  wo = (xp.shape[2] - kw) // strides[1] + 1
  taps = [xp[:, i:i + strides[0] * (ho - 1) + 1:strides[0],
             j:j + strides[1] * (wo - 1) + 1:strides[1], :]
          for i in range(kh) for j in range(kw)]
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_nhwc(x, w, strides, padding):
  return _XLA_CONV(x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv_nhwc_fwd(x, w, strides, padding):
  return _conv_nhwc(x, w, strides, padding), (x, w)


def _conv_nhwc_bwd(strides, padding, residuals, g):
  x, w = residuals
  _, vjp_x = jax.vjp(lambda x_: _XLA_CONV(x_, w, strides, padding,
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC')), x)
  (dx,) = vjp_x(g)
  kh, kw, cin, cout = w.shape
  cols = _im2col_patches(x, (kh, kw), strides, padding).reshape(-1, kh * kw * cin)
  dw = jnp.dot(cols.T, g.reshape(-1, cout), preferred_element_type=jnp.float32)
  return dx, dw.reshape(kh, kw, cin, cout).astype(w.dtype)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` with an im2col + matmul kernel gradient for plain NHWC/HWIO
  convolutions (no dilation, no groups); anything else goes to XLA's convolution unchanged."""
  plain = (tuple(dimension_numbers or ()) == ('NHWC', 'HWIO', 'NHWC')
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and feature_group_count == 1 and batch_group_count == 1
           and precision is None and preferred_element_type is None)
  if not plain:
    return _XLA_CONV(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count, precision,
                     preferred_element_type)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return _conv_nhwc(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))


class _ConvSwap:
  """Context manager: ``jax.lax.conv_general_dilated`` is `im2col_conv` inside (tracing only)."""

  def __init__(self, enabled: bool):
    self.enabled = enabled

  def __enter__(self):
    if self.enabled:
      jax.lax.conv_general_dilated = im2col_conv

  def __exit__(self, *exc):
    if self.enabled:
      jax.lax.conv_general_dilated = _XLA_CONV


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


def stage_breakdown(config, *, train: bool = True, per_device_batch_size: int = 1,
                    precision: str | None = None, image_size=None, repeats: int = 3,
                    seed: int = 0) -> dict[str, Any]:
  """Per-stage times of one device's forward (and backward), each stage jitted on its own.

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
  from maskrcnn_jax import modeling  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.modeling.model import MaskRCNN  # pylint: disable=import-outside-toplevel
  cfg = prepare_config(config, per_device_batch_size=per_device_batch_size, precision=precision,
                       image_size=image_size, train=train)
  model = modeling.build_model(cfg.model)
  dtype = modeling.DTYPES[cfg.model.precision]
  h, w = cfg.data.image_size
  b = int(per_device_batch_size)
  variables = jax.jit(lambda k: modeling.init_variables(model, k, h, w))(jax.random.PRNGKey(0))
  host = synthetic.synthetic_batch(b, (h, w), cfg.data.max_instances, cfg.data.gt_mask_size,
                                   cfg.model.num_classes, seed=seed)
  batch = jax.device_put({k: host[k] for k in ('images', 'image_sizes', 'gt_boxes', 'gt_classes',
                                                'gt_masks', 'gt_valid', 'gt_is_crowd')})
  mean, std = tuple(cfg.data.pixel_mean), tuple(cfg.data.pixel_std)
  images = jax.jit(lambda x, s: modeling.normalize_images(x, s, mean, std, dtype))(
      batch['images'], batch['image_sizes'])
  sizes = batch['image_sizes']
  key = jax.random.PRNGKey(seed)
  compile_s = {}
  times = {}

  def timed(name, fn, *args):
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s[name] = time.perf_counter() - t0
    times[name] = 1e3 * _median_seconds(lambda: compiled(*args), repeats)
    return compiled(*args)

  feats = timed('backbone_fpn', lambda v, x: model.apply(v, x, train, method=MaskRCNN.features),
                variables, images)
  _, _, (props, _, _) = timed(
      'rpn_proposals', lambda v, f, s: model.apply(v, f, s, train, method=MaskRCNN.proposals),
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
    n_mask = int(m.roi.batch_size_per_image * m.roi.fg_fraction)
    box_rois, mask_rois = props[:, :n_box], props[:, :n_mask]
  else:
    box_rois = props
    mask_rois = props[:, :int(m.test.detections_per_image)]
  pooled = timed('roi_align_box', pool(int(m.roi.pooler_size)), variables, feats, box_rois)
  timed('box_head', head('box_head'), variables, pooled)
  if train:
    pooled = timed('roi_align_mask', pool(int(m.mask.pooler_size)), variables, feats, mask_rois)
    timed('mask_head', head('mask_head'), variables, pooled)
    gt = {k: batch[k] for k in ('gt_boxes', 'gt_classes', 'gt_masks', 'gt_valid', 'gt_is_crowd')}

    # Ground truth and sizes are arguments, not closure constants: as constants XLA would
    # constant-fold the anchor matching at compile time (the real step has them as inputs).
    def loss(params, v, x, s, g, k):
      out = model.apply({**v, 'params': params}, x, s, **g, train=True, rngs={'sampling': k})
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
    valid = jnp.ones(props.shape[:2], bool)
    timed('detect', lambda v, f, p, ok, s: model.apply(v, f, p, ok, s, method=MaskRCNN.detect),
          variables, feats, props, valid, sizes)
    timed('forward_total', lambda v, x, s: model.apply(v, x, s, train=False), variables, images,
          sizes)
    times['postprocess_masks'] = times.pop('detect') - times['roi_align_box'] - times['box_head']
  return {'benchmark': 'stages_' + ('training' if train else 'inference'),
          'date': datetime.datetime.now().isoformat(timespec='seconds'),
          'load_average': _load_average(), 'backend': jax.default_backend(),
          'device_kind': jax.devices()[0].device_kind, 'per_device_batch_size': b,
          'image_size': [h, w], 'precision': cfg.model.precision, 'repeats': repeats,
          'stage_ms': times, 'compile_s': compile_s}


# ------------------------------------------------------------------------------ profiles
# Stage of an HLO instruction from its op_name (the JAX name stack: transforms, flax module
# paths and public method names). First match wins; 'transpose(' marks the backward pass.
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
  import re  # pylint: disable=import-outside-toplevel
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
  import glob  # pylint: disable=import-outside-toplevel
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
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


# ------------------------------------------------------------------------------ command line
def parse_image_size(text: str) -> tuple[int, int]:
  """'832x1344' or '512' -> (height, width)."""
  parts = [int(v) for v in text.lower().replace(',', 'x').split('x')]
  return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def add_arguments(parser, kind: str) -> None:
  """The launch scripts' arguments (``kind``: 'training' or 'inference')."""
  train = kind == 'training'
  parser.add_argument('--config', default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'coco_r50.py'),
                      help='config file (default configs/coco_r50.py)')
  parser.add_argument('--num_steps', type=int, default=200 if train else 160,
                      help='steps in all, warm-up included (reference: 200 training)')
  parser.add_argument('--warmup_steps', type=int, default=100 if train else 10,
                      help='first steps left out of the average (reference: 100 training)')
  parser.add_argument('--batch_size', type=int, default=None,
                      help='per-device batch size (default: the config\'s)')
  parser.add_argument('--precision', choices=('float32', 'bfloat16', 'float16'), default=None)
  parser.add_argument('--amp', action='store_true',
                      help='the reference\'s flag: float16 (use --precision bfloat16 on H100/H200)')
  parser.add_argument('--num_devices', '--gpus', type=int, default=None,
                      help='local devices to pmap over (default: all)')
  parser.add_argument('--cpu_devices', type=int, default=None,
                      help='fake CPU devices (XLA_FLAGS host device count), for testing pmap')
  parser.add_argument('--image_size', type=parse_image_size, default=None,
                      help='canvas HxW, e.g. 832x1344 or 512 (default: the config\'s)')
  parser.add_argument('--data', choices=('synthetic', 'real'), default='synthetic')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='per-device dense peak TFLOP/s for the MFU (default: by device kind)')
  parser.add_argument('--torchvision', action='store_true',
                      help='also time torchvision maskrcnn_resnet50_fpn in the same run')
  parser.add_argument('--threads', type=int, default=None,
                      help='torch threads (default: all cores, as XLA uses on the CPU)')
  parser.add_argument('--rounds', type=int, default=1,
                      help='timed windows per framework, alternated (with --torchvision)')
  if not train:
    parser.add_argument('--latency_steps', type=int, default=None,
                        help='batches of the latency pass (default: the timed steps)')
  if train:
    parser.add_argument('--conv_weight_grad', choices=('xla', 'im2col', 'both'), default='xla',
                        help='im2col: prototype CPU kernel gradient of the convolutions '
                        '(maskrcnn_jax.benchmark.im2col_conv)')
  parser.add_argument('--stages', action='store_true',
                      help='also time each stage of the model on its own (stage_breakdown)')
  parser.add_argument('--stage_repeats', type=int, default=3)
  parser.add_argument('--profile_dir', default=None,
                      help='trace a few extra steps with jax.profiler here and summarise them')
  parser.add_argument('--profile_steps', type=int, default=3, help='steps traced (--profile_dir)')
  parser.add_argument('--output', default=None, help='JSON result file')


def run_from_args(args, kind: str) -> dict[str, Any]:
  """Runs the benchmark the parsed arguments describe, prints and writes the result."""
  from maskrcnn_jax import configs  # pylint: disable=import-outside-toplevel
  config = configs.load_config(args.config)
  precision = args.precision or ('float16' if args.amp else None)
  common = dict(num_steps=args.num_steps, warmup_steps=args.warmup_steps,
                per_device_batch_size=args.batch_size, precision=precision,
                num_devices=args.num_devices, image_size=args.image_size, data=args.data,
                peak_tflops=args.peak_tflops, torchvision=args.torchvision,
                torch_threads=args.threads, rounds=args.rounds, profile_dir=args.profile_dir,
                profile_steps=args.profile_steps)
  if args.torchvision and not torchvision_available():
    print('torchvision is not importable: timing maskrcnn_jax only')
    common['torchvision'] = False
  if kind == 'training':
    result = benchmark_training(config, conv_weight_grad=args.conv_weight_grad, **common)
  else:
    result = benchmark_inference(config, latency_steps=args.latency_steps, **common)
  if args.stages:
    result['stages'] = stage_breakdown(
        config, train=kind == 'training',
        per_device_batch_size=result['per_device_batch_size'], precision=precision,
        image_size=args.image_size, repeats=args.stage_repeats)
  print(summary_line(result))
  if args.stages:
    print('stages (ms): ' + ', '.join(f'{k} {v:.1f}' for k, v in
                                      result['stages']['stage_ms'].items()))
  if args.output:
    write_json(result, args.output)
    print(f'wrote {args.output}')
  return result


def config_benchmark(config) -> dict[str, Any]:
  """``python -m maskrcnn_jax.main --config.mode=benchmark_train|benchmark_inference``: the
  benchmark that ``config.benchmark`` describes (synthetic data by default), written to
  ``<workdir>/benchmark_<kind>.json`` by the caller."""
  bench = config.get('benchmark', ml_collections.ConfigDict())
  train = config.mode == 'benchmark_train'
  kwargs = dict(
      num_steps=int(bench.get('num_steps', 200 if train else 160)),
      warmup_steps=int(bench.get('warmup_steps', 100 if train else 10)),
      num_devices=int(bench.get('num_devices', 0)) or None,
      data=str(bench.get('data', 'synthetic')),
      peak_tflops=float(bench.get('peak_tflops', 0.0)) or None,
      torchvision=bool(bench.get('torchvision', False)) and torchvision_available())
  if train:
    return benchmark_training(config, **kwargs)
  return benchmark_inference(config, **kwargs)
