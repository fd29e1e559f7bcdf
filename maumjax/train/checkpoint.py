"""Orbax checkpoints of the whole run: train state, config, data-iterator state, progress.

Layout: `<workdir>/checkpoints/<step>/{state,meta}` written by an Orbax `CheckpointManager`
(async saves, keep-last-N), as decided in stack.md §5:

* `state`: the `TrainState` pytree (parameters, BN statistics, optimiser state, memory banks,
  step, rng), saved with `StandardSave` and restored bit-exactly with the live state's
  shapes, dtypes and shardings;
* `meta`: JSON with the resolved config, the epoch and the Grain iterator state, so a run
  restarted with the same workdir continues with the next batch it would have drawn.

A save that fails (disk full, read-only folder, permissions) raises `CheckpointSaveError` with
one line naming the folder and the operating system's reason, and the checkpointer closes
without waiting on the failed background save, so the process ends promptly. Orbax writes each
step into a temporary folder and renames it when complete: a checkpoint either exists whole or
not at all, and the temporary folder of an interrupted save is never restored from.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from maumjax.errors import UserError, one_line

_OS_REASONS = ("No space left on device", "Read-only file system", "Permission denied",
               "File too large", "Disk quota exceeded", "Input/output error")


class CheckpointSaveError(UserError, OSError):
  """A checkpoint could not be written; the message names the folder and the OS reason.

  Orbax's background threads of the failed save may never finish, so the command line ends
  the process at once after reporting it (`exit_now`).
  """

  exit_now = True


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint's tree does not match the run's model/config."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """The asked-for checkpoint does not exist; the message lists the steps that do."""


def os_reason(error: BaseException) -> str | None:
  """The operating system's reason behind `error` (its chain included) as short text; None
  when the error does not come from the filesystem."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return seen.strerror
    seen = seen.__cause__ or seen.__context__
  text = str(error)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return os.strerror(int(code.group(1)))
  for reason in _OS_REASONS:
    if reason.lower() in text.lower():
      return reason
  return None


BEST_SUBDIR = "best"  # <workdir>/best: the trainer's eval.select='best_on_test' pick


def saved_steps(workdir: str | os.PathLike, subdir: str = "checkpoints") -> list[int]:
  """The steps of the complete checkpoints under `<workdir>/<subdir>`, without Orbax.

  Orbax renames a step's temporary folder to the bare step number only once it is complete.
  """
  directory = Path(workdir) / subdir
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit() and d.is_dir())


class Checkpointer:
  """Saves and restores a run's train state and metadata under `<workdir>/checkpoints`.

  Args:
    workdir: the run directory.
    max_to_keep: checkpoints kept (oldest deleted first).
    subdir: the folder under `workdir` ('best' holds the `eval.select='best_on_test'` pick).
    async_save: save in a background thread (Orbax default); `wait()` blocks until done.
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True,
               subdir: str = "checkpoints"):
    self.directory = Path(workdir).absolute() / subdir
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))
    self._saving: int | None = None  # the step of the save that may still be in flight
    self._failed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Starts saving `state` (unreplicated) and JSON-serialisable `meta` at `step`."""
    json.dumps(meta)  # fail here, with the caller's stack, if meta is not JSON-serialisable
    previous = self._saving
    self._saving = step
    try:
      return self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # an earlier async save's error surfaces here too
      self._failed = True
      if os_reason(e) is None:
        raise  # not the filesystem: a bug, keep its traceback
      raise self._save_error(previous if previous is not None else step, e) from e

  def _save_error(self, step: int, error: BaseException) -> CheckpointSaveError:
    steps = saved_steps(self.directory.parent, self.directory.name)
    resume = (f"it resumes from step {steps[-1]}" if steps
              else "no checkpoint exists yet, so it starts from the beginning")
    return CheckpointSaveError(one_line(
        f"could not save the checkpoint of step {step} in {self.directory}: "
        f"{os_reason(error)}; free space or fix the folder's permissions, then run the same "
        f"command again ({resume})"))

  def restore(self, state_like, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta) at `step` (default: latest) into the structure of `state_like`.

    Raises:
      CheckpointNotFoundError (a FileNotFoundError): no checkpoint, or none at `step`.
      CheckpointMismatchError (a ValueError): the checkpoint's tree does not match
        `state_like` (a different model or method config); the message names the directory.
    """
    step = self._existing(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(one_line(
          f"checkpoint {self.directory / str(step)} does not match this run's model/config "
          f"({type(e).__name__}: {str(e)[:200]}); use a fresh --workdir or the config the "
          "run was started with")) from e
    return out["state"], out["meta"]

  def restore_arrays(self, step: int | None = None) -> dict[str, Any]:
    """The saved state as a plain nested dict of arrays (no target structure needed).

    The arrays land on this process's first device, whatever devices and processes wrote
    them (a checkpoint of a 2-process run reads on one machine).
    """
    step = self._existing(step)
    metadata = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            metadata, is_leaf=lambda m: hasattr(m, "shape"))
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without restoring the state."""
    step = self._existing(step)
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def _existing(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise CheckpointNotFoundError(f"no checkpoint under {self.directory}; train the run "
                                    "first (or check the --workdir)")
    if step is None:
      return max(steps)
    if step not in steps:
      raise CheckpointNotFoundError(
          f"no checkpoint of step {step} under {self.directory}; the saved steps are "
          f"{', '.join(map(str, sorted(steps)))}")
    return step

  def wait(self) -> None:
    """Blocks until the last save is complete; raises CheckpointSaveError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      self._failed = True
      if os_reason(e) is None:
        raise
      raise self._save_error(self._saving if self._saving is not None else -1, e) from e

  def close(self) -> None:
    """Finishes the pending save and closes; after a failed save, closes without waiting.

    Raises CheckpointSaveError when the pending save fails now.
    """
    if self._failed:
      # Closing the manager would wait on the failed save's background threads, which may
      # never finish (and print tracebacks from them): leave them; the error is reported.
      return
    self.wait()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
