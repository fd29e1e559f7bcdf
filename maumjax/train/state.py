"""The train state: every array a run needs to continue, as one pytree.

`TrainState` is a `flax.struct` dataclass, so it passes through `jax.jit`, `shard_map` and
`jax.pmap` as a pytree and checkpoints with Orbax as-is (stack.md §4.4, §5).

| field | holds | updated by |
| --- | --- | --- |
| `step` | int32 number of optimiser steps taken | the train step |
| `params` | weights, including the MAUM proxies | the optimiser |
| `batch_stats` | BatchNorm running statistics | `apply(..., mutable=['batch_stats'])` |
| `opt_state` | optax state | the optimiser |
| `method_state` | the method's non-optimised state or `{}` (*) | the method's step hooks |
| `rng` | a raw uint32[2] key; per-step keys are `fold_in(rng, step)` | never |

(*) MAUM's proxy banks, MPANet's mean classifiers, MMM's cluster memories; see
`maumjax/methods/api.py`.
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
  method_state: Any
  rng: jax.Array

  @classmethod
  def create(cls, *, params, batch_stats, tx, method_state=None, seed: int = 0) -> TrainState:
    """A fresh state at step 0 with the optimiser state of `tx` for `params`."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params),
               method_state={} if method_state is None else method_state,
               rng=jax.random.PRNGKey(seed))

  def variables(self) -> dict[str, Any]:
    """The model variables ({'params', 'batch_stats'}) for inference."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def num_params(tree) -> int:
  """Number of scalars in a pytree of arrays."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
