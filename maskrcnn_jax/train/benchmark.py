"""Throughput of the train and inference steps, timed as the reference's benchmark scripts do
(``num_steps`` steps, the first ``warmup_steps`` left out, images/s averaged over the rest).

`TrainRunner` / `InferenceRunner` run `experiment.build_experiment`'s pmapped steps on synthetic
batches (no TensorFlow; on the devices before timing) or the prepared dataset (prefetched);
`benchmark_training` / `benchmark_inference` time them in windows alternated with any
``extra_runners`` (torchvision's, in ``bench/``) so that a change of machine load hits each, and
return the result record (`RESULT_KEYS`). The config is timed as given (batch, canvas, precision).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import re
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from maskrcnn_jax.data import spec
from maskrcnn_jax.data import synthetic
from maskrcnn_jax.train import experiment
from maskrcnn_jax.train import step as step_lib

# Dense peak TFLOP/s per device (NVIDIA's data sheets; float32 is the TF32 figure, XLA's default on
# Ampere and later), matched by substring of ``device.device_kind``, first match first;
# config.benchmark.peak_tflops overrides it.
PEAK_TFLOPS = (
    ('H200', {'bfloat16': 989.0, 'float16': 989.0, 'float32': 495.0}),
    ('H100', {'bfloat16': 989.0, 'float16': 989.0, 'float32': 495.0}),
    ('A100', {'bfloat16': 312.0, 'float16': 312.0, 'float32': 156.0}),
    ('V100', {'bfloat16': None, 'float16': 125.0, 'float32': 15.7}),
)
# Keys of every result; ``baselines``: {name: figures} of the extra runners (torchvision's).
RESULT_KEYS = ('benchmark', 'framework', 'date', 'host', 'load_average', 'jax_version', 'backend',
               'device_kind', 'num_devices', 'per_device_batch_size', 'global_batch_size',
               'image_size', 'precision', 'data', 'num_steps', 'warmup_steps', 'timed_steps',
               'compile_s', 'init_s', 'images_per_sec', 'step_time_ms', 'flops_per_image',
               'peak_tflops_per_device', 'mfu', 'memory', 'profile', 'baselines',
               'host_round_trips')
INFERENCE_KEYS = ('latency_ms',)


def peak_tflops_for(device_kind: str, precision: str) -> float | None:
  """Dense peak TFLOP/s of one device of this kind at this precision, or None if unknown."""
  tables = [t for name, t in PEAK_TFLOPS if name.lower() in device_kind.lower()]
  return tables[0].get(precision) if tables else None


def config_settings(config) -> dict[str, Any]:
  """The drivers' keyword arguments that ``config.benchmark`` holds (0 = default)."""
  b = config.benchmark
  return dict(num_steps=int(b.num_steps), warmup_steps=int(b.warmup_steps), data=str(b.data),
              num_devices=int(b.num_devices) or None, peak_tflops=float(b.peak_tflops) or None)


def host_batches(config, batch_size: int, data: str, train: bool, seed: int) -> Iterator[dict]:
  """Endless host batches (`spec.batch_spec`): synthetic, or the config's real split."""
  d = config.data
  if data == 'synthetic':
    return synthetic.synthetic_batches(batch_size, tuple(d.image_size), int(d.max_instances),
                                       int(d.gt_mask_size), int(config.model.num_classes), seed)
  if data != 'real':
    raise ValueError(f"data must be 'synthetic' or 'real', not {data!r}")
  return (experiment.build_train_iterator(config, batch_size, seed=seed) if train else
          itertools.chain.from_iterable(  # the evaluation split again and again
              experiment.build_eval_iterator(config, batch_size) for _ in itertools.count()))


# ------------------------------------------------------------------------------ runners
class Runner:
  """Something timed in windows: ``step(i)`` starts step i and returns something to wait on."""
  name = ''
  images_per_step = 0

  def step(self, i: int):
    raise NotImplementedError

  def wait(self, out) -> None:
    del out

  def window(self, num_steps: int, start: int = 0) -> float:
    """Seconds for ``num_steps`` steps from step ``start``, waiting at the end only."""
    t0, out = time.perf_counter(), None
    for i in range(num_steps):
      out = self.step(start + i)
    self.wait(out)
    return time.perf_counter() - t0

  def latencies(self, num_steps: int, start: int = 0) -> list[float]:
    """Seconds of each of ``num_steps`` steps, each waited for."""
    return [self.window(1, start + i) for i in range(num_steps)]

  def describe(self) -> dict[str, Any]:  # extra facts for the result (versions, threads)
    return {}


class _ExperimentRunner(Runner):
  """An experiment's pmapped step (``train``: the train step, else inference), initialised, its
  batches on the devices (synthetic: a ``ring`` of distinct ones), compiled."""
  name = 'maskrcnn_jax'
  train = True
  metrics = None

  def __init__(self, exp: experiment.Experiment, data: str = 'synthetic', seed: int = 0,
               ring: int = 2):
    cfg, train = exp.config, self.train
    self.devices = exp.devices
    self.per_device_batch_size = int((cfg.train if train else cfg.eval).per_device_batch_size)
    self.images_per_step = self.per_device_batch_size * exp.num_devices
    t0 = time.perf_counter()
    variables = exp.initial_variables()
    self.args = step_lib.replicate(exp.create_state(variables) if train else variables,
                                   exp.devices)
    jax.block_until_ready(self.args)
    self.init_s = time.perf_counter() - t0
    host = host_batches(cfg, self.images_per_step, data, train, seed)
    keys = spec.TRAIN_KEYS if train else spec.INFER_KEYS
    if data == 'synthetic':
      # Step i runs on host_ring[i % ring]; another framework's runner (bench/) cycles the
      # same host batches, so that both do the same work (the foreground count sets the
      # bucketed mask head's).
      self.host_ring = list(itertools.islice(host, ring))
      ring_batches = list(step_lib.device_batches(iter(self.host_ring), keys, exp.devices))
      self.batch_at = lambda i: ring_batches[i % len(ring_batches)]
    else:
      self.host_ring = [next(host)]  # real data streams on; another framework gets the first
      it = step_lib.device_batches(itertools.chain(self.host_ring, host), keys, exp.devices)
      self.batch_at = lambda i: next(it)
    t0 = time.perf_counter()
    fn = exp.train_step if train else exp.infer_step
    self.compiled = fn.lower(self.args, self.batch_at(0)).compile()
    self.compile_s = time.perf_counter() - t0

  def step(self, i):
    if not self.train:
      return self.compiled(self.args, self.batch_at(i))
    self.args, self.metrics = self.compiled(self.args, self.batch_at(i))  # the state donated
    return self.args.step

  def wait(self, out):
    jax.block_until_ready(out)

  def last_metric(self, name: str = 'total_loss') -> float | None:
    """Training: a metric of the last step (device 0's copy, already reduced over devices):
    'total_loss', or 'num_foreground_rois' (per step: the mask head's workload)."""
    if self.metrics is None:
      return None
    m = jax.tree_util.tree_map(lambda x: x[0], self.metrics).compute()
    return float(jax.device_get(m[name]))


class TrainRunner(_ExperimentRunner):
  """The experiment's train step, the state replaced every step."""


class InferenceRunner(_ExperimentRunner):
  """The experiment's inference step on fixed initial variables."""
  train = False


# ------------------------------------------------------------------------------ drivers
def _interleaved(runners: Sequence[Runner], warmup_steps: int, timed_steps: int,
                 rounds: int) -> list[float]:
  """Warm-up of every runner, then ``rounds`` windows each in turn (ours, theirs, ours, ...);
  returns the total timed seconds of each runner."""
  for r in runners:
    r.window(warmup_steps, 0)
  rounds = max(1, min(rounds, timed_steps))
  totals, done = [0.0] * len(runners), warmup_steps
  for i in range(rounds):
    size = timed_steps // rounds + (1 if i < timed_steps % rounds else 0)
    totals = [t + r.window(size, done) for t, r in zip(totals, runners)]
    done += size
  return totals


def _benchmark(train: bool, config, *, num_steps: int, warmup_steps: int, devices=None,
               num_devices: int | None = None, data: str = 'synthetic',
               peak_tflops: float | None = None, seed: int = 0,
               latency_steps: int | None = None,
               extra_runners: Sequence[Callable[[Runner], Runner]] = (), rounds: int = 1,
               profile: Callable[[Runner, int], Any] | None = None) -> dict[str, Any]:
  """Throughput of ``num_steps`` train (or inference) steps, the first ``warmup_steps`` left
  out: the result (`RESULT_KEYS`; `INFERENCE_KEYS` or final_loss). devices: those to pmap over,
  or the first ``num_devices`` (None: all). data: 'synthetic' (seeded by ``seed``) or 'real'.
  peak_tflops: for the MFU (None: `PEAK_TFLOPS`). latency_steps: batches of the inference latency
  pass (default: as many as were timed). extra_runners: ``make(ours) -> Runner`` (ours built
  first: its ``host_ring`` of host batches can feed another framework), timed in ``rounds`` windows
  alternated with ours, in ``result['baselines'][name]``. profile: ``profile(ours, next_step)``,
  called last (bench/profiles.py traces steps), is ``result['profile']``."""
  if not 0 <= warmup_steps < num_steps:
    raise ValueError(f'need 0 <= warmup_steps < num_steps, got {warmup_steps}, {num_steps}')
  if devices is None:
    devices = jax.local_devices()[:num_devices or None]
    if num_devices and len(devices) < num_devices:
      raise ValueError(f'num_devices={num_devices} but only {len(devices)} local devices')
  exp = experiment.build_experiment(config, devices)
  ours = (TrainRunner if train else InferenceRunner)(exp, data, seed)
  others = [make(ours) for make in extra_runners]
  timed = num_steps - warmup_steps
  totals = _interleaved([ours] + others, warmup_steps, timed, rounds)
  b, ips = ours.per_device_batch_size, ours.images_per_step * timed / totals[0]
  flops = _flops(_float32_products_program(config, ours, train))
  flops = flops / b if flops else None
  peak = peak_tflops or peak_tflops_for(devices[0].device_kind, config.model.precision)
  result = {
      'benchmark': 'training' if train else 'inference', 'framework': ours.name,
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'host': platform.node(), 'cpu': platform.processor() or platform.machine(),
      'cpu_count': os.cpu_count(), 'load_average': [round(x, 2) for x in os.getloadavg()],
      'jax_version': jax.__version__, 'backend': jax.default_backend(),
      'device_kind': devices[0].device_kind, 'num_devices': len(devices),
      'per_device_batch_size': b, 'global_batch_size': b * len(devices),
      'image_size': list(config.data.image_size), 'precision': config.model.precision,
      'data': data, 'num_steps': num_steps, 'warmup_steps': warmup_steps, 'timed_steps': timed,
      'compile_s': ours.compile_s, 'init_s': ours.init_s, 'images_per_sec': ips,
      'host_round_trips': host_round_trips(ours.compiled),
      'step_time_ms': 1e3 * totals[0] / timed, 'flops_per_image': flops,
      'peak_tflops_per_device': peak, 'profile': None,
      'mfu': flops * ips / len(devices) / (peak * 1e12) if peak and flops else None,
      'baselines': {}, 'memory': {  # of the first device; None where not reported (CPU)
          k: int(v) for k, v in (devices[0].memory_stats() or {}).items() if k in (
              'bytes_in_use', 'peak_bytes_in_use', 'bytes_limit', 'largest_alloc_size')} or None}
  for other, seconds in zip(others, totals[1:]):
    other_ips = other.images_per_step * timed / seconds
    result['baselines'][other.name] = {
        'images_per_sec': other_ips, 'step_time_ms': 1e3 * seconds / timed,
        'ratio_ours_over_baseline': ips / other_ips, **other.describe()}
  end = num_steps
  if train:
    result['final_loss'] = ours.last_metric()
    result['foreground_rois_per_image'] = ours.last_metric('num_foreground_rois')
    for other in others:  # another config of ours: its loss after the same steps and batches
      if isinstance(other, _ExperimentRunner):
        result['baselines'][other.name]['final_loss'] = other.last_metric()
  else:
    n = timed if latency_steps is None else latency_steps
    result['latency_ms'] = _percentiles(ours.latencies(n, end)) if n > 0 else None
    for other in others if n > 0 else ():
      result['baselines'][other.name]['latency_ms'] = _percentiles(other.latencies(n, end))
    end += n
  if profile is not None:
    result['profile'] = profile(ours, end)
  return result


def benchmark_training(config, *, num_steps=200, warmup_steps=100, **kwargs) -> dict[str, Any]:
  """Training throughput (the reference's 200 steps, 100 of warm-up); arguments: `_benchmark`."""
  return _benchmark(True, config, num_steps=num_steps, warmup_steps=warmup_steps, **kwargs)


def benchmark_inference(config, *, num_steps=160, warmup_steps=10, **kwargs) -> dict[str, Any]:
  """Inference throughput and latency (arguments: `_benchmark`); the reference's 1200-image
  run is ``num_steps = 1200 / global batch`` plus the warm-up."""
  return _benchmark(False, config, num_steps=num_steps, warmup_steps=warmup_steps, **kwargs)


def run_config_benchmark(config) -> dict[str, Any]:
  """``--config.mode=benchmark_train|benchmark_inference``: the benchmark of config.benchmark
  (our steps only: torchvision side by side is ``bench/``'s)."""
  fn = benchmark_training if config.mode == 'benchmark_train' else benchmark_inference
  return fn(config, **config_settings(config))


# ------------------------------------------------------------------------------ the record
def _float32_products_program(config, ours: Runner, train: bool):
  """The compiled step to count FLOPs on: ours, or with bfloat16 products
  (model.train_products / inference_products) the float32-products program of the same
  arithmetic (the bfloat16 path loops over blocks of rows, whose bodies XLA's cost analysis
  counts once). In a multi-process run (where an experiment cannot be built on a device
  subset) ours, an undercount."""
  key = 'train_products' if train else 'inference_products'
  if config.model[key] == 'float32' or jax.process_count() > 1:
    return ours.compiled
  config = config.copy_and_resolve_references()
  config.model[key] = 'float32'
  exp = experiment.build_experiment(config, ours.devices)
  return (exp.train_step if train else exp.infer_step).lower(
      ours.args, ours.batch_at(0)).compile()


def _flops(compiled) -> float | None:
  """FLOPs of one run of the per-device program (XLA's cost analysis; a lower bound: each
  while-loop body, e.g. an NMS round, counts once)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  cost = (cost[0] if cost else None) if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']) if cost and 'flops' in cost else None


def host_round_trips(compiled) -> dict[str, int] | None:
  """What in the compiled per-device program makes the host wait on the device, counted
  statically in its HLO: ``while_loops`` (every loop op), ``data_dependent_loops`` (those
  without a trip count XLA knows: on a GPU the host reads each iteration's condition back),
  ``conditionals`` (a GPU reads the branch index back: e.g. ``model.mask.train_slots=
  'bucketed'``), ``host_callbacks`` (Python callbacks) and ``host_transfers``
  (send/recv/infeed/outfeed).
  A loop inside another loop counts once. None where the module text is not available."""
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except  # not every backend keeps it
    return None
  loops = [line for line in text.splitlines() if re.search(r'\bwhile\(', line)]
  return {
      'while_loops': len(loops),
      'data_dependent_loops': sum('known_trip_count' not in line for line in loops),
      'conditionals': len(re.findall(r'\bconditional\(', text)),
      'host_callbacks': len(re.findall(r'custom_call_target="[^"]*callback', text)),
      'host_transfers': len(re.findall(r'\s(?:send|recv|infeed|outfeed)\(', text)),
  }


def _percentiles(seconds: list[float]) -> dict[str, float]:
  ms = np.asarray(seconds) * 1e3
  out = {f'p{q}': float(np.percentile(ms, q)) for q in (50, 90, 95, 99)}
  return {**out, 'mean': float(ms.mean()), 'count': int(ms.size)}


def write_json(result: dict[str, Any], path: str) -> None:
  """Writes ``result`` as indented JSON (directories created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True, default=float)
    f.write('\n')


def _round_trips_text(trips: dict[str, int] | None) -> str:
  if not trips:
    return ''
  return (f"host syncs: {trips['data_dependent_loops']} data-dependent loops of "
          f"{trips['while_loops']}, {trips['conditionals']} conditionals, "
          f"{trips['host_callbacks']} callbacks, "
          f"{trips['host_transfers']} transfers")


def summary_line(result: dict[str, Any]) -> str:
  """One human-readable line of a result."""
  r, lat = result, result.get('latency_ms')
  pct = '/'.join(f'{lat[k]:.0f}' for k in ('p50', 'p90', 'p95', 'p99')) if lat else ''
  parts = [f"{r['benchmark']}: {r['images_per_sec']:.3f} img/s", f"step {r['step_time_ms']:.1f} ms",
           f"batch {r['per_device_batch_size']}x{r['num_devices']} {r['device_kind']}",
           f"{r['image_size'][0]}x{r['image_size'][1]} {r['precision']}",
           f"compile {r['compile_s']:.1f} s",
           f"{r['flops_per_image'] / 1e9:.1f} GFLOP/img" if r.get('flops_per_image') else '',
           f"MFU {100 * r['mfu']:.1f}%" if r.get('mfu') is not None else '',
           f'latency p50/p90/p95/p99 {pct} ms' if lat else '',
           _round_trips_text(r.get('host_round_trips'))]
  if r.get('foreground_rois_per_image') is not None:
    parts.append(f"foreground RoIs/img {r['foreground_rois_per_image']:.0f}")
  parts += [f"{name} {b['images_per_sec']:.3f} img/s" + (f" ({b['threads']} threads)" if
                                                         'threads' in b else '')
            + f", ratio {b['ratio_ours_over_baseline']:.2f}x" for name, b in r['baselines'].items()]
  return ', '.join([p for p in parts if p] + [f"load {r['load_average']}"])
