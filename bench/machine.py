"""What the benchmarks print about the machine they ran on (imports nothing heavy)."""

import platform


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'
