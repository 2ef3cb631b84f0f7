"""Fixtures shared by the test folders: coco_sample (tests/data/coco_sample) prepared as a TFDS
dataset once per test session (per pytest-xdist worker)."""

import os
import pathlib

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / 'data' / 'coco_sample'


@pytest.fixture(scope='session')
def sample_data_dir(tmp_path_factory):
  """TFDS data_dir holding coco_instances/coco2017 (split 'validation') built from coco_sample."""
  from maskrcnn_jax.data import prepare  # pylint: disable=import-outside-toplevel
  data_dir = tmp_path_factory.mktemp('tfds')
  prepare.prepare(str(data_dir), manual_dir=str(SAMPLE_DIR), show_progress=False)
  return str(data_dir)


@pytest.fixture(scope='session')
def sample_source(sample_data_dir):
  """The 'validation' split of the prepared coco_sample (`maskrcnn_jax.data.pipeline.Source`)."""
  from maskrcnn_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.Source('coco_instances', 'validation', sample_data_dir)
