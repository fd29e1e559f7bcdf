"""The error a user can fix, and how the command line reports it.

`UserError` marks a problem in what the user gave (a file, a folder, a config value, a flag):
its message is one line that names the file or value and says what to do. The entry points
(`experiments/launch.py`, `experiments/evaluate.py`) print such errors as one line, without a
traceback, and exit with status 2; `--verbose` shows the traceback. Any other exception is a
bug and keeps its traceback.

Library code raises subclasses that also derive from the builtin a caller would expect
(`LayoutError(UserError, ValueError)`, ...), so `except ValueError` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
  """A problem with the user's input; the message names it and the fix, on one line.

  `exit_now`: a command line that reports this error should end the process at once (without
  the interpreter's teardown), because the library left threads behind that may never end.
  """

  exit_now = False


def one_line(message: str) -> str:
  """`message` with its whitespace runs (newlines included) collapsed to single spaces."""
  return " ".join(str(message).split())
