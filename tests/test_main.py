"""End to end through the command line (`python -m maskrcnn_jax.main`) on the real coco_sample.

configs/tiny_smoke.py (configs/tiny.py at 64x64 with a 16-channel FPN), trained on coco_sample's six
images (its only split, 'validation'). Every run is a subprocess, as a user runs it; they share a
persistent compilation cache (the `env` fixture), since a few steps of a tiny model are mostly
compilation. (Not XLA's ``--xla_backend_optimization_level=0``: it compiles the train step in 6 s
instead of 14, but these runs load it from the cache and its steps are 1.7x slower; cold and
cached runs at that level are bit-for-bit equal, measured 2026-12-04, and tests/test_multihost.py,
whose runs compile cold, uses it.)

Covered: train_and_eval writes checkpoints, the COCO results JSON and the metrics line; a run
killed with SIGKILL and restarted with the same command resumes from its last checkpoint and ends
with exactly the parameters of the uninterrupted run; eval of a chosen checkpoint; clear errors for
eval without a checkpoint, an unknown config key and a dataset that is not prepared.
"""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time


from cli_runs import REPO, TOTAL_STEPS, assert_same_params, command, run_cli, steps


def test_train_and_eval_writes_checkpoints_results_and_metrics(reference_run):
  workdir, log = reference_run
  assert steps(workdir) == [3, 6, 9, 12]
  results = json.loads((workdir / f'coco_results_step{TOTAL_STEPS}.json').read_text())
  assert isinstance(results, list)
  for r in results[:5]:
    assert {'image_id', 'category_id', 'bbox', 'score', 'segmentation'} <= set(r)
  lines = [json.loads(l) for l in (workdir / 'eval_metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines] == [TOTAL_STEPS]
  keys = {f'{t}/{s}' for t in ('bbox', 'segm') for s in (
      'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')}
  assert set(lines[0]) == keys | {'step'}
  assert 'final metrics: step=12' in log
  # The TensorBoard event file (written without TensorFlow), read by TensorFlow: the training
  # scalars of every step (tiny logs every step) and the evaluation's at the last.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  [events] = workdir.glob('events.out.tfevents.*')
  tags = collections.defaultdict(set)
  for e in tf.compat.v1.train.summary_iterator(str(events)):
    tags[e.step].update(v.tag for v in e.summary.value)
  assert all('total_loss' in tags[s] and 'learning_rate' in tags[s] for s in range(1, 13)), tags
  assert {f'eval/{k}' for k in keys} <= tags[TOTAL_STEPS]


def test_killed_run_resumes_and_matches_the_uninterrupted_run(reference_run, tmp_path, env,
                                                              data_dir):
  workdir = tmp_path / 'killed'
  cmd = command(workdir, data_dir)
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while not steps(workdir) and time.time() < deadline and proc.poll() is None:
      time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()
  killed_at = steps(workdir)
  assert killed_at and killed_at[-1] < TOTAL_STEPS, killed_at
  assert proc.returncode == -signal.SIGKILL
  rc, log = run_cli(cmd, env)
  assert rc == 0, log[-5000:]
  assert f'resuming from {workdir / "checkpoints"} step {killed_at[-1]}' in log
  assert steps(workdir)[-1] == TOTAL_STEPS
  assert_same_params(workdir, reference_run[0], TOTAL_STEPS)


def test_eval_of_a_chosen_checkpoint(reference_run, tmp_path, env, data_dir):
  # A copy: the reference workdir is shared with the other tests (and xdist workers).
  workdir = tmp_path / 'eval'
  shutil.copytree(reference_run[0] / 'checkpoints', workdir / 'checkpoints')
  # Clipping adds a stage to the optimizer the checkpoint was trained without: eval restores the
  # model's variables only, so optimizer settings that differ from training's do not matter.
  rc, log = run_cli(command(workdir, data_dir, '--config.mode=eval',
                          '--config.eval.checkpoint_step=6',
                          '--config.train.gradient_clip_norm=10.0'), env)
  assert rc == 0, log[-5000:]
  lines = [json.loads(l) for l in (workdir / 'eval_metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines] == [6]
  assert (workdir / 'coco_results_step6.json').exists()


def test_eval_without_checkpoint_is_a_clear_error(tmp_path, env, data_dir):
  rc, log = run_cli(command(tmp_path / 'empty', data_dir, '--config.mode=eval'), env)
  assert rc == 1
  assert 'error: no checkpoint in' in log


def test_unknown_config_key_is_a_clear_error(tmp_path, env, data_dir):
  rc, log = run_cli(command(tmp_path, data_dir, '--config.train.no_such_key=3'), env)
  assert rc != 0
  assert 'no_such_key' in log


def test_invalid_config_value_is_a_clear_error(tmp_path, env, data_dir):
  rc, log = run_cli(command(tmp_path, data_dir, '--config.train.warmup_steps=100'), env)
  assert rc == 2
  assert "invalid config: config key 'train.warmup_steps'" in log


def test_unprepared_dataset_is_a_clear_error(tmp_path, env):
  rc, log = run_cli(command(tmp_path / 'work', tmp_path / 'no_tfds'), env)
  assert rc == 1
  assert 'is not prepared' in log and 'maskrcnn_jax.data.prepare' in log


def test_too_few_classes_is_a_clear_error_before_compiling(tmp_path, env, data_dir):
  workdir = tmp_path / 'work'
  rc, log = run_cli(command(workdir, data_dir, '--config.model.num_classes=4'), env)
  assert rc != 0
  assert "config key 'model.num_classes' = 4 is too small for dataset" in log
  assert 'model.num_classes >= 91' in log
  assert not (workdir / 'config.json').exists()  # nothing written for a run that cannot start


def test_eval_uses_the_recorded_config_with_the_commands_overrides(reference_run, tmp_path, env,
                                                                    data_dir):
  """eval reads <workdir>/config.json (a value recorded there is used without a flag) and puts
  the keys given on the command line on top."""
  workdir = tmp_path / 'recorded'
  shutil.copytree(reference_run[0] / 'checkpoints', workdir / 'checkpoints')
  recorded = json.loads((reference_run[0] / 'config.json').read_text())
  recorded['model']['test']['detections_per_image'] = 5
  (workdir / 'config.json').write_text(json.dumps(recorded))

  def per_image(step):
    counts = {}
    for r in json.loads((workdir / f'coco_results_step{step}.json').read_text()):
      counts[r['image_id']] = counts.get(r['image_id'], 0) + 1
    return counts

  base = [sys.executable, '-m', 'maskrcnn_jax.main', '--config=configs/tiny_smoke.py',
          f'--workdir={workdir}', '--config.mode=eval']
  rc, log = run_cli(base + ['--config.eval.checkpoint_step=6'], env)
  assert rc == 0, log[-5000:]
  assert max(per_image(6).values()) == 5  # the recorded value (tiny's own is 10)
  rc, log = run_cli(base + ['--config.eval.checkpoint_step=9',
                         '--config.model.test.detections_per_image=3'], env)
  assert rc == 0, log[-5000:]
  assert max(per_image(9).values()) == 3  # the command line wins
