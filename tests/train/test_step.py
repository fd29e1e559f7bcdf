"""The shared step skeleton (`maumjax.train.step`) on a two-parameter problem worked by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maumjax.data import pipeline as pipeline_lib
from maumjax.methods import api
from maumjax.train import step as step_lib
from maumjax.train.state import TrainState

HOST = pipeline_lib.PipelineConfig(augment_on="host")


def _state(w=(1.0, 2.0)):
  tx = optax.sgd(0.1)
  params = {"w": jnp.asarray(w, jnp.float32)}
  return tx, TrainState.create(params=params, batch_stats={}, tx=tx,
                               method_state={"seen": jnp.zeros((), jnp.float32)})


def _batch(x=(3.0, 4.0), scale=1.0):
  return {"rgb": {"image": jnp.asarray(x, jnp.float32), "label": jnp.zeros(2, jnp.int32)},
          "ir": {"image": jnp.asarray(scale, jnp.float32), "label": jnp.zeros(2, jnp.int32)}}


def _parts(log):
  """loss terms a = sum(w * x) * scale and b = sum(w^2); before/after record what they see."""

  def loss(params, state, batch, rng):
    log.append(("loss_sees", state.method_state["seen"]))
    w, x, scale = params["w"], batch["rgb"]["image"], batch["ir"]["image"]
    return {"a": jnp.sum(w * x) * scale, "b": jnp.sum(w * w)}, state.batch_stats

  def before(state):
    return {"seen": state.method_state["seen"] + 1.0}

  def after(state, new_params, finite):
    # The written state is the updated parameters' sum (MAUM writes its banks like this),
    # skipped on a step that will not be applied.
    seen = state.method_state["seen"]
    return new_params, {"seen": jnp.where(finite, seen + jnp.sum(new_params["w"]), seen)}

  return api.StepParts(loss=loss, weights={"a": 2.0, "b": 0.5}, before=before, after=after)


def test_one_step_by_hand():
  # L = 2 * (w.x) + 0.5 * |w|^2 with w = (1, 2), x = (3, 4): 2 * 11 + 0.5 * 5 = 24.5.
  # dL/dw = 2x + w = (7, 10); SGD lr 0.1: w' = (1 - 0.7, 2 - 1.0) = (0.3, 1.0).
  # before: seen 0 -> 1 (the loss sees 1); after: seen = 1 + 0.3 + 1.0 = 2.3.
  tx, state = _state()
  log = []
  step = step_lib.make_train_step(_parts(log), tx=tx, pipeline=HOST, ctx=api.StepContext())
  new, metrics = step(state, _batch())
  np.testing.assert_allclose(np.asarray(new.params["w"]), [0.3, 1.0], rtol=1e-6)
  np.testing.assert_allclose(float(new.method_state["seen"]), 2.3, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["loss"]), 24.5, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["a"]), 11.0, rtol=1e-6)  # terms logged unweighted
  np.testing.assert_allclose(float(metrics["grad_norm"]), np.hypot(7.0, 10.0), rtol=1e-6)
  assert float(metrics["finite"]) == 1.0 and int(new.step) == 1
  assert float(log[0][1]) == 1.0


def test_a_non_finite_step_is_not_applied():
  """A NaN loss, and a finite loss with non-finite gradients, leave the state as it was."""
  tx, state = _state()

  def loss(params, state, batch, rng):
    # sqrt(|w - x|): finite (0) at w = x, its gradient there is not.
    return {"a": jnp.sum(jnp.sqrt(jnp.abs(params["w"] - batch["rgb"]["image"])))}, {}

  parts = api.StepParts(loss=loss, weights={"a": 1.0})
  step = jax.jit(step_lib.make_train_step(parts, tx=tx, pipeline=HOST, ctx=api.StepContext()))
  for what, x in {"nan loss": (np.nan, 1.0), "nan gradient": (1.0, 2.0)}.items():
    new, metrics = step(state, _batch(x=x))
    assert float(metrics["finite"]) == 0.0, what
    assert not np.isfinite(float(metrics["grad_norm"])), what
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)
  _, metrics = step(state, _batch(x=(1.0, 2.0)))
  assert float(metrics["loss"]) == 0.0  # the loss itself was finite
  good, metrics = step(state, _batch(x=(0.0, 0.0)))
  assert float(metrics["finite"]) == 1.0 and int(good.step) == 1
  # With hooks: `after` is told to skip its write; what `before` computed from the last good
  # state stands (MAUM's bank fill), the parameters and step do not move.
  hooked = jax.jit(step_lib.make_train_step(_parts([]), tx=tx, pipeline=HOST,
                                            ctx=api.StepContext()))
  new, metrics = hooked(state, _batch(x=(np.nan, 1.0)))
  assert float(metrics["finite"]) == 0.0 and int(new.step) == 0
  assert float(new.method_state["seen"]) == 1.0
  np.testing.assert_array_equal(np.asarray(new.params["w"]), [1.0, 2.0])


def test_weighted_total_needs_every_weight():
  np.testing.assert_allclose(float(step_lib.weighted_total(
      {"a": jnp.asarray(2.0), "b": jnp.asarray(3.0)}, {"a": 0.5, "b": 2.0})), 7.0)
  try:
    step_lib.weighted_total({"a": jnp.ones(()), "extra": jnp.ones(())}, {"a": 1.0})
  except KeyError as e:
    assert "['extra'] have no weight" in str(e)
  else:
    raise AssertionError("a term without a weight was accepted")
