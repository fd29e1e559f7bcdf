"""Optimiser recipe: SGD (Nesterov) or Adam, warm-up then step decay, a lower backbone lr.

Default = the AGW recipe (protocol.md §5.4), which the MAUM spec adopts (maum.md §6): SGD with
Nesterov momentum 0.9, weight decay 5e-4 added to the gradient (torch `SGD(weight_decay=...)`
semantics), lr 0.1 for heads and proxies and 0.1 x 0.1 for the backbone, per-epoch schedule
`lr * (e + 1) / 10` for e < 10, then x0.1 at epoch 20 and x0.01 at epoch 50.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
GROUPS = ("backbone", "head")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimiser settings.

  Attributes:
    name: 'sgd' (momentum, optionally Nesterov), 'adam' (weight decay added to the gradient,
      torch `Adam(weight_decay=...)`) or 'adamw' (decoupled weight decay).
    lr: base learning rate of the head group (BN-necks, part reductions, proxies).
    backbone_lr_mult: the backbone group's lr is `lr * backbone_lr_mult` (AGW: 0.1).
    momentum: SGD momentum.
    nesterov: Nesterov momentum for SGD.
    weight_decay: L2 coefficient, applied to every parameter as in the references.
    warmup_epochs: linear warm-up, epoch e < warmup uses `lr * (e + 1) / warmup`.
    decay_epochs: epochs at which the lr is multiplied by `decay_factor` (cumulative).
    decay_factor: see decay_epochs.
    grad_clip: global-norm clipping threshold; 0 disables (the references do not clip).
  """

  name: str = "sgd"
  lr: float = 0.1
  backbone_lr_mult: float = 0.1
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 5e-4
  warmup_epochs: int = 10
  decay_epochs: Sequence[int] = (20, 50)
  decay_factor: float = 0.1
  grad_clip: float = 0.0

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optimizer name={self.name!r}; choose one of {OPTIMIZERS}")
    if self.lr <= 0 or self.backbone_lr_mult < 0 or self.warmup_epochs < 0:
      raise ValueError(f"lr={self.lr} (> 0), backbone_lr_mult={self.backbone_lr_mult} (>= 0), "
                       f"warmup_epochs={self.warmup_epochs} (>= 0) out of range")
    if list(self.decay_epochs) != sorted(self.decay_epochs):
      raise ValueError(f"decay_epochs={tuple(self.decay_epochs)} must be increasing")


def epoch_factor(epoch: jax.Array, config: OptimConfig) -> jax.Array:
  """The lr multiplier of `epoch` (warm-up, then step decay); jittable."""
  epoch = jnp.asarray(epoch, jnp.float32)
  factor = jnp.ones_like(epoch)
  if config.warmup_epochs:
    factor = jnp.where(epoch < config.warmup_epochs, (epoch + 1) / config.warmup_epochs, factor)
  for boundary in config.decay_epochs:
    factor = factor * jnp.where(epoch >= boundary, config.decay_factor, 1.0)
  return factor


def schedule(base_lr: float, steps_per_epoch: int, config: OptimConfig) -> optax.Schedule:
  """Per-step schedule whose value is constant within an epoch (as the references step it)."""
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")

  def fn(step):
    return base_lr * epoch_factor(step // steps_per_epoch, config)

  return fn


def _base(config: OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
  if config.name == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov))
  if config.name == "adam":
    return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(lr))
  return optax.adamw(lr, weight_decay=config.weight_decay)


def make_optimizer(config: OptimConfig, steps_per_epoch: int,
                   groups: Callable[[Any], Any]) -> optax.GradientTransformation:
  """The optax transformation: one base optimiser per parameter group.

  Args:
    config: optimiser settings.
    steps_per_epoch: steps in one epoch, for the per-epoch schedule.
    groups: params -> the same tree with 'backbone' or 'head' at every leaf (the method
      decides which parameters are the backbone).

  Returns:
    An `optax.GradientTransformation` (with clipping first when `grad_clip > 0`).
  """
  head = _base(config, schedule(config.lr, steps_per_epoch, config))
  backbone = _base(config, schedule(config.lr * config.backbone_lr_mult, steps_per_epoch, config))
  tx = optax.multi_transform({"backbone": backbone, "head": head}, groups)
  if config.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  return tx


def learning_rates(config: OptimConfig, steps_per_epoch: int, step: int) -> dict[str, float]:
  """The two groups' learning rates at `step`, for logging."""
  factor = float(epoch_factor(step // steps_per_epoch, config))
  return {"lr_head": config.lr * factor,
          "lr_backbone": config.lr * config.backbone_lr_mult * factor}
