"""Preemption, corruption and changed configs, through the command line (tests/cli_runs.py).

* SIGTERM mid-run: a checkpoint at the step reached, exit status 0, and the rerun of the same
  command ends with exactly the parameters of the uninterrupted reference run; a second signal
  aborts at once (the two-process case is in tests/test_multihost.py).
* Unusable checkpoints (silently flipped bytes, a truncated data file, a missing _METADATA): the
  run falls back past each with a one-line warning and ends with the reference's parameters;
  eval of an unusable step is a one-line error.
* A changed batch size and depth: a one-line error per key, the recorded config untouched.
* A full disk (a small tmpfs, where mounting one is allowed): an error at that save, the
  previous checkpoints intact.
"""

import os
import re
import shutil
import signal
import subprocess

import pytest

from cli_runs import (TOTAL_STEPS, Process, assert_same_params, command, data_files, flip_bytes,
                      params, run_cli, steps)


def _stopped_at(log):
  found = re.findall(r'stopped by SIGTERM at step (\d+): checkpoint saved in (\S+);', log)
  assert len(found) == 1, log[-4000:]
  return int(found[0][0])


def test_sigterm_saves_the_step_reached_and_the_rerun_matches(reference_run, tmp_path, env,
                                                             data_dir):
  workdir = tmp_path / 'sigterm'
  # Safe changes from the reference's command: the log cadence, train without the evaluation.
  cmd = command(workdir, data_dir, '--config.train.log_every_steps=1', '--config.mode=train')
  run = Process(cmd, env)
  run.wait_for('step 4/12')
  run.proc.send_signal(signal.SIGTERM)
  rc, log = run.finish()
  assert rc == 0, log[-4000:]
  stopped = _stopped_at(log)
  assert 4 <= stopped < TOTAL_STEPS and steps(workdir)[-1] == stopped
  assert 'Traceback' not in log
  rc, log = run_cli(cmd, env)
  assert rc == 0, log[-4000:]
  assert f'resuming from {workdir / "checkpoints"} step {stopped}' in log
  assert_same_params(workdir, reference_run[0], TOTAL_STEPS)


def test_a_second_signal_aborts_at_once(tmp_path, env, data_dir):
  workdir = tmp_path / 'twice'
  run = Process(command(workdir, data_dir, '--config.train.log_every_steps=1'), env)
  run.wait_for('step 2/12')
  run.proc.send_signal(signal.SIGTERM)
  run.wait_for('SIGTERM received')
  run.proc.send_signal(signal.SIGTERM)
  rc, log = run.finish()
  assert rc == 128 + signal.SIGTERM, log[-4000:]  # not 0: no clean stop
  assert 'SIGTERM again: aborting at once' in log and 'stopped by' not in log
  assert 'Traceback' not in log


def _copy_reference(reference, workdir):
  shutil.copytree(reference / 'checkpoints', workdir / 'checkpoints')
  shutil.copy(reference / 'config.json', workdir / 'config.json')


def test_unusable_checkpoints_fall_back_and_the_run_matches(reference_run, tmp_path, env,
                                                           data_dir):
  workdir = tmp_path / 'corrupt'
  _copy_reference(reference_run[0], workdir)
  flip_bytes(data_files(workdir, 12)[-1])  # flipped bytes (restore silently, other values)
  largest = data_files(workdir, 9)[-1]
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])  # truncated
  os.remove(workdir / 'checkpoints' / '6' / 'default' / '_METADATA')
  rc, log = run_cli(command(workdir, data_dir, '--config.mode=train'), env)
  assert rc == 0, log[-4000:]
  for step in (12, 9, 6):
    assert re.search(rf'checkpoint step {step} in \S+ is unusable: \S+', log), log[-4000:]
  assert re.search(r'checkpoint step 6 in \S+ is unusable: .*_METADATA', log), log[-4000:]
  assert f'resuming from {workdir / "checkpoints"} step 3' in log
  assert sorted(os.listdir(workdir / 'checkpoints_unusable')) == ['12', '6', '9']
  assert 'Traceback' not in log
  assert_same_params(workdir, reference_run[0], TOTAL_STEPS)


def test_eval_of_an_unusable_checkpoint_is_a_one_line_error(reference_run, tmp_path, env,
                                                            data_dir):
  workdir = tmp_path / 'corrupt_eval'
  _copy_reference(reference_run[0], workdir)
  for path in data_files(workdir, 12):
    flip_bytes(path)
  rc, log = run_cli(command(workdir, data_dir, '--config.mode=eval',
                            '--config.eval.checkpoint_step=12'), env)
  assert rc == 1, log[-4000:]
  assert re.search(r'error: checkpoint step 12 in \S+ is unusable: .* \(other steps: '
                   r'\[3, 6, 9\]\)', log), log[-4000:]
  assert 'Traceback' not in log and not (workdir / 'eval_metrics.jsonl').exists()


def test_resume_with_a_changed_batch_and_depth_is_refused(reference_run, tmp_path, env,
                                                         data_dir):
  workdir = tmp_path / 'changed'
  _copy_reference(reference_run[0], workdir)
  recorded = (workdir / 'config.json').read_bytes()
  rc, log = run_cli(command(workdir, data_dir, '--config.train.per_device_batch_size=1',
                            '--config.model.backbone.depth=34',
                            '--config.eval.num_samples=3'), env)  # eval: a safe change
  assert rc == 1, log[-4000:]
  assert 'error: the command changes what the checkpoints were made with' in log
  assert '  model.backbone.depth: 18 -> 34\n' in log
  assert '  train.per_device_batch_size: 2 -> 1\n' in log
  assert 'eval.num_samples: ' not in log.split('error:')[1]
  assert (workdir / 'config.json').read_bytes() == recorded
  assert not (workdir / 'config_history').exists() and not (workdir / 'categories.json').exists()


@pytest.fixture
def small_tmpfs(tmp_path):
  mount = tmp_path / 'tmpfs'
  mount.mkdir()
  # Room for about two checkpoints of the tiny model (81 MiB each).
  out = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=200m', 'tmpfs', str(mount)],
                       capture_output=True, text=True)
  if out.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here: {out.stderr.strip()}')
  try:
    yield mount
  finally:
    subprocess.run(['umount', '-l', str(mount)], check=False)


def test_a_full_disk_stops_the_run_at_that_save(small_tmpfs, env, data_dir):
  workdir = small_tmpfs / 'run'
  rc, log = run_cli(command(workdir, data_dir, '--config.train.max_checkpoints_to_keep=10',
                            '--config.mode=train'), env)
  assert rc == 1, log[-4000:]
  found = re.findall(r'error: no space for the checkpoint of step (\d+):', log)
  assert found, log[-4000:]
  assert steps(workdir) == list(range(3, int(found[0]), 3))
  assert 'Traceback' not in log
  params(workdir, steps(workdir)[-1])  # the last checkpoint before it restores
