"""Fixtures of the data tests: the coco_sample dataset, built once per session."""

import json
import os
import pathlib
import sys

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Lets the test modules import data_helpers (pytest runs in importlib mode).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from data_helpers import SAMPLE_DIR, SAMPLE_JSON  # pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def sample_json():
  with open(SAMPLE_JSON) as f:
    return json.load(f)


@pytest.fixture(scope='session')
def sample_data_dir(tmp_path_factory):
  """TFDS data_dir holding coco_instances/coco2017 built from tests/data/coco_sample."""
  from maskrcnn_jax.data import prepare  # pylint: disable=import-outside-toplevel
  data_dir = tmp_path_factory.mktemp('tfds')
  prepare.prepare(str(data_dir), manual_dir=str(SAMPLE_DIR), show_progress=False)
  return str(data_dir)


@pytest.fixture(scope='session')
def sample_source(sample_data_dir):
  from maskrcnn_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.Source('coco_instances', 'validation', sample_data_dir)
