"""Fixtures shared by the test folders: coco_sample (tests/data/coco_sample) prepared as a TFDS
dataset once per test session (per pytest-xdist worker)."""

import os
import pathlib
import sys

import pytest

# The command-line fixtures (env, data_dir, reference_run) for every test module.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cli_runs import (compilation_cache_dir, data_dir, env,  # noqa: F401,E402
                      reference_run)  # pylint: disable=unused-import

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / 'data' / 'coco_sample'


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session's tests, their subprocesses and notebook
  kernels, shared by the pytest-xdist workers (`cli_runs.compilation_cache_dir`): a program that
  several tests compile (the same model, shapes and XLA flags) compiles once."""
  import jax  # pylint: disable=import-outside-toplevel
  path = str(compilation_cache_dir(tmp_path_factory))
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.3'
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.3)
  return path


@pytest.fixture(scope='session')
def sample_data_dir(tmp_path_factory):
  """TFDS data_dir holding coco_instances/coco2017 (split 'validation') built from coco_sample."""
  from maskrcnn_jax.data import prepare  # pylint: disable=import-outside-toplevel
  directory = tmp_path_factory.mktemp('tfds')
  prepare.prepare(str(directory), manual_dir=str(SAMPLE_DIR), show_progress=False)
  return str(directory)


@pytest.fixture(scope='session')
def sample_source(sample_data_dir):
  """The 'validation' split of the prepared coco_sample (`maskrcnn_jax.data.pipeline.Source`)."""
  from maskrcnn_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.Source('coco_instances', 'validation', sample_data_dir)
