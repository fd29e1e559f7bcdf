"""A complete method with a very small model, for the trainer's fault-injection tests.

The trainer's guarantees (finite checkpoints, locking, resume, logs) do not depend on the
method, and this model compiles in about a second where MAUM's takes tens: a strided conv,
BatchNorm (so the state has statistics), a 16-d embedding and an identity classifier, trained
with cross-entropy; `method_state` holds a float counter that `after` updates.

`make(fault, at_step, min_lr)` breaks one step on purpose:
  'nan_grad'  step `at_step` (1-based) gets a term whose value is 0 and whose gradient is NaN
              (sqrt at 0 times 0), so the loss stays finite;
  'inf_state' the method writes inf into its state after step `at_step` (a finite step whose
              result overflows);
only when the run's optim.lr >= min_lr (so a restart with a lower rate runs clean).
"""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from maumjax.methods import api
from maumjax.train import optim
from maumjax.train import state as state_lib


class TinyNet(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3), strides=(2, 2))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    features = nn.Dense(16)(nn.relu(x).mean(axis=(1, 2)))
    return features, nn.Dense(self.num_classes)(features)


def make(fault: str | None = None, at_step: int = 0, min_lr: float = 0.0, *,
         state_floats: int = 0, phases: bool = False) -> types.ModuleType:
  """The method module (register it in `maumjax.methods.METHODS`); `state_floats` adds a
  random array of that size to `method_state` (a large, incompressible checkpoint for the
  failed-save test); `phases` makes epochs >= 1 a second phase, with a `describe_phase`."""
  mod = types.ModuleType("tiny")
  armed_by_lr = [False]

  def init(config, data, *, seed=0):
    armed_by_lr[0] = fault is not None and config["optim"]["lr"] >= min_lr
    model = TinyNet(data.num_classes)
    ballast = ({"ballast": jax.random.normal(jax.random.PRNGKey(1), (state_floats,))}
               if state_floats else {})
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((2, *data.image_shape, 3)),
                           train=False)
    tx = optim.make_optimizer(optim.OptimConfig(**config["optim"]), data.steps_per_epoch,
                              lambda p: jax.tree.map(lambda _: "head", p))
    state = state_lib.TrainState.create(
        params={"model": variables["params"]}, batch_stats=variables["batch_stats"], tx=tx,
        method_state={"count": jnp.zeros((), jnp.float32), **ballast}, seed=seed)
    return api.Setup(model=model, tx=tx, state=state, config=None, data=data)

  def phase(setup, epoch):
    return int(phases and epoch >= 1)

  def describe_phase(setup, phase_):
    return "phase one of the tiny method starts" if phase_ else None

  def step_parts(setup, phase_, ctx):
    model = setup.model

    def hit(state):
      return jnp.logical_and(armed_by_lr[0], state.step == at_step - 1)

    def loss(params, state, batch, rng):
      images = jnp.concatenate([batch["rgb"]["image"], batch["ir"]["image"]])
      labels = jnp.concatenate([batch["rgb"]["label"], batch["ir"]["label"]]).astype(jnp.int32)
      (_, logits), updates = model.apply(
          {"params": params["model"], "batch_stats": state.batch_stats}, images, train=True,
          mutable=["batch_stats"])
      terms = {"ce": optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()}
      if fault == "nan_grad":
        x = jnp.sum(jax.tree.leaves(params)[0]) * 0.0 + jnp.where(hit(state), 0.0, 1.0)
        terms["fault"] = jnp.sqrt(x) - 1.0 + jnp.where(hit(state), 1.0, 0.0)  # always 0
      return terms, updates["batch_stats"]

    def after(state, new_params, finite):
      count = state.method_state["count"] + jnp.where(finite, 1.0, 0.0)
      if fault == "inf_state":
        count = jnp.where(hit(state), jnp.inf, count)
      return new_params, {**state.method_state, "count": count}

    weights = {"ce": 1.0, **({"fault": 1.0} if fault == "nan_grad" else {})}
    return api.StepParts(loss=loss, weights=weights, after=after)

  def embed(setup):
    return jax.jit(lambda variables, images, modality: setup.model.apply(
        variables, images, train=False)[0])

  def variables_of(state):
    return {"params": state.params["model"], "batch_stats": state.batch_stats}

  for fn in (init, phase, step_parts, embed, variables_of, describe_phase):
    setattr(mod, fn.__name__, fn)
  return mod
