"""Orbax checkpoints of the whole run: train state, config, data-iterator state, progress.

Layout: `<workdir>/checkpoints/<step>/{state,meta}` written by an Orbax `CheckpointManager`
(async saves, keep-last-N), as decided in stack.md §5:

* `state`: the `TrainState` pytree (parameters, BN statistics, optimiser state, memory banks,
  step, rng), saved with `StandardSave` and restored bit-exactly with the live state's
  shapes, dtypes and shardings;
* `meta`: JSON with the resolved config, the epoch and the Grain iterator state, so a run
  restarted with the same workdir continues with the next batch it would have drawn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores a run's train state and metadata under `<workdir>/checkpoints`.

  Args:
    workdir: the run directory.
    max_to_keep: checkpoints kept (oldest deleted first).
    async_save: save in a background thread (Orbax default); `wait()` blocks until done.
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Starts saving `state` (unreplicated) and JSON-serialisable `meta` at `step`."""
    json.dumps(meta)  # fail here, with the caller's stack, if meta is not JSON-serialisable
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, state_like, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta) at `step` (default: latest) into the structure of `state_like`.

    Raises:
      FileNotFoundError: no checkpoint exists.
      ValueError: the checkpoint's tree does not match `state_like` (a different model or
        method config); the message names the directory.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {self.directory / str(step)} does not match this run's model/config "
          f"({type(e).__name__}: {str(e)[:300]}); use a fresh --workdir or the config the "
          "run was started with") from e
    return out["state"], out["meta"]

  def restore_arrays(self, step: int | None = None) -> dict[str, Any]:
    """The saved state as a plain nested dict of arrays (no target structure needed).

    The arrays land on this process's first device, whatever devices and processes wrote
    them (a checkpoint of a 2-process run reads on one machine).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    metadata = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            metadata, is_leaf=lambda m: hasattr(m, "shape"))
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without restoring the state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
