"""Data parallelism: one per-device train step, run under jit + shard_map, pmap or plain jit.

A method writes its train step once, for ONE device's shard of the global batch, with
collectives over the named axis `DATA_AXIS` (or none, when `axis_name` is None):

* features that a loss compares across the batch (batch-hard triplets, proxy metrics) are
  all-gathered first (`gather`), so every device computes the same loss as one device would on
  the global batch, and the device's share of it is `loss / device_count`;
* BatchNorm statistics are averaged over devices (`axis_name` on every BatchNorm), which equals
  one BatchNorm over the global batch;
* gradients are summed over devices (`psum`), then the optimiser runs on every device on
  identical inputs, so the replicated state stays identical; state updated after the optimiser
  (memory banks) is computed from replicated values and is identical too.

`compile_step` runs that step in one of three ways that give the same numbers (tests/train):

* 'shard_map' (default): `jax.jit(jax.shard_map(step, in_specs=(P(), P('data')), ...))` over
  a 1-D mesh of the local devices (all devices when multi-host). The step is written in pmap
  semantics (explicit gradient psum), so shard_map runs with `check_vma=False`: with the check
  on, JAX would itself psum the cotangents of replicated inputs and the explicit psum would
  count every gradient `device_count` times (stack.md §3.3, trap 1).
* 'pmap': `jax.pmap(step, axis_name='data')`; the state carries a leading device axis.
* 'none': plain `jax.jit(step)` on one device, with `axis_name=None` (no collectives).

The state argument is donated in every mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MODES = ("shard_map", "pmap", "none")


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"parallel={mode!r}; choose one of {MODES}")
  return mode


def gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  """All-gathers `x` along axis 0 over devices (concatenated in device order)."""
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def psum(tree, axis_name: str | None):
  return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def pmean(tree, axis_name: str | None):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def device_count(mode: str) -> int:
  """Devices a step runs on in `mode` (1 for 'none')."""
  return 1 if check_mode(mode) == "none" else jax.device_count()


def make_mesh(devices=None) -> Mesh:
  """1-D mesh over `devices` (default: all devices of all processes) with axis 'data'.

  `jax.sharding.Mesh` (axis type Auto) is used project-wide rather than `jax.make_mesh`,
  whose default axis type differs (stack.md §3.3, trap 2).
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


class CompiledStep:
  """A compiled train step plus the placement of its inputs for one parallel mode.

  Attributes:
    mode: 'shard_map', 'pmap' or 'none'.
    devices: number of devices the step runs on.
    step: (state, batch) -> (state, metrics), with the state donated.
  """

  def __init__(self, per_device_step: Callable[..., Any], mode: str, mesh: Mesh | None = None):
    self.mode = check_mode(mode)
    if mode == "none":
      self.mesh = None
      self.devices = 1
      self.step = jax.jit(per_device_step, donate_argnums=0)
    elif mode == "pmap":
      self.mesh = None
      self.devices = jax.local_device_count()
      self.step = jax.pmap(per_device_step, axis_name=DATA_AXIS, donate_argnums=0)
    else:
      self.mesh = make_mesh() if mesh is None else mesh
      self.devices = self.mesh.size
      mapped = jax.shard_map(per_device_step, mesh=self.mesh, in_specs=(P(), P(DATA_AXIS)),
                             out_specs=(P(), P()), check_vma=False)
      self.step = jax.jit(mapped, donate_argnums=0)

  def __call__(self, state, batch):
    return self.step(state, batch)

  def put_state(self, state):
    """Places a host/unreplicated state for this mode (copies, so donation is safe)."""
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    if self.mode == "pmap":
      # Stacked over the local devices with the sharding pmap gives its outputs, so the state
      # returned by step 1 is placed like the state passed in and step 2 does not recompile.
      n = jax.local_device_count()
      return jax.device_put(jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), state),
                            self._pmap_sharding())
    if self.mode == "shard_map":
      return jax.device_put(state, NamedSharding(self.mesh, P()))
    return state

  def _pmap_sharding(self) -> NamedSharding:
    """Leading axis split over the local devices: how pmap lays out its outputs."""
    return NamedSharding(make_mesh(jax.local_devices()), P(DATA_AXIS))

  def get_state(self, state):
    """The unreplicated state (inverse of `put_state`)."""
    return jax_utils.unreplicate(state) if self.mode == "pmap" else state

  def put_batch(self, batch):
    """Places one host's batch: split along axis 0 over this mode's devices.

    Raises:
      ValueError: the batch size is not divisible by the device count.
    """
    leaves = jax.tree.leaves(batch)
    size = np.shape(leaves[0])[0] if leaves else 0
    if self.mode != "none" and size % self.devices:
      raise ValueError(f"a batch of {size} pairs cannot be split evenly over {self.devices} "
                       "devices; make P*K (pipeline num_identities x num_instances) divisible "
                       "by the device count")
    if self.mode == "pmap":
      return jax.device_put(
        jax.tree.map(lambda x: np.reshape(x, (self.devices, -1) + np.shape(x)[1:]), batch),
        self._pmap_sharding())
    if self.mode == "shard_map":
      sharding = NamedSharding(self.mesh, P(DATA_AXIS))
      if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(sharding, batch)
      return jax.device_put(batch, sharding)
    return batch

  def get_metrics(self, metrics) -> dict[str, float]:
    """Host floats of a step's metrics (replicated values: device 0's)."""
    if self.mode == "pmap":
      metrics = jax.tree.map(lambda x: x[0], metrics)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}
