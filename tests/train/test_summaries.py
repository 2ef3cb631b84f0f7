"""maskrcnn_jax.train.summaries: the TensorBoard event file written without TensorFlow, read back
with TensorFlow's own reader (which checks both checksums of every record)."""

import pathlib
import struct

import numpy as np
import pytest

from maskrcnn_jax.train import summaries

tf = pytest.importorskip('tensorflow')


def _events(path):
  return list(tf.compat.v1.train.summary_iterator(str(path)))


def test_crc32c_check_values():
  # The standard check value of CRC-32C (Castagnoli) and RFC 3720's 32 zero bytes.
  assert summaries.crc32c(b'123456789') == 0xE3069283
  assert summaries.crc32c(bytes(32)) == 0x8A9136AA
  assert summaries.crc32c(b'') == 0


def test_tensorflow_reads_what_the_writer_wrote(tmp_path):
  scalars = {1: {'total_loss': 6.25, 'learning_rate': 1e-3},
             20: {'eval/bbox/AP': 0.4567, 'eval/segm/AP': 0.0, 'ünïcode': -3.5},
             300000: {'images_per_sec': 12345.678}}
  with summaries.ScalarWriter(str(tmp_path / 'run')) as writer:
    writer.write_scalars(0, {'effective_batch_size': 16.0})
    for step, values in scalars.items():
      writer.write_scalars(step, values)
    writer.write_scalars(5, {})  # nothing to write: no event
  [path] = (tmp_path / 'run').glob('events.out.tfevents.*')
  assert path == pathlib.Path(writer.path)
  events = _events(path)
  assert events[0].file_version == 'brain.Event:2'
  got = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]
  want = [(0, {'effective_batch_size': 16.0})] + list(scalars.items())
  assert [s for s, _ in got] == [s for s, _ in want]
  for (_, g), (_, w) in zip(got, want):
    assert g.keys() == w.keys()
    for tag in w:  # simple_value is a float32
      assert g[tag] == np.float32(w[tag]), tag
  assert all(e.wall_time > 1.7e9 for e in events)


def test_every_record_is_on_disk_after_each_write_and_checksummed(tmp_path):
  writer = summaries.ScalarWriter(str(tmp_path))
  writer.write_scalars(3, {'loss': 1.0})
  # Not closed (a killed run): both events are readable already.
  assert [e.step for e in _events(writer.path)] == [0, 3]
  writer.close()
  data = bytearray(pathlib.Path(writer.path).read_bytes())
  first = struct.unpack('<Q', data[:8])[0] + 16  # the file-version record
  data[first + 12] ^= 0x01  # a byte of the second event's data
  corrupt = tmp_path / 'corrupt' / pathlib.Path(writer.path).name
  corrupt.parent.mkdir()
  corrupt.write_bytes(bytes(data))
  with pytest.raises(Exception, match='(?i)corrupt|crc|checksum|data loss'):
    _events(corrupt)


def test_no_logdir_writes_nothing(tmp_path):
  writer = summaries.ScalarWriter(None)
  writer.write_scalars(1, {'loss': 1.0})
  writer.flush()
  writer.close()
  assert writer.path is None and not list(tmp_path.iterdir())
  with pytest.raises(ValueError, match='step -1'):
    summaries.event(0.0, -1)
