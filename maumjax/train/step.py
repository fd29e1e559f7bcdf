"""The train step every method shares: a method's `StepParts` inside one per-device skeleton.

    step = make_train_step(parts, tx=tx, pipeline=pipe_cfg, ctx=ctx)
    state, metrics = step(state, batch)        # under jit, jit + shard_map or pmap

For ONE device's shard of the global batch, in pmap semantics (`maumjax.train.parallel`):

1. on-device augmentation of the shipped uint8 images (`pipeline.device_augment`; with
   `parts.pixels` the augmented uint8 pixels stay in the batch for the method);
2. `parts.before(state)`: method state the loss reads (MAUM's bank fill at the phase start);
3. the loss and its gradient: the method's named terms, weighted by the explicit
   `parts.weights`; every device computes the loss of the global batch (the method gathers
   features), so each takes `1 / devices` of it and the gradient psum is the gradient of the
   global loss;
4. the optax update; BatchNorm running statistics averaged over devices when the method keeps
   per-device batch statistics (`ctx.sync_bn=False`);
5. `parts.after(state, new_params, finite[, aux])`: method state written from the updated
   parameters (and parameters the method constrains, e.g. proxies kept on the unit sphere), or
   from what the loss computed (`parts.aux`: MMM's memory update from the step's features);
6. the finite guard: a step whose loss, gradients or update are not finite is not applied
   (parameters, statistics, optimiser state and step stay as they were, the method skips its
   writes) and `metrics['finite']` is 0, which stops the loop before anything is saved;
7. metrics: every unweighted term, the weighted total 'loss', 'grad_norm' and 'finite'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import functools

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
    terms, batch_stats, *aux = parts.loss(params, state, batch, rng)
    total = weighted_total(terms, parts.weights)
    # Every device computes the same global loss; its share makes the psum of the gradients
    # the gradient of the global loss.
    aux = jax.lax.stop_gradient(aux[0]) if parts.aux else None
    return total / ctx.devices, (total, terms, batch_stats, aux)

  def step(state: state_lib.TrainState, batch: Mapping[str, Any]):
    batch = pipeline_lib.device_augment(batch, pipeline, keep_pixels=parts.pixels)
    rng = jax.random.fold_in(state.rng, state.step)
    if parts.before is not None:
      state = state.replace(method_state=parts.before(state))
    grads, (total, terms, batch_stats, aux) = jax.grad(loss_fn, has_aux=True)(
        state.params, state, batch, rng)
    grads = parallel.psum(grads, ctx.axis_name)
    if not ctx.sync_bn:
      batch_stats = parallel.pmean(batch_stats, ctx.axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    # The update's norm covers the new parameters: finite parameters plus a finite update stay
    # finite (unless a sum overflows, which the next step's loss would show before a save).
    finite = (jnp.isfinite(total) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(updates)))
    params = optax.apply_updates(state.params, updates)
    method_state = state.method_state
    if parts.after is not None:
      params, method_state = (parts.after(state, params, finite, aux) if parts.aux
                              else parts.after(state, params, finite))
    # A non-finite step is not applied. The selects are elementwise on values the update
    # computes anyway, so XLA fuses them into the update (no extra pass over the state); the
    # method gates its own state writes with `finite` (in place, e.g. one bank slot).
    keep = functools.partial(jax.tree.map, lambda a, b: jnp.where(finite, a, b))
    new = state.replace(step=state.step + finite.astype(state.step.dtype),
                        params=keep(params, state.params),
                        batch_stats=keep(batch_stats, state.batch_stats),
                        opt_state=keep(opt_state, state.opt_state), method_state=method_state)
    metrics = dict(terms, loss=total, finite=finite.astype(jnp.float32), grad_norm=grad_norm)
    return new, metrics

  return step


def method_step(method, setup: api.Setup, phase: int, *,
                pipeline: pipeline_lib.PipelineConfig, ctx: api.StepContext):
  """`make_train_step` of a method's `step_parts(setup, phase, ctx)` (what the loop compiles)."""
  return make_train_step(method.step_parts(setup, phase, ctx), tx=setup.tx, pipeline=pipeline,
                         ctx=ctx)
