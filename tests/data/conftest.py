"""Fixtures of the data tests (the prepared coco_sample comes from tests/conftest.py)."""

import json
import pathlib
import sys

import pytest

# Lets the test modules import data_helpers (pytest runs in importlib mode).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from data_helpers import SAMPLE_JSON  # pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def sample_json():
  with open(SAMPLE_JSON) as f:
    return json.load(f)
