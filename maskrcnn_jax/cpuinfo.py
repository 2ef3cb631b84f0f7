"""What Linux's /proc/cpuinfo says about the CPU (imports nothing heavy: the benchmarks use it)."""

from __future__ import annotations


def first_value(keys: tuple[str, ...], path: str = '/proc/cpuinfo') -> str | None:
  """The value of the first line whose key is one of `keys` (the first CPU's), stripped; None
  when no line has one or the file cannot be read (not Linux)."""
  try:
    with open(path) as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() in keys:
          return value.strip()
  except OSError:
    pass
  return None
