"""Short status lines and a tidy progress count for the slow data steps (generate, build).

`note` prints one line to stdout (flushed, so it shows before a long step starts). `Progress`
counts items: on a terminal a tqdm bar on stderr that erases itself when done, elsewhere (a
log file, a pipe) a line on stdout at each quarter, so logs get no carriage-return debris and
stderr keeps only warnings and errors.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import tqdm


def note(message: str) -> None:
  """Prints one status line to stdout, flushed."""
  print(message, flush=True)


class Progress:
  """Counts `total` items under `desc`; a context manager.

  Args:
    desc: what is counted, e.g. 'generating images'.
    total: number of items expected.
    stream: where to write; by default a bar on stderr when it is a terminal, else lines on
      stdout.
  """

  def __init__(self, desc: str, total: int, stream: TextIO | None = None):
    self.desc = desc
    self.total = max(int(total), 0)
    self.done = 0
    self._bar: Any = None
    self._next_quarter = 1
    terminal = stream or sys.stderr
    isatty = getattr(terminal, "isatty", None)
    if isatty is not None and isatty():
      self._bar = tqdm.tqdm(total=self.total, desc=desc, unit="img", leave=False,
                            file=terminal, dynamic_ncols=True, mininterval=0.5)
    self._stream = stream or sys.stdout

  def update(self, n: int = 1) -> None:
    """Counts `n` more items."""
    self.done += n
    if self._bar is not None:
      self._bar.update(n)
      return
    while (self.total and self._next_quarter < 4
           and self.done * 4 >= self._next_quarter * self.total):
      print(f"  {self.desc}: {self.done}/{self.total} ({25 * self._next_quarter}%)",
            file=self._stream, flush=True)
      self._next_quarter += 1

  def close(self) -> None:
    """Removes the bar (the caller prints its own summary line)."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()
