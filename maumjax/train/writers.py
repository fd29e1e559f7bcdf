"""Where training metrics go: JSON lines, TensorBoard event files and a progress bar.

* `<workdir>/log.jsonl`: one JSON object per logged step or evaluation, e.g.
  `{"step": 120, "epoch": 3, "kind": "train", "loss": 4.2, "images_per_s": 310.5, ...}`.
  Appended, so a resumed run continues the same file.
* `<workdir>/tensorboard/`: the same scalars as TensorBoard events (tensorboardX, no
  TensorFlow), tag `<kind>/<name>`; `tensorboard --logdir <workdir>/tensorboard`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm


class MetricWriter:
  """Writes scalar metrics to `log.jsonl` and TensorBoard under a workdir.

  Args:
    workdir: run directory (created if missing).
    tensorboard: also write TensorBoard event files.
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl = self.workdir / "log.jsonl"
    self._file = self.jsonl.open("a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # Imported lazily: only the trainer needs it.

      # A unique suffix: event files are named by the second they were opened, and a resumed
      # run opened within the same second would otherwise overwrite the earlier file.
      self._tb = SummaryWriter(logdir=str(self.workdir / "tensorboard"),
                               filename_suffix=f".{os.getpid()}.{time.time_ns()}")

  def write(self, step: int, scalars: Mapping[str, float], *, kind: str = "train",
            epoch: int | None = None) -> None:
    """Appends one record; non-finite values are written as null in JSON."""
    record = {"step": int(step), "kind": kind}
    if epoch is not None:
      record["epoch"] = int(epoch)
    for name, value in scalars.items():
      value = float(value)
      record[name] = value if math.isfinite(value) else None
      if self._tb is not None:
        self._tb.add_scalar(f"{kind}/{name}", value, int(step))
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_log(workdir: str | os.PathLike, kind: str | None = None) -> list[dict]:
  """The records of `<workdir>/log.jsonl` (optionally only one kind)."""
  path = Path(workdir) / "log.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if kind is None or r.get("kind") == kind]


def progress(total: int, initial: int = 0, *, disable: bool = False) -> tqdm:
  """The training progress bar (steps), showing loss and images/s as postfix."""
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=disable,
              mininterval=1.0)
