"""Stopping a run cleanly on a signal: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1.

SIGTERM is what SLURM and Kubernetes send before they stop a job, SIGUSR1 what SLURM sends ahead
of a time limit (``#SBATCH --signal=USR1@120``). On the first of them the training loop finishes
the step it is in, waits for any checkpoint being written, saves one at that step, prints one line
and exits (`Preempted`; status `EXIT_STATUS`: 0 for SIGTERM and SIGUSR1, so a requeued job simply
reruns its command, 130 for SIGINT as shells expect). A second signal aborts at once (status
128 + the signal's number) without saving; the previous checkpoint stays intact, since Orbax
commits a checkpoint by renaming it only when it is complete.

In a multi-process run the signal may reach one process only (or the processes at different
steps): after every step the processes agree, with one all-gather of their flags, whether to
stop, so all stop and save at the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_STATUS = {signal.SIGTERM: 0, signal.SIGUSR1: 0, signal.SIGINT: 130}


class Preempted(Exception):
  """The run stopped on a signal after saving the checkpoint of `step` at `path`."""

  def __init__(self, signum: int, step: int, path: str):
    self.signum, self.step, self.path = int(signum), int(step), path
    self.exit_status = EXIT_STATUS.get(signal.Signals(self.signum), 0)
    super().__init__(f'stopped by {signal.Signals(self.signum).name} at step {step}: checkpoint '
                     f'saved in {path}; rerun the same command to resume')


class StopRequests:
  """A context that turns `SIGNALS` into a stop request checked at step boundaries.

  Handlers are installed only in the main thread (Python delivers signals there); elsewhere the
  context does nothing and `should_stop` stays False.
  """

  def __init__(self):
    self.signum = 0
    self._previous = {}

  def __enter__(self) -> 'StopRequests':
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signum:
      print(f'{name} again: aborting at once without saving (the last checkpoint is intact)',
            file=sys.stderr, flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = int(signum)
    print(f'{name} received: stopping after the current step with a checkpoint (send it again '
          'to abort at once)', file=sys.stderr, flush=True)

  def should_stop(self) -> int:
    """The signal to stop on (0: go on), the same in every process."""
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() == 1:
      return self.signum
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.int32(self.signum))
    received = [int(f) for f in np.ravel(flags) if f]
    return received[0] if received else 0
