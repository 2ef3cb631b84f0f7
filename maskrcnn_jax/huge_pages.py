"""Transparent huge pages for the host's malloc: the command-line programs restart themselves
once with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35).

Why. XLA:CPU allocates a step's large temporaries afresh on every run; glibc serves them with
``mmap`` and returns them on ``free``, so every step first-touches its working set again, one
4 KiB page fault at a time. Under a virtual machine a fault is expensive: a fresh 72 MB copy took
48-65 ms against 8.5 ms into reused memory, and the 832x1344 CPU training step of
`configs/coco_r50.py` ran 13.7 s without huge pages and 10.5 s with them (docs/performance.md).
With ``glibc.malloc.hugetlb=1`` malloc asks the kernel for transparent huge pages
(``madvise``), 512x fewer faults. glibc reads its tunables only when a process starts, hence the
restart (``os.execve`` of the same command line, first thing in the program's ``__main__``
block: before JAX starts a backend; what was imported by then is imported again).

Nothing happens when: the variable already sets ``glibc.malloc.hugetlb`` (the user's choice, or
the restarted process), ``MASKRCNN_JAX_HUGE_PAGES=0``, the C library is not glibc, or the kernel
has transparent huge pages off (``[never]``). The user's other tunables are kept. Notebooks and
library use are left alone: export the variable before starting Jupyter to get the same effect.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'MASKRCNN_JAX_HUGE_PAGES'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def _thp_available(path: str = THP_SETTING) -> bool:
  """Whether the kernel grants transparent huge pages on request ('always' or 'madvise')."""
  try:
    with open(path, encoding='ascii') as f:
      setting = f.read()
  except OSError:
    return False
  return '[never]' not in setting and '[' in setting


def restart_environment(environ=None, libc: str | None = None,
                        thp_available: bool | None = None) -> dict[str, str] | None:
  """The environment to restart with, or None to go on as started (see the module docstring)."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, '1') == '0':
    return None
  libc = platform.libc_ver()[0] if libc is None else libc
  if libc != 'glibc':
    return None
  current = environ.get('GLIBC_TUNABLES', '')
  if TUNABLE in current:
    return None
  if not (_thp_available() if thp_available is None else thp_available):
    return None
  return dict(environ, GLIBC_TUNABLES=':'.join(filter(None, [current, TUNABLE + '=1'])))


def restart_with_huge_pages() -> None:
  """Restarts this process once with malloc on transparent huge pages, when that applies.

  Call first thing in a program's ``__main__`` block: the command line is ``sys.orig_argv``, so
  ``python -m maskrcnn_jax.main --config=...`` restarts as itself.
  """
  env = restart_environment()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
