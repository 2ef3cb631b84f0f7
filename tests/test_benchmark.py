"""The benchmarks on a tiny model, 2 steps each: JSON with the expected keys.

Training through ``launch/benchmark_training.py`` (pmap over 2 fake CPU devices), inference
through ``python -m maskrcnn_jax.main --config.mode=benchmark_inference``; both launch scripts
share `benchmark.add_arguments` / `run_from_args`, whose parsing `test_helpers` checks for the
inference script. Subprocesses, as a user runs them, with XLA's
backend optimisations off (a few steps of a tiny model are all compilation) and a shared
persistent compilation cache. No timing is asserted.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('bench')
  config = REPO / 'configs' / 'tiny_smoke.py'
  env = dict(os.environ)
  env.update(TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_backend_optimization_level=0',
             JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return root, config, env


def _run(script, config, env, output, *extra):
  cmd = [sys.executable, str(REPO / 'launch' / script), f'--config={config}', '--num_steps=2',
         '--warmup_steps=1', f'--output={output}', *extra]
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  return json.loads(pathlib.Path(output).read_text()), out.stdout


def test_training_json(setup):
  from maskrcnn_jax import benchmark  # pylint: disable=import-outside-toplevel
  root, config, env = setup
  result, stdout = _run('benchmark_training.py', config, env, root / 'train.json',
                        '--batch_size=1', '--cpu_devices=2', '--num_devices=2')
  assert set(benchmark.RESULT_KEYS) <= set(result)
  assert result['benchmark'] == 'training' and result['framework'] == 'maskrcnn_jax'
  assert result['num_devices'] == 2 and result['global_batch_size'] == 2
  assert result['timed_steps'] == 1 and result['image_size'] == [64, 64]
  assert result['images_per_sec'] > 0 and result['compile_s'] > 0
  assert result['flops_per_image'] > 0
  assert result['memory'] is None or 'bytes_in_use' in result['memory']
  assert result['torchvision'] is None
  assert 'img/s' in stdout


def test_helpers():
  import argparse  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax import benchmark  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser()
  benchmark.add_arguments(parser, 'inference')
  args = parser.parse_args(['--gpus', '2', '--amp', '--image_size', '832x1344',
                            '--latency_steps', '5', '--torchvision'])
  assert (args.num_devices, args.amp, args.image_size, args.latency_steps) == (
      2, True, (832, 1344), 5)
  assert args.num_steps == 160 and args.warmup_steps == 10
  assert benchmark.parse_image_size('832x1344') == (832, 1344)
  assert benchmark.parse_image_size('512') == (512, 512)
  assert benchmark.peak_tflops_for('NVIDIA H200', 'bfloat16') == 989.0
  assert benchmark.peak_tflops_for('cpu', 'float32') is None


def test_main_benchmark_mode(setup):
  """``python -m maskrcnn_jax.main --config.mode=benchmark_inference``: the inference benchmark
  (latency pass included) through the main program's config flags."""
  from maskrcnn_jax import benchmark  # pylint: disable=import-outside-toplevel
  root, config, env = setup
  workdir = root / 'main'
  cmd = [sys.executable, '-m', 'maskrcnn_jax.main', f'--config={config}', f'--workdir={workdir}',
         '--config.mode=benchmark_inference', '--config.benchmark.num_steps=2',
         '--config.benchmark.warmup_steps=1', '--config.eval.per_device_batch_size=2',
         '--config.model.precision=bfloat16']
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  result = json.loads((workdir / 'benchmark_inference.json').read_text())
  assert set(benchmark.RESULT_KEYS + benchmark.INFERENCE_KEYS) <= set(result)
  assert result['benchmark'] == 'inference' and result['precision'] == 'bfloat16'
  assert result['num_steps'] == 2 and result['per_device_batch_size'] == 2
  assert set(result['latency_ms']) >= {'p50', 'p90', 'p95', 'p99'}
  assert result['latency_ms']['count'] == 1
  assert 'img/s' in out.stdout
