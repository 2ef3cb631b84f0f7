"""A/B of two revisions of this repository: the main program's benchmark modes, alternated.

Shows that a change (a refactor, an optimisation) keeps or moves the speed of the train and
inference steps, on a shared, noisy machine: the base revision is checked out into a git worktree,
and ``python -m maskrcnn_jax.main --config.mode=benchmark_train|benchmark_inference`` runs from
each tree in turn (base, current, current, base, ...), so that a change of machine load hits both;
the ratio of medians is reported with the load averages. Both trees use this interpreter and its
packages (each tree's own ``maskrcnn_jax`` comes first on ``PYTHONPATH``). Example, from the
repository root (the current working tree against the last commit):

  .venv/bin/python bench/compare_revisions.py --base HEAD --rounds 2 \\
      --override=--config.data.image_size='(320, 320)' --output /tmp/ab.json

Overrides use the config's vocabulary and must exist in both revisions.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def _worktree(base: str, root: pathlib.Path) -> pathlib.Path:
  path = root / 'base'
  subprocess.run(['git', '-C', str(REPO), 'worktree', 'add', '--detach', '--force', str(path),
                  base], check=True, capture_output=True, text=True)
  return path


def _run(tree: pathlib.Path, mode: str, config: str, overrides: list[str], steps: int,
         warmup: int, workdir: pathlib.Path) -> dict:
  env = dict(os.environ, PYTHONPATH=str(tree), TF_CPP_MIN_LOG_LEVEL='2')
  cmd = [sys.executable, '-m', 'maskrcnn_jax.main', f'--config={tree / config}',
         f'--workdir={workdir}', f'--config.mode={mode}',
         f'--config.benchmark.num_steps={steps}', f'--config.benchmark.warmup_steps={warmup}',
         *overrides]
  out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
  if out.returncode != 0:
    raise RuntimeError(f'{tree}: {" ".join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}')
  return json.loads((workdir / f'{mode}.json').read_text())


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--base', default='HEAD', help='git revision to compare against')
  parser.add_argument('--config', default='configs/coco_r50.py')
  parser.add_argument('--override', action='append', default=[],
                      help='a --config.<key>=<value> override, repeatable')
  parser.add_argument('--modes', default='benchmark_train,benchmark_inference')
  parser.add_argument('--steps', type=int, default=6, help='steps per run, warm-up included')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=2, help='runs per tree and mode')
  parser.add_argument('--output', default=None)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    trees = {'base': _worktree(args.base, root), 'current': REPO}
    try:
      runs = []
      for mode in args.modes.split(','):
        for r in range(args.rounds):
          order = ('base', 'current') if r % 2 == 0 else ('current', 'base')
          for name in order:
            result = _run(trees[name], mode, args.config, args.override, args.steps,
                          args.warmup, root / f'{mode}_{name}_{r}')
            runs.append({'mode': mode, 'tree': name, 'round': r,
                         'images_per_sec': result['images_per_sec'],
                         'step_time_ms': result['step_time_ms'],
                         'compile_s': result['compile_s'],
                         'load_average': result.get('load_average')})
            print(json.dumps(runs[-1]), flush=True)
    finally:
      subprocess.run(['git', '-C', str(REPO), 'worktree', 'remove', '--force',
                      str(trees['base'])], capture_output=True)
  summary = {}
  for mode in args.modes.split(','):
    med = {name: statistics.median(r['images_per_sec'] for r in runs
                                   if r['mode'] == mode and r['tree'] == name)
           for name in ('base', 'current')}
    summary[mode] = {'base_images_per_sec': med['base'],
                     'current_images_per_sec': med['current'],
                     'ratio_current_over_base': med['current'] / med['base']}
    print(f"{mode}: base {med['base']:.4f} img/s, current {med['current']:.4f} img/s, "
          f"ratio {med['current'] / med['base']:.3f}")
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps({'args': vars(args), 'runs': runs,
                                                     'summary': summary}, indent=1) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
