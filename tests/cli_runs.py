"""Runs of the command line (`python -m maskrcnn_jax.main`) shared by the end-to-end tests.

configs/tiny_smoke.py trained on coco_sample's six images (its only split, 'validation'), every
run a subprocess as a user runs it. The expensive pieces (the prepared dataset, a persistent
compilation cache, one uninterrupted reference run) are built once per test session under a file
lock and shared by the pytest-xdist workers and the test modules (`tests/conftest.py` imports the
fixtures).
"""

import contextlib
import fcntl
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / 'tests' / 'data' / 'coco_sample'
TOTAL_STEPS = 12
CKPT_EVERY = 3


def shared_dir(tmp_path_factory) -> pathlib.Path:
  """A directory shared by the pytest-xdist workers of this session (the session's own otherwise).

  Module fixtures run once per worker; the expensive ones below (dataset, compilation cache, the
  reference run) are built once under a file lock and reused by the other worker.
  """
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


@contextlib.contextmanager
def locked(path: pathlib.Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def compilation_cache_dir(tmp_path_factory) -> pathlib.Path:
  """The session's persistent compilation cache (tests/conftest.py sets it for every test)."""
  return shared_dir(tmp_path_factory) / 'main_shared' / 'jax_cache'


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  e = dict(os.environ)
  e.update(TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu',
           JAX_COMPILATION_CACHE_DIR=str(compilation_cache_dir(tmp_path_factory)),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return e


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = shared_dir(tmp_path_factory) / 'main_shared'
  d = root / 'tfds'
  with locked(root / 'tfds.lock'):
    if not (root / 'tfds.done').exists():
      from maskrcnn_jax.data import prepare  # pylint: disable=import-outside-toplevel
      prepare.prepare(str(d), manual_dir=str(SAMPLE_DIR), show_progress=False)
      (root / 'tfds.done').touch()
  return str(d)


def command(workdir, data_dir, *overrides):
  return [sys.executable, '-m', 'maskrcnn_jax.main', '--config=configs/tiny_smoke.py',
          f'--workdir={workdir}', f'--config.data.tfds_data_dir={data_dir}',
          '--config.data.train_split=validation',
          '--config.data.num_workers=1',
          f'--config.train.total_steps={TOTAL_STEPS}',
          f'--config.train.checkpoint_every_steps={CKPT_EVERY}',
          f'--config.eval.every_steps={TOTAL_STEPS}',
          '--config.train.learning_rate_steps=(8,)', *overrides]


def run_cli(cmd, env, timeout=300):
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  return out.returncode, out.stdout + out.stderr


def params(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(workdir) / 'checkpoints' / str(step) / 'default'
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(path)
  import jax  # pylint: disable=import-outside-toplevel
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree['params'])}


def assert_same_params(workdir, reference, step):
  """The parameters of the checkpoint `step` of two workdirs are bit for bit the same."""
  expected, got = params(reference, step), params(workdir, step)
  assert expected.keys() == got.keys()
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def data_files(workdir, step):
  """The array data files of checkpoint `step` (Orbax's OCDBT ``d/`` files), smallest first."""
  root = pathlib.Path(workdir) / 'checkpoints' / str(step) / 'default'
  return sorted((p for p in root.rglob('*') if p.is_file() and p.parent.name == 'd'),
                key=lambda p: p.stat().st_size)


def flip_bytes(path):
  """Inverts four bytes in the middle of a file (a corruption that can restore silently)."""
  data = bytearray(path.read_bytes())
  i = len(data) // 2
  data[i:i + 4] = bytes(b ^ 0xFF for b in data[i:i + 4])
  path.write_bytes(bytes(data))


def steps(workdir):
  d = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, env, data_dir):
  """An uninterrupted train_and_eval run (once per session, shared by the xdist workers)."""
  root = shared_dir(tmp_path_factory) / 'main_shared'
  workdir = root / 'reference'
  with locked(root / 'reference.lock'):
    if not (root / 'reference.log').exists():
      rc, log = run_cli(command(workdir, data_dir), env)
      assert rc == 0, log[-5000:]
      (root / 'reference.log').write_text(log)
  return workdir, (root / 'reference.log').read_text()


class Process:
  """A command-line run whose output is collected line by line."""

  def __init__(self, cmd, env):
    self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                    daemon=True)
    self._reader.start()

  def wait_for(self, text, timeout=480):
    deadline = time.time() + timeout
    while time.time() < deadline and self.proc.poll() is None:
      if any(text in line for line in list(self.lines)):
        return
      time.sleep(0.05)
    raise AssertionError(f'no {text!r} in the output:\n' + ''.join(self.lines)[-4000:])

  def finish(self, timeout=480):
    rc = self.proc.wait(timeout)
    self._reader.join(10)
    return rc, ''.join(self.lines)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def two_processes(cmd, env):
  port = free_port()
  runs = []
  flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
  for i in range(2):
    e = dict(env, JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i),
             JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', XLA_FLAGS=flags)
    runs.append(Process(cmd, e))
  return runs
