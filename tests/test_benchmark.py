"""The benchmarks on a tiny model, 2 steps each: JSON with the expected keys.

Training through ``bench/benchmark_training.py`` (pmap over 2 fake CPU devices, with a profile
of one more step), inference through ``python -m maskrcnn_jax.main
--config.mode=benchmark_inference``; `test_flags` parses the bench tools' flags (the config's
vocabulary plus the bench-only flags) and checks the peak table. Subprocesses, as a user runs
them, with XLA's backend optimisations off (a few steps of a tiny model are all compilation) and
a shared persistent compilation cache. No timing is asserted.
"""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from maskrcnn_jax import configs
from maskrcnn_jax.train import benchmark

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


def test_training_json(setup):
  root, config, env = setup
  output = root / 'train.json'
  cmd = [sys.executable, str(REPO / 'bench' / 'benchmark_training.py'), f'--config={config}',
         '--config.benchmark.num_steps=2', '--config.benchmark.warmup_steps=1',
         '--config.train.per_device_batch_size=1', '--config.benchmark.num_devices=2',
         '--cpu_devices=2', f'--profile_dir={root / "trace"}', '--profile_steps=1',
         '--baseline=model.conv_kernel_grad=xla', f'--output={output}']
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  result = json.loads(output.read_text())
  assert set(benchmark.RESULT_KEYS) <= set(result)
  assert result['benchmark'] == 'training' and result['framework'] == 'maskrcnn_jax'
  assert result['num_devices'] == 2 and result['global_batch_size'] == 2
  assert result['timed_steps'] == 1 and result['image_size'] == [64, 64]
  assert result['images_per_sec'] > 0 and result['compile_s'] > 0
  assert result['flops_per_image'] > 0 and result['final_loss'] > 0
  assert result['memory'] is None or 'bytes_in_use' in result['memory']
  trips = result['host_round_trips']
  assert trips['host_callbacks'] == trips['host_transfers'] == 0  # the step never calls back
  assert trips['while_loops'] >= trips['data_dependent_loops'] >= 0
  # The same experiment with XLA's kernel gradients, timed beside ours on the same devices.
  baseline = result['baselines']['maskrcnn_jax[model.conv_kernel_grad=xla]']
  assert baseline['images_per_sec'] > 0
  assert baseline['ratio_ours_over_baseline'] == pytest.approx(
      result['images_per_sec'] / baseline['images_per_sec'])
  # ... which trained the same: the same loss after the same steps (equal gradients).
  assert baseline['final_loss'] == pytest.approx(result['final_loss'], rel=1e-4)
  assert result['foreground_rois_per_image'] >= 0 and trips['conditionals'] >= 0
  # The profile maps the ops to the model's stages by the MaskRCNN method names.
  stages = result['profile']['stage_ms']
  assert {'backbone', 'proposals_nms', 'roi_align_targets_losses (bwd)'} <= set(stages)
  assert (root / 'trace' / 'module.hlo.txt').is_file()
  assert 'img/s' in out.stdout


def test_host_round_trips_counts_loops_and_callbacks():
  def f(x):
    x = jax.lax.fori_loop(0, 5, lambda i, c: c * 2, x)                  # a known trip count
    x = jax.lax.while_loop(lambda c: c.sum() < 100, lambda c: c * 2, x)  # data-dependent
    x = jax.lax.switch(jnp.argmax(x), [jnp.sin, jnp.cos, jnp.tanh], x)  # a branch index
    jax.debug.callback(lambda v: None, x)
    return x
  compiled = jax.jit(f).lower(jnp.ones(3)).compile()
  assert benchmark.host_round_trips(compiled) == dict(
      while_loops=2, data_dependent_loops=1, conditionals=1, host_callbacks=1, host_transfers=0)
  plain = jax.jit(lambda x: x * 2).lower(jnp.ones(3)).compile()
  assert benchmark.host_round_trips(plain) == dict(
      while_loops=0, data_dependent_loops=0, conditionals=0, host_callbacks=0, host_transfers=0)


def test_flags(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO / 'bench'))  # as for a script run from bench/
  cli = importlib.import_module('cli')
  for name in ('cli', 'profiles'):  # bench/'s modules: not left behind for other tests
    sys.modules.pop(name, None)
  argv = ['benchmark_inference.py', f'--config={REPO / "configs" / "coco_r50.py"}',
          '--config.eval.per_device_batch_size=8', '--config.model.precision=bfloat16',
          '--config.data.image_size=(832, 1344)', '--config.benchmark.num_steps=8',
          '--config.benchmark.num_devices=2', '--latency_steps=5', '--torchvision',
          '--threads=2', '--cpu_devices=2']
  fv = flags.FlagValues()
  cli.define_flags('inference', fv, argv)
  fv(argv)
  c = fv.config
  assert (c.eval.per_device_batch_size, c.model.precision, tuple(c.data.image_size)) == (
      8, 'bfloat16', (832, 1344))
  assert (fv.latency_steps, fv.torchvision, fv.threads, fv.cpu_devices) == (5, True, 2, 2)
  assert (fv.rounds, fv.stages, fv.profile_dir) == (1, False, None)
  settings = benchmark.config_settings(c)
  assert settings == dict(num_steps=8, warmup_steps=100, data='synthetic', num_devices=2,
                          peak_tflops=None)
  other = cli.override_config(c, "model.conv_kernel_grad=xla,train.learning_rate=0.5")
  assert (other.model.conv_kernel_grad, other.train.learning_rate) == ('xla', 0.5)
  assert c.model.conv_kernel_grad == 'auto'  # the original is left as it was
  for spec, message in (('model.nope=1', "'model.nope' does not exist"),
                        ('nope.x=1', "'nope.x' does not exist"),
                        ('model.conv_kernel_grad', 'is not KEY=VALUE'),
                        ('model.conv_kernel_grad=3', "'model.conv_kernel_grad': .*type"),
                        ('model.conv_kernel_grad=im2col', 'conv_kernel_grad')):
    with pytest.raises(configs.ConfigError, match=message):
      cli.override_config(c, spec)
  training = flags.FlagValues()
  cli.define_flags('training', training)
  assert 'latency_steps' not in training
  assert benchmark.peak_tflops_for('NVIDIA H200', 'bfloat16') == 989.0
  assert benchmark.peak_tflops_for('NVIDIA A100-SXM4-80GB', 'float32') == 156.0
  assert benchmark.peak_tflops_for('cpu', 'float32') is None


def test_main_benchmark_mode(setup):
  """``python -m maskrcnn_jax.main --config.mode=benchmark_inference``: the inference benchmark
  (latency pass included) through the main program's config flags, with bfloat16 products (their
  FLOPs counted on the float32-products program)."""
  root, config, env = setup
  workdir = root / 'main'
  cmd = [sys.executable, '-m', 'maskrcnn_jax.main', f'--config={config}', f'--workdir={workdir}',
         '--config.mode=benchmark_inference', '--config.benchmark.num_steps=2',
         '--config.benchmark.warmup_steps=1', '--config.eval.per_device_batch_size=2',
         '--config.model.precision=bfloat16', '--config.model.inference_products=bfloat16']
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  result = json.loads((workdir / 'benchmark_inference.json').read_text())
  assert result['flops_per_image'] > 0
  assert set(benchmark.RESULT_KEYS + benchmark.INFERENCE_KEYS) <= set(result)
  assert result['benchmark'] == 'inference' and result['precision'] == 'bfloat16'
  assert result['num_steps'] == 2 and result['per_device_batch_size'] == 2
  assert set(result['latency_ms']) >= {'p50', 'p90', 'p95', 'p99'}
  assert result['latency_ms']['count'] == 1
  assert 'img/s' in out.stdout


@pytest.mark.parametrize('train', [True, False])
def test_flops_are_counted_on_the_float32_products_program(monkeypatch, train):
  """With bfloat16 products (model.train_products for training, inference_products for
  inference) the FLOPs come from the same step built with float32 products (the bfloat16 path's
  row-block loops are counted once by XLA); with float32 products from ours, not rebuilt."""
  key = 'train_products' if train else 'inference_products'
  config = configs.load_config(REPO / 'configs' / 'tiny_smoke.py')
  built = []

  class Step:
    def __init__(self, name):
      self.name = name

    def lower(self, *args):
      return self

    def compile(self):
      return self.name

  def build(config, devices):
    built.append((config.model.train_products, config.model.inference_products, devices))
    return type('Exp', (), {'train_step': Step('train'), 'infer_step': Step('infer')})

  monkeypatch.setattr(benchmark.experiment, 'build_experiment', build)
  ours = type('Ours', (), {'compiled': 'ours', 'devices': ['d'], 'args': None,
                           'batch_at': staticmethod(lambda i: None)})
  count_on = benchmark._float32_products_program  # pylint: disable=protected-access
  assert count_on(config, ours, train) == 'ours' and not built
  config.model[key] = 'bfloat16'
  program = count_on(config, ours, train)
  assert program == ('train' if train else 'infer')
  assert built == [('float32', 'float32', ['d'])] and config.model[key] == 'bfloat16'
