"""TensorBoard scalars without TensorFlow: the event file that ``tensorboard --logdir=WORKDIR``
reads, written directly.

The training loop writes scalars only (losses, learning rate, images/s, the evaluation's AP).
clu's writers would do it through ``tf.summary``, and importing ``clu.metric_writers`` imports
TensorFlow: 2.3 s at every start of a training or evaluation process on a CPU, and a failure on
an accelerator machine that has no TensorFlow (data reading does not need it).

The format (TensorFlow's ``event.proto`` / ``summary.proto`` and the TFRecord framing): the file
is a sequence of records ``uint64 length | uint32 masked CRC32C(length) | data | uint32 masked
CRC32C(data)`` (little-endian), each ``data`` an ``Event`` message; the first one carries
``file_version = "brain.Event:2"``, then one ``Event{wall_time, step, summary}`` per write with a
``Summary.Value{tag, simple_value}`` per scalar. tests/train/test_summaries.py reads the file back
with TensorFlow's own reader.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping

FILE_VERSION = b'brain.Event:2'


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
    table.append(c)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for byte in data:
    c = _CRC32C_TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: CRC32C rotated right by 15 bits plus a constant (mod 2**32)."""
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
  """One TFRecord: length, its checksum, the data, its checksum."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', masked_crc32c(length)) + data +
          struct.pack('<I', masked_crc32c(data)))


# ------------------------------------------------------------------ protocol buffer encoding
def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    if not n:
      out.append(low)
      return bytes(out)
    out.append(low | 0x80)


def _field(number: int, wire_type: int) -> bytes:
  return _varint(number << 3 | wire_type)


def _message_field(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int = 0, *, file_version: bytes | None = None,
          scalars: Mapping[str, float] | None = None) -> bytes:
  """An encoded ``Event``: wall_time (1, double), step (2, int64), file_version (3, string),
  summary (5, ``Summary``: repeated value (1) of ``{tag (1, string), simple_value (2, float)}``)."""
  if step < 0:
    raise ValueError(f'step {step} < 0')
  out = _field(1, 1) + struct.pack('<d', wall_time)
  if step:
    out += _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _message_field(3, file_version)
  if scalars:
    values = b''.join(
        _message_field(1, _message_field(1, tag.encode()) + _field(2, 5) +
                       struct.pack('<f', float(value)))
        for tag, value in scalars.items())
    out += _message_field(5, values)
  return out


class ScalarWriter:
  """Scalars into ``<logdir>/events.out.tfevents.<time>.<host>.<pid>`` (a new file per process,
  as TensorFlow's writer does); ``logdir=None`` writes nothing (the processes other than 0 of a
  multi-host run). The part of clu's ``MetricWriter`` the training loop uses: write_scalars,
  flush, close."""

  def __init__(self, logdir: str | None):
    self.path = None
    self._file = None
    if logdir is not None:
      os.makedirs(logdir, exist_ok=True)
      now = time.time()
      self.path = os.path.join(
          logdir, f'events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}')
      self._file = open(self.path, 'ab')
      self._file.write(record(event(now, file_version=FILE_VERSION)))
      self._file.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._file is not None and scalars:
      self._file.write(record(event(time.time(), int(step), scalars=scalars)))
      self._file.flush()  # whole records on disk at every write: a killed run loses none

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> 'ScalarWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
