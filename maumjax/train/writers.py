"""Where training metrics go: JSON lines, TensorBoard event files and a progress bar.

* `<workdir>/log.jsonl`: one JSON object per logged step or evaluation, e.g.
  `{"step": 120, "epoch": 3, "kind": "train", "loss": 4.2, "images_per_s": 310.5, ...}`.
  Appended, so a resumed run continues the same file; a run resumed from the checkpoint of
  step S first drops the records past S (and any `final` record), so each step appears once.
* `<workdir>/tensorboard/`: the same scalars as TensorBoard events (tensorboardX, no
  TensorFlow), tag `<kind>/<name>`; `tensorboard --logdir <workdir>/tensorboard`. Each process
  writes its own event file; a resumed one starts with TensorBoard's purge marker at step S + 1,
  which hides the earlier files' events past S.
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
    resume_step: the step the run continues from (its checkpoint's; 0 for a start from
      scratch): records logged past it by an earlier, interrupted process are dropped, and
      TensorBoard is told to hide them. None appends without dropping anything.
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
               resume_step: int | None = None):
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl = self.workdir / "log.jsonl"
    if resume_step is not None and self.jsonl.exists():
      _drop_records_after(self.jsonl, resume_step)
    self._file = self.jsonl.open("a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # Imported lazily: only the trainer needs it.

      # A unique suffix: event files are named by the second they were opened, and a resumed
      # run opened within the same second would otherwise overwrite the earlier file.
      purge = None if resume_step is None else int(resume_step) + 1
      self._tb = SummaryWriter(logdir=str(self.workdir / "tensorboard"), purge_step=purge,
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


def _drop_records_after(path: Path, step: int) -> None:
  """Rewrites `path` (atomically) without the records past `step` and the `final` ones."""
  lines = path.read_text().splitlines()
  keep = []
  for line in lines:
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:  # a line cut short by a kill: drop it
      continue
    if record.get("step", 0) <= step and record.get("kind") != "final":
      keep.append(line)
  if len(keep) != len(lines):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def read_log(workdir: str | os.PathLike, kind: str | None = None) -> list[dict]:
  """The records of `<workdir>/log.jsonl` (optionally only one kind)."""
  path = Path(workdir) / "log.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if kind is None or r.get("kind") == kind]


def progress(total: int, initial: int = 0, *, disable: bool = False) -> tqdm:
  """The training progress bar (steps), showing loss and images/s as postfix."""
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=disable,
              mininterval=1.0)
