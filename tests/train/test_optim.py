"""Optimiser recipe: the AGW schedule, parameter groups, and SGD semantics vs a hand loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maumjax.train import optim


def _agw_lr(epoch, lr=0.1):
  """protocol.md §5.4, written out as the reference's if/elif chain."""
  if epoch < 10:
    return lr * (epoch + 1) / 10
  if epoch < 20:
    return lr
  if epoch < 50:
    return lr * 0.1
  return lr * 0.01


def test_schedule_matches_agw_per_epoch():
  cfg = optim.OptimConfig()
  fn = optim.schedule(0.1, 7, cfg)
  for epoch in range(81):
    for step in (epoch * 7, epoch * 7 + 6):
      np.testing.assert_allclose(float(fn(step)), _agw_lr(epoch), rtol=1e-6)


def test_learning_rates_report_both_groups():
  rates = optim.learning_rates(optim.OptimConfig(), steps_per_epoch=5, step=5 * 30)
  np.testing.assert_allclose(rates["lr_head"], 0.01, rtol=1e-6)
  np.testing.assert_allclose(rates["lr_backbone"], 0.001, rtol=1e-6)


def test_sgd_nesterov_with_weight_decay_equals_torch_update_rule():
  """Two groups, three steps, against torch.optim.SGD's documented update written by hand."""
  cfg = optim.OptimConfig(warmup_epochs=0, decay_epochs=())
  params = {"model": {"w": jnp.array([1.0, -2.0])}, "head": {"w": jnp.array([0.5])}}

  def groups(_):
    return {"model": {"w": "backbone"}, "head": {"w": "head"}}

  tx = optim.make_optimizer(cfg, steps_per_epoch=10, groups=groups)
  state = tx.init(params)
  ref = {k: (np.array(v["w"]), np.zeros_like(v["w"])) for k, v in params.items()}
  lrs = {"model": 0.01, "head": 0.1}
  for t in range(3):
    grads = jax.tree.map(lambda x: (t + 1.0) * x ** 2, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for k, (p, buf) in ref.items():
      g = (t + 1.0) * p ** 2 + 5e-4 * p  # weight decay added to the gradient
      buf = g if t == 0 else 0.9 * buf + g  # torch: first step buf = g
      p = p - lrs[k] * (g + 0.9 * buf)  # Nesterov
      ref[k] = (p, buf)
  for k, (p, _) in ref.items():
    np.testing.assert_allclose(np.asarray(params[k]["w"]), p, rtol=1e-5)


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match="choose one of"):
    optim.OptimConfig(name="lamb")
  with pytest.raises(ValueError, match="decay_epochs"):
    optim.OptimConfig(decay_epochs=(50, 20))
