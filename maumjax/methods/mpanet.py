"""MPANet (CVPR 2021, "Discover Cross-Modality Nuances for Visible-Infrared Person
Re-Identification") as a method of the shared trainer. Spec: ../shared/spec/mpanet.md.

Model (`maumjax.models.mpanet.MPANet`): one fully shared ResNet, modality alleviation modules
after stages 3 and 4, pattern alignment (l sigmoid maps, l pattern features + the global one),
a BN-neck with a frozen zero bias, a shared classifier and two modality-specific ones. The two
mean ("teacher") classifiers live in `TrainState.method_state`, outside the trained parameters.

Loss, with the released code's choices as defaults (mpanet.md §4, §9):

    L = w_id L_id + w_cc L_cc + w_sep L_sep + sid_weight L_sid + kl_weight L_kl

* L_id: cross-entropy of the shared classifier on the BN-neck features;
* L_cc: `losses.center_cluster_loss` on the pre-BN features (margin 0.7);
* L_sep: `losses.pattern_separation_loss` of the PAM maps (only with `model.pam`);
* L_sid: CE of the visible classifier on visible rows + CE of the infrared one on infrared
  rows (the paper's L_sid; the code adds it twice, hence `sid_weight` 1.0, paper 0.5);
* L_kl: `losses.mutual_mean_kl` of each row's modality classifier (student) against the
  OTHER modality's mean classifier (teacher, no gradient, features included).

`loss_norm` 'batch_mean' (code) averages L_id and L_kl over the whole batch; 'per_modality_sum'
(paper Eq. 10, 12) adds the two modalities' means. Before every step's loss the mean
classifiers move towards the current students (pre-update parameters):
E <- (1 - a) E + a theta, a = ema_rate x min(100 / (e + 1), 1) with e the 1-based epoch (code;
`ema_schedule='fixed'` keeps a = ema_rate, the paper).

Ablation rows (Table 3/4) are switches: `loss.cc`, `loss.ml` (modality classifiers + mutual
mean learning), `model.pam`, `model.modality_attention`, `model.mam_variant`; see
experiments/configs/mpanet.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from maumjax import losses
from maumjax import models as models_lib
from maumjax.methods import api
from maumjax.models import mpanet as mpanet_model
from maumjax.models import reid as reid_lib
from maumjax.train import optim
from maumjax.train import state as state_lib

LOSS_NORMS = ("batch_mean", "per_modality_sum")
EMA_SCHEDULES = ("code", "fixed")
KL_DIRECTIONS = ("student_teacher", "teacher_student")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """MPANet's loss switches (defaults: the released code; mpanet.md §9).

  Attributes:
    w_id: weight of the shared identity CE. [P/CODE 1]
    cc: center-cluster loss on. [P/CODE]
    cc_margin: its margin rho. [P/CODE 0.7]
    w_cc: its weight. [P/CODE 1]
    w_sep: pattern-separation weight lambda1 (used when the model has PAM). [P/CODE 0.5]
    ml: mutual mean learning on: modality-specific CE and the KL to the mean classifiers.
    sid_weight: weight of the modality-specific CE. [CODE 1.0 effective; P 0.5]
    kl_weight: weight lambda3 of the KL term. [P/CODE 2.5]
    kl_direction: 'student_teacher' (code: KL(student || teacher), gradient through the student
      distribution) or 'teacher_student' (paper Eq. 10).
    loss_norm: 'batch_mean' (code) or 'per_modality_sum' (paper) for L_id and L_kl.
    ema_rate: the mean classifiers' rate alpha. [P/CODE 0.2]
    ema_schedule: 'code' (alpha x min(100 / (e + 1), 1), e 1-based) or 'fixed' (paper).
  """

  w_id: float = 1.0
  cc: bool = True
  cc_margin: float = 0.7
  w_cc: float = 1.0
  w_sep: float = 0.5
  ml: bool = True
  sid_weight: float = 1.0
  kl_weight: float = 2.5
  kl_direction: str = "student_teacher"
  loss_norm: str = "batch_mean"
  ema_rate: float = 0.2
  ema_schedule: str = "code"

  def __post_init__(self):
    for name, value, choices in (("loss_norm", self.loss_norm, LOSS_NORMS),
                                 ("ema_schedule", self.ema_schedule, EMA_SCHEDULES),
                                 ("kl_direction", self.kl_direction, KL_DIRECTIONS)):
      if value not in choices:
        raise ValueError(f"loss.{name}={value!r}; choose one of {choices}")
    if not 0.0 <= self.ema_rate <= 1.0:
      raise ValueError(f"loss.ema_rate={self.ema_rate} must be in [0, 1]")


def ema_rate(loss: LossConfig, epoch: jax.Array) -> jax.Array:
  """The mean classifiers' rate at 0-based `epoch` (jittable)."""
  if loss.ema_schedule == "fixed":
    return jnp.asarray(loss.ema_rate, jnp.float32)
  one_based = jnp.asarray(epoch, jnp.float32) + 1.0
  return loss.ema_rate * jnp.minimum(100.0 / (one_based + 1.0), 1.0)


def _kernel(params: Any, which: str) -> jax.Array:
  return params["model"][mpanet_model.CLASSIFIERS[which]]["kernel"]


def init(config: dict[str, Any], data: api.DataInfo, *, seed: int = 0) -> api.Setup:
  """Builds the model, the mean classifiers, the optimiser and the initial train state."""
  loss = LossConfig(**config["loss"])
  model_cfg = dict(config["model"])
  if model_cfg.get("name", "mpanet") != "mpanet":
    raise ValueError(f"model.name={model_cfg['name']!r}; MPANet trains model.name='mpanet'")
  model_cfg["name"] = "mpanet"
  model = models_lib.model_from_config(model_cfg, num_classes=data.num_classes)
  dummy = jnp.zeros((2, *data.image_shape, 3), jnp.float32)
  variables, report = api.init_model(model, jax.random.PRNGKey(seed), (dummy,),
                                     model_cfg.get("pretrained", ""))
  params = {"model": variables["params"]}
  # The teachers start equal to the students (mpanet.md §3.4) and are never trained.
  means = ({"visible": _kernel(params, "visible"), "infrared": _kernel(params, "infrared")}
           if loss.ml else {})
  tx = optim.make_optimizer(optim.OptimConfig(**config["optim"]), data.steps_per_epoch,
                            reid_lib.param_groups)
  state = state_lib.TrainState.create(params=params, batch_stats=variables["batch_stats"],
                                      tx=tx, method_state=means, seed=seed)
  return api.Setup(model=model, tx=tx, state=state, config=loss, data=data, load_report=report)


def phase(setup: api.Setup, epoch: int) -> int:
  """MPANet trains one phase."""
  return 0


def loss_weights(loss: LossConfig, *, pam: bool) -> dict[str, float]:
  """{term: weight} of the enabled terms."""
  weights = {"id": loss.w_id}
  if loss.cc:
    weights["cc"] = loss.w_cc
  if pam:
    weights["sep"] = loss.w_sep
  if loss.ml:
    weights.update(sid=loss.sid_weight, kl=loss.kl_weight)
  return weights


def compute_losses(out: dict[str, Any], labels: jax.Array, means: dict[str, jax.Array],
                   loss: LossConfig, *, num_rgb: int) -> dict[str, jax.Array]:
  """Every enabled MPANet term on one (global) batch, unweighted.

  Args:
    out: the model's outputs for the batch [rgb; ir] (`MPANet.__call__`), rows 0..num_rgb-1
      visible.
    labels: [N] int labels of the rows.
    means: {'visible', 'infrared'}: the mean classifiers' kernels [D, C] ({} without ml).
    loss: switches.
    num_rgb: number of visible rows.
  """
  n = num_rgb
  ce = losses.softmax_cross_entropy
  per_modality = loss.loss_norm == "per_modality_sum"

  def split_mean(values):  # [N] -> scalar, by loss_norm
    if per_modality:
      return jnp.mean(values[:n]) + jnp.mean(values[n:])
    return jnp.mean(values)

  terms = {"id": split_mean(ce(out["logits"], labels))}
  if loss.cc:
    terms["cc"] = losses.center_cluster_loss(out["feat"], labels, margin=loss.cc_margin)
  if out.get("maps") is not None:
    terms["sep"] = losses.pattern_separation_loss(out["maps"])
  if loss.ml:
    student_rgb, student_ir = out["logits_v"][:n], out["logits_r"][n:]
    terms["sid"] = jnp.mean(ce(student_rgb, labels[:n])) + jnp.mean(ce(student_ir, labels[n:]))
    bn = jax.lax.stop_gradient(out["bn"]).astype(jnp.float32)
    # Cross-modal teachers: visible rows learn from the infrared mean classifier, and back.
    teacher_rgb = bn[:n] @ means["infrared"].astype(jnp.float32)
    teacher_ir = bn[n:] @ means["visible"].astype(jnp.float32)
    kl = lambda s, t: losses.mutual_mean_kl(s, t, direction=loss.kl_direction)  # noqa: E731
    if per_modality:
      terms["kl"] = kl(student_rgb, teacher_rgb) + kl(student_ir, teacher_ir)
    else:
      terms["kl"] = kl(jnp.concatenate([student_rgb, student_ir]),
                       jnp.concatenate([teacher_rgb, teacher_ir]))
  return terms


def step_parts(setup: api.Setup, phase_: int, ctx: api.StepContext) -> api.StepParts:
  """MPANet's pieces of the train step."""
  del phase_
  loss = setup.config
  model = setup.model.clone(axis_name=ctx.bn_axis_name)
  steps_per_epoch = setup.data.steps_per_epoch

  def loss_fn(params, state: state_lib.TrainState, batch, rng):
    del rng  # no randomness in the step (augmentation parameters come with the batch)
    b = batch["rgb"]["image"].shape[0]
    images = jnp.concatenate([batch["rgb"]["image"], batch["ir"]["image"]])
    out, updates = model.apply({"params": params["model"], "batch_stats": state.batch_stats},
                               images, train=True, mutable=["batch_stats"])
    # The global batch as [all visible rows; all infrared rows].
    out = {k: None if v is None else jnp.concatenate([ctx.gather(v[:b]), ctx.gather(v[b:])])
           for k, v in out.items()}
    labels = jnp.concatenate([ctx.gather(batch["rgb"]["label"]),
                              ctx.gather(batch["ir"]["label"])]).astype(jnp.int32)
    terms = compute_losses(out, labels, state.method_state, loss,
                           num_rgb=labels.shape[0] // 2)
    return terms, updates["batch_stats"]

  def update_means(state: state_lib.TrainState):
    """The EMA step of the mean classifiers, from the students before this step's update."""
    rate = ema_rate(loss, state.step // steps_per_epoch)
    return {which: (1.0 - rate) * mean + rate * _kernel(state.params, which)
            for which, mean in state.method_state.items()}

  return api.StepParts(loss=loss_fn, weights=loss_weights(loss, pam=setup.model.pam),
                       before=update_means if loss.ml else None)


def embed(setup: api.Setup):
  """Jitted `(variables, images [B,H,W,3] float32, modality [B]) -> BN-neck features [B, D]`."""
  return api.model_embed(setup.model, mpanet_model.MPANet.embed)


def variables_of(state: state_lib.TrainState) -> dict[str, Any]:
  """The model's inference variables from a train state."""
  return api.model_variables(state)
