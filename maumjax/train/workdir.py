"""A run directory that one run at a time owns: the lock, the config check and its history.

* `WorkdirLock`: an exclusive OS-level lock (`fcntl.flock` on `<workdir>/.lock`) held for the
  life of a run. The operating system releases it whenever the process ends, also on
  `kill -9`, so a stale lock cannot outlive its run; a second run on the same workdir is
  refused with the holder's PID and host (written into the lock file). `flock` is reliable on
  local filesystems; on NFS it depends on the server (Linux NFSv4 emulates it with POSIX
  locks).
* `check_config`: the resolved config is written to `config.json`. A workdir with no
  checkpoint takes any config (a run that failed before its first checkpoint can be started
  again with a corrected command). When checkpoints exist, the sections that decide what is
  trained (`RESUME_SECTIONS`) must match, unless the caller names the changed sections in
  `allow_change` (the command line's `--config_change=optim`). Every start is appended to
  `config_history.jsonl`: when, at which step, and which fields changed from what to what.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from maumjax.errors import UserError

# Config sections that must match when a run resumes (train/eval/parallel settings may change).
RESUME_SECTIONS = ("data", "model", "loss", "optim", "method", "seed", "num_epochs")
HISTORY = "config_history.jsonl"


class WorkdirError(UserError, ValueError):
  """The workdir cannot be used: a file in the way, or a different run's config."""


class WorkdirLockedError(UserError, RuntimeError):
  """Another live process holds the workdir's lock."""


def check_workdir_path(path: str | os.PathLike) -> Path:
  """The absolute run folder path; refuses (one line) a path that is, or lies under, a file.

  Creates nothing (the command line checks this before it prepares any data).
  """
  path = Path(path).expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir {path} is a file; give a folder path")
  for p in path.parents:
    if p.exists() and not p.is_dir():
      raise WorkdirError(f"--workdir {path}: {p} is a file, not a folder; give a folder path "
                         "(it is created if missing)")
  return path


def check_sections(names: Iterable[str]) -> tuple[str, ...]:
  """`names` as a tuple, after checking each is one of RESUME_SECTIONS (one-line error)."""
  names = tuple(names)
  unknown = sorted(set(names) - set(RESUME_SECTIONS))
  if unknown:
    raise WorkdirError(f"--config_change: unknown section(s) {', '.join(unknown)}; choose from "
                       f"{', '.join(RESUME_SECTIONS)} (other sections may change freely)")
  return names


def ensure_workdir(path: str | os.PathLike) -> Path:
  """Creates the run folder (and parents); refuses a path that is a file, with one line."""
  path = check_workdir_path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir {path}: cannot create it ({e.strerror}); give a folder you "
                       "can write to") from e
  return path


class WorkdirLock:
  """Exclusive lock on a run folder for as long as the object is open.

  Raises `WorkdirLockedError` (one line: holder PID, host, start time) when another process,
  or another open lock in this process, holds it.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = Path(workdir) / ".lock"
    self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(self._fd)
      os.close(self._fd)
      self._fd = None
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirLockedError(
          f"workdir {self.path.parent} is in use by another run ({holder}); wait for it to "
          "end or stop it, or use another --workdir") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(info).encode(), 0)

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing the descriptor releases the flock
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except (OSError, ValueError):
    info = {}
  if not info:
    return "holder unknown"
  return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')}"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_diff(old: dict[str, Any], new: dict[str, Any],
                sections: Iterable[str] = RESUME_SECTIONS) -> dict[str, list]:
  """`{dotted field: [old, new]}` for the fields of `sections` that differ."""
  a = _flatten({k: old.get(k) for k in sections})
  b = _flatten({k: new.get(k) for k in sections})
  return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_config(workdir: Path, config: dict[str, Any], *, checkpoint_step: int | None,
                 allow_change: Sequence[str] = (), write: bool = True) -> dict[str, list]:
  """Checks `config` against the run in `workdir`, writes config.json and the history entry.

  Args:
    workdir: the run folder.
    config: the resolved config (plain JSON-normalised dict).
    checkpoint_step: the latest checkpoint's step, None when the workdir has none.
    allow_change: sections of RESUME_SECTIONS that may differ from the saved config.
    write: write config.json and the history (False on the non-main processes).

  Returns:
    The changed fields, `{dotted field: [old, new]}` (empty for a new or identical run).

  Raises:
    WorkdirError: unknown names in `allow_change`, or checkpoints exist and sections outside
      `allow_change` differ.
  """
  allow_change = check_sections(allow_change)
  path = workdir / "config.json"
  old = json.loads(path.read_text()) if path.exists() else None
  changed = {} if old is None else config_diff(old, config)
  if old is not None and checkpoint_step is not None:
    blocked = {k: v for k, v in changed.items() if k.split(".")[0] not in allow_change}
    if blocked:
      sections = sorted({k.split(".")[0] for k in blocked})
      shown = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in list(blocked.items())[:4])
      more = f" and {len(blocked) - 4} more" if len(blocked) > 4 else ""
      raise WorkdirError(
          f"{workdir} holds a run (checkpoint step {checkpoint_step}) with a different config "
          f"({shown}{more}); resume with the same config, or allow the change with "
          f"--config_change={','.join(sections)} (recorded in {HISTORY}), or use a new "
          "--workdir")
  if write:
    event = ("new" if old is None else "restart_without_checkpoint" if checkpoint_step is None
             else "resume_with_changes" if changed else "resume")
    entry = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "event": event,
             "step": checkpoint_step or 0, "changed": changed}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    os.replace(tmp, path)
    with (workdir / HISTORY).open("a") as f:
      f.write(json.dumps(entry) + "\n")
  return changed


def read_history(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The entries of `<workdir>/config_history.jsonl`, oldest first."""
  path = Path(workdir) / HISTORY
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
