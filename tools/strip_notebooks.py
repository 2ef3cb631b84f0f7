"""Strips outputs from the notebooks before they are committed (tests/test_notebooks.py checks it).

  python tools/strip_notebooks.py            # notebooks/*.ipynb, rewritten in place
  python tools/strip_notebooks.py --check    # exit status 1, naming them, if any has outputs
  python tools/strip_notebooks.py a.ipynb    # given files

Clears every code cell's outputs and execution count and drops the per-cell metadata that running
a notebook adds (execution times, scroll and collapse state; ``tags`` are kept: the tests find
cells by them), the notebook-level ``widgets`` state and all of ``language_info`` but its name. Needs nbformat (requirements-test.txt).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEPT_CELL_METADATA = ('tags',)


def strip(nb) -> bool:
  """Strips `nb` in place; returns whether anything changed."""
  changed = False
  for cell in nb.cells:
    kept = {k: v for k, v in cell.get('metadata', {}).items() if k in KEPT_CELL_METADATA}
    if kept != dict(cell.get('metadata', {})):
      cell['metadata'] = nbformat.from_dict(kept)
      changed = True
    if cell.cell_type == 'code':
      if cell.get('outputs') or cell.get('execution_count') is not None:
        changed = True
      cell['outputs'] = []
      cell['execution_count'] = None
  if 'widgets' in nb.metadata:
    del nb.metadata['widgets']
    changed = True
  # A kernel records its Python version and lexers here: keep the language only.
  language = {'name': nb.metadata.get('language_info', {}).get('name', 'python')}
  if nb.metadata.get('language_info') != language:
    nb.metadata['language_info'] = nbformat.from_dict(language)
    changed = True
  return changed


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('paths', nargs='*', type=pathlib.Path)
  parser.add_argument('--check', action='store_true', help='only report; exit 1 if any would change')
  args = parser.parse_args(argv)
  paths = args.paths or sorted((ROOT / 'notebooks').glob('*.ipynb'))
  dirty = []
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    if strip(nb):
      dirty.append(path)
      if not args.check:
        nbformat.write(nb, path)
  for path in dirty:
    print(f'{"has outputs" if args.check else "stripped"}: {path}')
  return 1 if (args.check and dirty) else 0


if __name__ == '__main__':
  sys.exit(main())
