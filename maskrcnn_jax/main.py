"""Command line: train and/or evaluate Mask R-CNN.

  python -m maskrcnn_jax.main --config=configs/coco_r50.py --workdir=/tmp/mrcnn \
    [--config.mode=train|eval|train_and_eval] [--config.train.per_device_batch_size=4 ...]

Throughput benchmarks on synthetic data (the reference's benchmark scripts; see
maskrcnn_jax/train/benchmark.py, config.benchmark and bench/ for the side-by-side tools):
``--config.mode=benchmark_train`` or
``benchmark_inference`` with e.g. ``--config.benchmark.num_steps=200``; the result is written to
``<workdir>/<mode>.json``.

The mode is config.mode (the reference's default: train_and_eval). eval evaluates the latest
checkpoint in the workdir, or ``--config.eval.checkpoint_step=N``, or, in a workdir without
checkpoints, the weights of ``--config.init.torchvision_maskrcnn``. On a workdir with a recorded
``config.json``, eval uses that config with the command's own ``--config.*`` flags on top and
restores the model's variables only, so no training flag has to be repeated.

Rerunning a command resumes from the latest usable checkpoint, after checking that the config
changes nothing the checkpoints depend on (`maskrcnn_jax.train.resume`). SIGTERM, SIGUSR1 and
SIGINT stop a run cleanly with a checkpoint at the step reached (`maskrcnn_jax.train.preemption`:
exit status 0, or 130 for SIGINT). ``--log_libraries`` keeps the libraries' INFO lines.

Several hosts: start one process per host with the usual environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, or
SLURM / Open MPI); each host reads its own share of every batch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from maskrcnn_jax import configs  # no JAX: the config is validated before JAX loads
from maskrcnn_jax import huge_pages

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_bool('log_libraries', False, "Keep the libraries' INFO lines (Orbax, TFDS, clu) "
                  'in the log; by default only their warnings and errors show.')
flags.mark_flags_as_required(['config', 'workdir'])


def _multi_process_env() -> bool:
  """True when the environment describes a multi-process (multi-host) job."""
  env = os.environ
  if int(env.get('JAX_NUM_PROCESSES', '1') or 1) > 1:
    return True
  for key in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE'):
    if int(env.get(key, '1') or 1) > 1:
      return True
  return False


def _initialize_distributed(jax) -> None:
  """jax.distributed.initialize from JAX_* variables, else from the cluster (SLURM, Open MPI)."""
  env = os.environ
  if 'JAX_NUM_PROCESSES' in env:
    # jax reads JAX_COORDINATOR_ADDRESS itself but not the process count and id.
    jax.distributed.initialize(coordinator_address=env.get('JAX_COORDINATOR_ADDRESS'),
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  else:
    jax.distributed.initialize()


def _hide_gpus_from_tensorflow(jax) -> None:
  """TensorFlow, where a library imports it on the host, must not grab the accelerators'
  memory. Not imported at all where JAX can only use the CPU (``JAX_PLATFORMS=cpu``, or no GPU
  plugin installed): a training run does not need it, and the import takes 2.3 s."""
  platforms = (jax.config.jax_platforms or '').strip().lower()
  if platforms == 'cpu' or (not platforms and importlib.util.find_spec('jax_plugins') is None):
    return
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  tf.config.set_visible_devices([], 'GPU')


def _eval_config(config, workdir: str):
  """``--config.mode=eval`` on a training workdir: the config the run recorded
  (``<workdir>/config.json``, `maskrcnn_jax.inference.recorded_config`) with the keys this command
  sets explicitly on top, so no training flag has to be repeated and a test-time setting can still
  be changed. Other modes, and workdirs without a config.json, use the command line's config."""
  if config.mode != 'eval' or not os.path.isfile(os.path.join(workdir, 'config.json')):
    return config
  from maskrcnn_jax import inference  # pylint: disable=import-outside-toplevel
  merged = inference.recorded_config(workdir)
  overrides = dict(config_flags.get_override_values(FLAGS['config']))
  overrides['mode'] = 'eval'
  merged.update_from_flattened_dict(overrides)
  configs.validate_config(merged)
  logging.info('eval: the config recorded in %s/config.json, with %s', workdir,
               sorted(overrides))
  return merged


def main(argv) -> int:
  del argv
  config = FLAGS.config
  # Before anything heavy is imported: a bad value fails in a second.
  try:
    configs.validate_config(config)
  except configs.ConfigError as e:
    print(f'error: invalid config: {e}', file=sys.stderr)
    return 2
  # Heavy imports after the validation (JAX; TensorFlow only where data is read).
  import jax  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.train import loop  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.train import preemption  # pylint: disable=import-outside-toplevel
  from maskrcnn_jax.train import progress  # pylint: disable=import-outside-toplevel
  if not FLAGS.log_libraries:
    progress.quiet_libraries()
  try:
    loop.check_mode(config)
  except configs.ConfigError as e:
    print(f'error: invalid config: {e}', file=sys.stderr)
    return 2
  _hide_gpus_from_tensorflow(jax)
  if _multi_process_env():
    _initialize_distributed(jax)
  logging.info('JAX %s, process %d of %d, local devices %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_devices())
  from maskrcnn_jax import weights  # pylint: disable=import-outside-toplevel
  try:
    config = _eval_config(config, FLAGS.workdir)
    result = loop.run(config, FLAGS.workdir)
  except preemption.Preempted as e:
    print(e, file=sys.stderr)
    return e.exit_status
  except (pipeline.DatasetNotPreparedError, checkpoint.NoCheckpointError,
          checkpoint.CorruptCheckpointError, checkpoint.CheckpointSaveError,
          loop.NonFiniteLossError, configs.ConfigError, weights.WeightImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if isinstance(result, dict):
    print('final metrics: ' + ' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                       for k, v in result.items()))
  return 0


def run() -> None:
  huge_pages.restart_with_huge_pages()  # before JAX loads: see maskrcnn_jax/huge_pages.py
  app.run(main)


if __name__ == '__main__':
  run()
