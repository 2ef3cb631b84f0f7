"""Logs a person reads: progress lines with elapsed time and ETA, a closing summary, and the
libraries' INFO chatter (Orbax's lines about every checkpoint) kept out of the way.

`quiet_libraries` drops INFO and DEBUG records logged from inside the `NOISY_PACKAGES` (their
warnings and errors still show) and Orbax's closed-event-loop tracebacks; ``--log_libraries`` on
the command line keeps them all.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Mapping

NOISY_PACKAGES = ('orbax', 'tensorflow_datasets', 'etils', 'absl/logging', 'clu')


def hms(seconds: float) -> str:
  """'h:mm:ss' of a duration (rounded down to the second)."""
  seconds = max(int(seconds), 0)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class _LibraryInfoFilter(logging.Filter):
  """Drops records below WARNING whose source file lies in one of the noisy packages."""

  def __init__(self, packages):
    super().__init__()
    self.parts = tuple(f'{os.sep}{p.replace("/", os.sep)}{os.sep}' for p in packages)

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(p in record.pathname
                                                        for p in self.parts)


def quiet_libraries(packages=NOISY_PACKAGES) -> logging.Filter:
  """Installs the filter on the root logger's handlers (absl's among them); returns it.

  Also hides the "Exception ignored ... RuntimeError: Event loop is closed" tracebacks that
  Orbax's background event loop leaves at exit after a failed read (harmless; dozens of them).
  """
  f = _LibraryInfoFilter(packages)
  for handler in logging.getLogger().handlers:
    handler.addFilter(f)
  previous = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and 'Event loop is closed' in str(error)):
      previous(unraisable)

  sys.unraisablehook = hook
  return f


class Progress:
  """Progress lines of a training run: step, share done, loss, speed, elapsed time and ETA.

  The speed and the ETA leave out the first step of the process (compilation).
  """

  def __init__(self, start_step: int, total_steps: int):
    self.start, self.total = int(start_step), int(total_steps)
    self.began = time.time()
    self._first = None  # (step, time) after the first step, once compiled

  def step_done(self, step: int) -> None:
    if self._first is None:
      self._first = (step, time.time())

  def steps_per_second(self, step: int) -> float | None:
    if self._first is None or step <= self._first[0]:
      return None
    return (step - self._first[0]) / max(time.time() - self._first[1], 1e-9)

  def line(self, step: int, scalars: Mapping[str, Any]) -> str:
    rate = self.steps_per_second(step)
    loss = scalars.get('loss', scalars.get('total_loss'))
    parts = [f'step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%)']
    if loss is not None:
      parts.append(f'loss {float(loss):.4f}')
    parts.append(f'{rate:.2f} steps/s' if rate else 'compiling')
    parts.append(f'elapsed {hms(time.time() - self.began)}')
    if rate:
      parts.append(f'ETA {hms((self.total - step) / rate)}')
    return ' | '.join(parts)

  def log(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info('%s', self.line(step, scalars))

  def summary(self, step: int, *, checkpoints: str, last_scalars: Mapping[str, Any] | None,
              eval_line: Mapping[str, Any] | None, results: str | None) -> str:
    """The closing lines of a run (also logged)."""
    lines = [f'training done: step {step}/{self.total}, {step - self.start} steps in this run, '
             f'{hms(time.time() - self.began)}; checkpoints in {checkpoints}']
    if last_scalars:
      shown = {k: v for k, v in last_scalars.items() if 'loss' in k}
      lines.append('last losses: ' + ' '.join(f'{k}={float(v):.4f}' for k, v in shown.items()))
    if eval_line:
      lines.append('last evaluation: ' + ' '.join(
          f'{k}={v:.4f}' for k, v in eval_line.items() if k in ('bbox/AP', 'segm/AP')) +
                   (f'; results in {results}' if results else ''))
    text = '\n'.join(lines)
    for line in lines:
      logging.info('%s', line)
    return text
