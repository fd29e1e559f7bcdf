"""Metric writers: JSON lines and TensorBoard event files that a reader can parse back."""

from __future__ import annotations

import math

from maumjax.train import writers


def test_jsonl_and_tensorboard_round_trip(tmp_path):
  with writers.MetricWriter(tmp_path) as w:
    w.write(1, {"loss": 2.5, "images_per_s": 100.0}, epoch=0)
    w.write(2, {"loss": math.nan}, epoch=0)
    w.write(2, {"all/single/r1": 55.0}, kind="eval", epoch=0)
  with writers.MetricWriter(tmp_path) as w:  # a resumed run appends
    w.write(3, {"loss": 1.5}, epoch=1)
  rows = writers.read_log(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 2, 3]
  assert rows[1]["loss"] is None  # non-finite written as null, not as invalid JSON
  assert writers.read_log(tmp_path, "eval") == [
      {"step": 2, "kind": "eval", "epoch": 0, "all/single/r1": 55.0}]

  from tensorboardX.proto import event_pb2
  import struct

  seen = {}
  for path in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):  # TFRecord framing: length, crc, payload, crc
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        seen.setdefault(v.tag, []).append((event.step, v.simple_value))
  losses = sorted(seen["train/loss"])
  assert losses[0] == (1, 2.5) and losses[-1] == (3, 1.5) and math.isnan(losses[1][1])
  assert seen["eval/all/single/r1"] == [(2, 55.0)]
