"""maskrcnn_jax.huge_pages: when the command-line programs restart with malloc on transparent huge
pages, with what environment, and that a restarted process runs the same command once."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from maskrcnn_jax import huge_pages

REPO = pathlib.Path(__file__).resolve().parents[1]
THP = huge_pages._thp_available  # pylint: disable=protected-access


def test_restart_adds_the_tunable_and_keeps_the_users_other_tunables():
  env = huge_pages.restart_environment({'PATH': '/bin'}, 'glibc', True)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  env = huge_pages.restart_environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'glibc',
                                       True)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('environ,libc,thp', [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'glibc', True),  # the user's own choice
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, 'glibc', True),  # already restarted
    ({'MASKRCNN_JAX_HUGE_PAGES': '0'}, 'glibc', True),  # opted out
    ({}, '', True),  # not glibc (macOS, musl)
    ({}, 'glibc', False),  # the kernel's transparent huge pages are off
])
def test_no_restart(environ, libc, thp):
  assert huge_pages.restart_environment(environ, libc, thp) is None


@pytest.mark.parametrize('setting,available', [
    ('always [madvise] never\n', True), ('[always] madvise never\n', True),
    ('always madvise [never]\n', False), ('', False)])
def test_thp_setting(tmp_path, setting, available):
  path = tmp_path / 'enabled'
  path.write_text(setting)
  assert THP(str(path)) is available
  assert not THP(str(tmp_path / 'missing'))


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc' or not THP(),
                    reason='needs glibc and transparent huge pages')
def test_a_program_restarts_once_with_the_tunable(tmp_path):
  """The restarted process runs the same command line (sys.orig_argv) with the variable set,
  and does not restart again: the script's side effect happens exactly twice (before and after
  the one restart)."""
  marks = tmp_path / 'marks'
  script = tmp_path / 'prog.py'
  script.write_text(
      'import os, sys\n'
      f'open({str(marks)!r}, "a").write(os.environ.get("GLIBC_TUNABLES", "-") + "\\n")\n'
      'from maskrcnn_jax import huge_pages\n'
      'huge_pages.restart_with_huge_pages()\n'
      'print("args", sys.argv[1:])\n')
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', 'MASKRCNN_JAX_HUGE_PAGES')}
  env['PYTHONPATH'] = str(REPO)
  out = subprocess.run([sys.executable, str(script), '--flag=1'], env=env, capture_output=True,
                       text=True, check=True, timeout=120)
  assert out.stdout.strip() == "args ['--flag=1']"
  assert marks.read_text().splitlines() == ['-', 'glibc.malloc.hugetlb=1']
