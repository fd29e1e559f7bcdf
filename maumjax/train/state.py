"""The train state: every array a run needs to continue, as one pytree.

`TrainState` is a `flax.struct` dataclass, so it passes through `jax.jit`, `shard_map` and
`jax.pmap` as a pytree and checkpoints with Orbax as-is (stack.md §4.4, §5).

| field | holds | updated by |
| --- | --- | --- |
| `step` | int32 number of optimiser steps taken | the train step |
| `params` | weights, including the MAUM proxies | the optimiser |
| `batch_stats` | BatchNorm running statistics | `apply(..., mutable=['batch_stats'])` |
| `opt_state` | optax state | the optimiser |
| `memory` | non-optimised method state (MAUM proxy banks) or `{}` | the step, after the update |
| `rng` | a raw uint32[2] key; per-step keys are `fold_in(rng, step)` | never |
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TrainState:
  """Replicated training state (see the module docstring for the fields)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  memory: Any
  rng: jax.Array

  @classmethod
  def create(cls, *, params, batch_stats, tx, memory=None, seed: int = 0) -> TrainState:
    """A fresh state at step 0 with the optimiser state of `tx` for `params`."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), memory={} if memory is None else memory,
               rng=jax.random.PRNGKey(seed))

  def variables(self) -> dict[str, Any]:
    """The model variables ({'params', 'batch_stats'}) for inference."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def num_params(tree) -> int:
  """Number of scalars in a pytree of arrays."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def keep_if_finite(ok: jax.Array, new: TrainState, old: TrainState) -> TrainState:
  """`new` where `ok` is true, else `old` (elementwise select over the whole state).

  The train step uses this so that a non-finite loss never reaches the parameters: the state
  stays the last good one, the host sees the flag and stops (`maumjax.train.loop`).
  """
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
