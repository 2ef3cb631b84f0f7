"""The flags and the main function of ``bench/benchmark_training.py`` and
``bench/benchmark_inference.py``.

One vocabulary, the config's: ``--config=configs/coco_r50.py`` and any override of it, e.g.
``--config.train.per_device_batch_size=4`` (training) or ``--config.eval.per_device_batch_size=8``
(inference), ``--config.model.precision=bfloat16``, ``--config.data.image_size='(832, 1344)'``,
``--config.benchmark.num_steps=200 --config.benchmark.warmup_steps=100``,
``--config.benchmark.num_devices=8``, ``--config.benchmark.data=real``,
``--config.benchmark.peak_tflops=989``. The flags below are what only these tools do: torchvision
side by side, maskrcnn_jax with other config values side by side (``--baseline``), stage
breakdowns, profiles, fake CPU devices, the output file.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import pathlib
import sys

import jax
from absl import flags
from ml_collections import config_flags

from maskrcnn_jax import configs
from maskrcnn_jax.train import benchmark, experiment

import profiles  # bench/, on sys.path as the running script's folder

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'coco_r50.py')


def define_flags(kind: str, flag_values: flags.FlagValues = flags.FLAGS,
                 argv: list[str] | None = None) -> None:
  """The tools' flags (``kind``: 'training' or 'inference') in ``flag_values``; the config
  overrides are those of ``argv`` (default sys.argv), as ml_collections' config flags read."""
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file(
      'config', DEFAULT_CONFIG, 'Config file (default configs/coco_r50.py); override any key '
      'with --config.<key>=<value>.', lock_config=True, sys_argv=argv, **fv)
  flags.DEFINE_bool('torchvision', False, 'Also time torchvision maskrcnn_resnet50_fpn on the '
                    'same batch, in alternating windows (needs torch and torchvision).', **fv)
  flags.DEFINE_integer('threads', None, 'torch threads (default: all cores, as XLA uses on the '
                       'CPU).', **fv)
  flags.DEFINE_multi_string(
      'baseline', [], 'KEY=VALUE[,KEY=VALUE...]: also time maskrcnn_jax with these config '
      'overrides, in alternating windows on the same batches, e.g. '
      '--baseline=model.conv_kernel_grad=xla (repeatable: one baseline each).', **fv)
  flags.DEFINE_integer('rounds', 1, 'Timed windows per framework, alternated (--torchvision, '
                       '--baseline).', **fv)
  flags.DEFINE_bool('stages', False, 'Also time each stage of the model on its own '
                    '(profiles.stage_breakdown).', **fv)
  flags.DEFINE_integer('stage_repeats', 3, 'Runs per stage (--stages); the median is kept.',
                       **fv)
  flags.DEFINE_string('profile_dir', None, 'Trace --profile_steps more steps with jax.profiler '
                      'here and summarise them per op and stage.', **fv)
  flags.DEFINE_integer('profile_steps', 3, 'Steps traced (--profile_dir).', **fv)
  if kind == 'inference':
    flags.DEFINE_integer('latency_steps', None, 'Batches of the latency pass (default: as many '
                         'as were timed).', **fv)
  flags.DEFINE_integer('cpu_devices', None, 'Fake CPU devices (jax_num_cpu_devices), to try '
                       'pmap on a CPU.', **fv)
  flags.DEFINE_string('output', None, 'JSON result file.', **fv)


def torchvision_available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ('torch', 'torchvision'))


def run(kind: str, fv: flags.FlagValues = flags.FLAGS) -> dict:
  """Runs the benchmark the parsed flags describe; prints and writes the result."""
  train = kind == 'training'
  if fv.cpu_devices:
    jax.config.update('jax_num_cpu_devices', fv.cpu_devices)  # before the backend starts
  config = fv.config
  configs.validate_config(config)
  extra = []
  if fv.torchvision and not torchvision_available():
    print('torch or torchvision is not importable: timing maskrcnn_jax only')
  elif fv.torchvision:
    import torchvision_runner  # pylint: disable=import-outside-toplevel  # torch is optional
    threads = fv.threads or os.cpu_count()
    extra.append(lambda ours: torchvision_runner.TorchvisionRunner(
        config, ours.host_ring, train, threads))
  for spec in fv.baseline:
    extra.append(functools.partial(_config_baseline, override_config(config, spec), spec, train))
  profile = ((lambda ours, start: profiles.trace(ours, fv.profile_dir, fv.profile_steps, start))
             if fv.profile_dir else None)
  settings = dict(benchmark.config_settings(config), extra_runners=extra, rounds=fv.rounds,
                  profile=profile)
  if train:
    result = benchmark.benchmark_training(config, **settings)
  else:
    result = benchmark.benchmark_inference(config, latency_steps=fv.latency_steps, **settings)
  if fv.stages:
    result['stages'] = profiles.stage_breakdown(config, train=train, repeats=fv.stage_repeats)
  print(benchmark.summary_line(result))
  if fv.stages:
    print('stages (ms): ' + ', '.join(f'{k} {v:.1f}' for k, v in
                                      result['stages']['stage_ms'].items()))
  if fv.output:
    benchmark.write_json(result, fv.output)
    print(f'wrote {fv.output}')
  return result


def override_config(config, spec: str):
  """A copy of ``config`` with the ``KEY=VALUE[,KEY=VALUE...]`` of ``spec`` set (values read as
  Python literals, else strings; ml_collections' own type checks); `ConfigError` names a key
  that does not exist or a value of the wrong type."""
  config = config.copy_and_resolve_references()
  config.lock()  # an unknown key is an error, not a new key
  for item in spec.split(','):
    key, sep, text = (part.strip() for part in item.partition('='))
    if not sep:
      raise configs.ConfigError(f'--baseline {spec!r}: {item!r} is not KEY=VALUE')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    try:
      config.update_from_flattened_dict({key: value})
    except KeyError:
      raise configs.ConfigError(f'--baseline {spec!r}: config key {key!r} does not exist') from None
    except TypeError as e:
      raise configs.ConfigError(f'--baseline {spec!r}: config key {key!r}: {e}') from None
  configs.validate_config(config)
  return config


def _config_baseline(config, spec: str, train: bool, ours) -> benchmark.Runner:
  """maskrcnn_jax built from ``config`` (ours with ``spec`` applied) on our devices."""
  exp = experiment.build_experiment(config, ours.devices)
  data = benchmark.config_settings(config)['data']
  runner = (benchmark.TrainRunner if train else benchmark.InferenceRunner)(exp, data)
  runner.name = f'maskrcnn_jax[{spec}]'
  return runner


def main(kind: str, argv) -> int:
  if len(argv) > 1:
    print(f'unexpected arguments: {argv[1:]}', file=sys.stderr)
    return 2
  try:
    run(kind)
  except configs.ConfigError as e:
    print(f'error: invalid config: {e}', file=sys.stderr)
    return 2
  return 0
