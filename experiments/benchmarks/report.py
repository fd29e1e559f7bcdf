"""What every benchmark prints: a readable key/value table, then one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any


def commit() -> str:
  """Short hash of the checked-out commit (with '-dirty' when tracked files were changed), or
  'unknown' outside a git checkout."""
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                          capture_output=True,
                          text=True, check=True, cwd=os.path.dirname(__file__)).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def emit(result: dict[str, Any]) -> None:
  """Prints `result` as an aligned table and as one JSON line (the last line of output)."""
  width = max(len(k) for k in result)
  for k, v in result.items():
    print(f"{k:<{width}}  {v}")
  print(json.dumps(result))
