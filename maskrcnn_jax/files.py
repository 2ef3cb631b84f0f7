"""Writing files so that a reader never sees a partial one."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_open(path, mode: str = 'w'):
  """Opens ``path + '.tmp'`` for writing and renames it over `path` when the block ends without
  an error; after an error any earlier `path` is left as it was."""
  tmp = f'{os.fspath(path)}.tmp'
  with open(tmp, mode) as f:
    yield f
  os.replace(tmp, path)
