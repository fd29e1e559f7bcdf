"""The train step every method shares: a method's `StepParts` inside one per-device skeleton.

    step = make_train_step(parts, tx=tx, pipeline=pipe_cfg, ctx=ctx)
    state, metrics = step(state, batch)        # under jit, jit + shard_map or pmap

For ONE device's shard of the global batch, in pmap semantics (`maumjax.train.parallel`):

1. on-device augmentation of the shipped uint8 images (`pipeline.device_augment`);
2. `parts.before(state)`: method state the loss reads (MAUM's bank fill at the phase start);
3. the loss and its gradient: the method's named terms, weighted by the explicit
   `parts.weights`; every device computes the loss of the global batch (the method gathers
   features), so each takes `1 / devices` of it and the gradient psum is the gradient of the
   global loss;
4. the optax update; BatchNorm running statistics averaged over devices when the method keeps
   per-device batch statistics (`ctx.sync_bn=False`);
5. `parts.after(state, new_params)`: method state written from the updated parameters (and
   parameters the method constrains, e.g. proxies kept on the unit sphere);
6. the finite guard: a step whose loss, gradients or new parameters are not finite is not
   applied (the state stays the last good one, under `lax.cond`, so a good step costs no
   select over the state) and `metrics['finite']` is 0, which stops the loop;
7. metrics: every unweighted term, the weighted total 'loss', 'grad_norm' and 'finite'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from maumjax.data import pipeline as pipeline_lib
from maumjax.methods import api
from maumjax.train import parallel
from maumjax.train import state as state_lib


def weighted_total(terms: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
  """sum(weights[k] * terms[k]) over the terms, in float32.

  Raises:
    KeyError: a term has no weight (every term's weight is explicit; none defaults).
  """
  missing = sorted(set(terms) - set(weights))
  if missing:
    raise KeyError(f"loss terms {missing} have no weight; the method's StepParts.weights must "
                   f"list every term it returns (it lists {sorted(weights)})")
  total = jnp.zeros((), jnp.float32)
  for name, value in terms.items():
    total = total + jnp.asarray(weights[name], jnp.float32) * value.astype(jnp.float32)
  return total


def tree_is_finite(tree) -> jax.Array:
  """True when every floating leaf of `tree` is finite (one fused reduction per leaf)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  ok = jnp.asarray(True)
  for x in leaves:
    ok = ok & jnp.all(jnp.isfinite(x))
  return ok


def make_train_step(parts: api.StepParts, *, tx: optax.GradientTransformation,
                    pipeline: pipeline_lib.PipelineConfig, ctx: api.StepContext):
  """The per-device train step `(state, batch) -> (state, metrics)`.

  Args:
    parts: the method's loss, weights and state hooks for one phase.
    tx: the optimiser (the method's `Setup.tx`).
    pipeline: the pipeline config, for `device_augment`.
    ctx: the data axis and device count (the same one the method's parts were built with).
  """

  def loss_fn(params, state, batch, rng):
    terms, batch_stats = parts.loss(params, state, batch, rng)
    total = weighted_total(terms, parts.weights)
    # Every device computes the same global loss; its share makes the psum of the gradients
    # the gradient of the global loss.
    return total / ctx.devices, (total, terms, batch_stats)

  def step(state: state_lib.TrainState, batch: Mapping[str, Any]):
    batch = pipeline_lib.device_augment(batch, pipeline)
    rng = jax.random.fold_in(state.rng, state.step)
    old = state
    if parts.before is not None:
      state = state.replace(method_state=parts.before(state))
    grads, (total, terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params, state, batch, rng)
    grads = parallel.psum(grads, ctx.axis_name)
    if not ctx.sync_bn:
      batch_stats = parallel.pmean(batch_stats, ctx.axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    method_state = state.method_state
    if parts.after is not None:
      params, method_state = parts.after(state, params)
    new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state, method_state=method_state)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm) & tree_is_finite(
        (params, batch_stats, method_state))
    new = jax.lax.cond(finite, lambda: new, lambda: old)
    metrics = dict(terms, loss=total, finite=finite.astype(jnp.float32), grad_norm=grad_norm)
    return new, metrics

  return step


def method_step(method, setup: api.Setup, phase: int, *,
                pipeline: pipeline_lib.PipelineConfig, ctx: api.StepContext):
  """`make_train_step` of a method's `step_parts(setup, phase, ctx)` (what the loop compiles)."""
  return make_train_step(method.step_parts(setup, phase, ctx), tx=setup.tx, pipeline=pipeline,
                         ctx=ctx)
