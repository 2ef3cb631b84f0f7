"""What the benchmarks print about the machine they ran on (imports nothing heavy)."""

import platform

from maskrcnn_jax.cpuinfo import first_value


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows)."""
  return first_value(('model name',)) or platform.processor() or 'unknown'
