"""MAUM: memory-augmented unidirectional metrics (Liu et al., CVPR 2022), and its ablations.

One code path covers every row of the ablation grid (maum.md §9) through `LossConfig`:

| row | switches |
| --- | --- |
| baseline (shared proxy + triplet) | shared_proxy=True, ms_proxy=False, uni=False |
| + MS-Proxies | shared_proxy=False, ms_proxy=True, uni=False |
| + unidirectional | ms_proxy=True, uni=True, memory_size=0 |
| + memory (full MAUM, default) | ms_proxy=True, uni=True, memory_size=8 |
| bidirectional control | uni=True, uni_stop_gradient=False |

Per head group g ('global' and/or 'parts', each with H_g heads of width D_g) the parameters
hold proxies `proxies/<g>/{rgb,ir,shared}` of shape [H_g, C, D_g], and the train state's
`method_state[g]` holds the proxy banks (`maumjax.memory.ProxyBank`, [K, H_g, C, D_g] per
modality). The total loss (maum.md §5.6) is

  L = w_ms L_ms + w_uni [t >= uni_start] (L_{IR->RGB} + L_{RGB->IR}) + w_tri L_tri
      + w_shared L_shared,

summed over head groups. The loss weights are an explicit `{term: weight}` mapping (`loss_weights`).

Two training phases (`phase`): before epoch `uni_start_epoch` only L_ms / L_shared and the
triplet term are computed (no cross-modality terms, no bank reads or writes, one compiled
step); from `uni_start_epoch` on, a second compiled step adds the cross-modality terms, fills
the banks with the current proxies on the phase's first step and writes them after every
optimiser step (every `mem_update_every` steps, counted from the phase start). Every loss sees
the global batch (features all-gathered over devices, `maumjax.train.parallel`).

This module is a method in the sense of `maumjax.methods.api`: `init`, `phase`, `step_parts`,
`embed` and `variables_of`; the shared trainer (`maumjax.train`) runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maumjax import losses
from maumjax import memory as memory_lib
from maumjax import models as models_lib
from maumjax.methods import api
from maumjax.models import reid as reid_lib
from maumjax.train import optim
from maumjax.train import state as state_lib

TRIPLET_ON = ("concat", "per_part", "global")
HEAD_REDUCE = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """MAUM loss switches; defaults from maum.md §11 (tags there).

  Attributes:
    metric: base metric, 'circle' (Circle loss in proxy form) or 'norm_softmax'.
    gamma, margin: Circle loss scale and relaxation margin (64, 0.25).
    scale: norm_softmax scale.
    shared_proxy: the baseline's shared proxies (one classifier for both modalities).
    ms_proxy: modality-specific proxies, each trained on its own modality (L_ms).
    uni: the unidirectional cross-modality terms (L_{IR->RGB} + L_{RGB->IR}).
    uni_stop_gradient: counterpart proxies frozen inside the cross-modality terms; False is
      the bidirectional control row.
    uni_start_epoch: first epoch of the cross-modality terms (and bank initialisation).
    memory_size: K, proxy snapshots per bank (0: plain unidirectional terms).
    mem_mode: 'fifo' (history queue) or 'ema' (one momentum-averaged snapshot, K must be 1).
    mem_update_every: steps between bank writes.
    mem_momentum: EMA momentum for mem_mode='ema'.
    triplet: batch-hard triplet loss on pre-BN features of the joint batch.
    tri_margin: its margin (0.3).
    tri_on: 'concat' (all heads' pre-BN features concatenated), 'per_part' (summed over heads)
      or 'global' (the global head only).
    head_reduce: 'sum' or 'mean' of per-head proxy losses within a group.
    w_ms, w_uni, w_tri, w_shared: loss weights.
    proxy_init_std: proxies start from N(0, std^2) (classifier-row init, maum.md §11 #13).
    proxy_unit_norm: keep the proxies on the unit sphere: L2-normalised at init and after
      every optimiser step (engineering switch, default off). Under the cosine metric a
      proxy's scale does not change the loss, but its gradient scales with 1 / norm, so the
      proxies' effective learning rate falls as their norm grows (from ~1e-3 to ~10 within
      a few dozen steps of the synthetic preset).
    mask_absent_classes: classes without training images of a modality (the modality-imbalance
      study with `imbalance_unit='identities'`) are not used as that modality's references
      (`ref_valid_*` of the losses): their proxies, which no feature of the modality trained,
      neither pull nor push. Engineering default on; with every class present it changes
      nothing.
  """

  metric: str = "circle"
  gamma: float = 64.0
  margin: float = 0.25
  scale: float = 16.0
  shared_proxy: bool = False
  ms_proxy: bool = True
  uni: bool = True
  uni_stop_gradient: bool = True
  uni_start_epoch: int = 10
  memory_size: int = 8
  mem_mode: str = "fifo"
  mem_update_every: int = 1
  mem_momentum: float = 0.9
  triplet: bool = True
  tri_margin: float = 0.3
  tri_on: str = "concat"
  head_reduce: str = "sum"
  w_ms: float = 1.0
  w_uni: float = 1.0
  w_tri: float = 1.0
  w_shared: float = 1.0
  proxy_init_std: float = 0.001
  proxy_unit_norm: bool = False
  mask_absent_classes: bool = True

  def __post_init__(self):
    if self.metric not in losses.METRICS:
      raise ValueError(f"loss.metric={self.metric!r}; choose one of {tuple(losses.METRICS)}")
    if self.tri_on not in TRIPLET_ON:
      raise ValueError(f"loss.tri_on={self.tri_on!r}; choose one of {TRIPLET_ON}")
    if self.head_reduce not in HEAD_REDUCE:
      raise ValueError(f"loss.head_reduce={self.head_reduce!r}; choose one of {HEAD_REDUCE}")
    if self.uni and not self.ms_proxy:
      raise ValueError("loss.uni=True needs loss.ms_proxy=True: the unidirectional terms use "
                       "the modality-specific proxies as references")
    if not (self.shared_proxy or self.ms_proxy or self.triplet):
      raise ValueError("no loss enabled: set loss.shared_proxy, loss.ms_proxy or loss.triplet")
    if self.memory_size < 0 or self.mem_update_every < 1 or self.uni_start_epoch < 0:
      raise ValueError(f"loss.memory_size={self.memory_size} (>= 0), mem_update_every="
                       f"{self.mem_update_every} (>= 1), uni_start_epoch={self.uni_start_epoch} "
                       "(>= 0) out of range")

  @property
  def uses_memory(self) -> bool:
    return self.uni and self.memory_size > 0

  def metric_kwargs(self) -> dict[str, Any]:
    return dict(metric=self.metric, gamma=self.gamma, margin=self.margin, scale=self.scale,
                head_reduce=self.head_reduce)


def _proxy_names(loss: LossConfig) -> tuple[str, ...]:
  names = ("rgb", "ir") if loss.ms_proxy else ()
  return names + (("shared",) if loss.shared_proxy else ())


def _normalize_proxies(proxies):
  return jax.tree.map(losses.l2_normalize, proxies)


def init(config: dict[str, Any], data: api.DataInfo, *, seed: int = 0) -> api.Setup:
  """Builds the model, proxies, banks, optimiser and the initial train state.

  Args:
    config: the run config as a plain dict (sections model, loss, optim).
    data: the training data's facts (classes, image shape, steps per epoch).
    seed: initialisation seed.

  Returns:
    A `Setup` whose `config` is the parsed `LossConfig`.
  """
  loss = LossConfig(**config["loss"])
  model = models_lib.model_from_config(config["model"])
  key_model, key_proxy = jax.random.split(jax.random.PRNGKey(seed))
  dummy = jnp.zeros((2, *data.image_shape, 3), jnp.float32)
  variables, report = api.init_model(model, key_model, (dummy, dummy),
                                     config["model"].get("pretrained", ""))
  dims = reid_lib.head_dims(model, variables, data.image_shape)
  proxies = {}
  for g, (heads, width) in dims.items():
    keys = jax.random.split(jax.random.fold_in(key_proxy, len(proxies)), 3)
    proxies[g] = {name: loss.proxy_init_std
                  * jax.random.normal(k, (heads, data.num_classes, width))
                  for name, k in zip(_proxy_names(loss), keys)}
  if loss.proxy_unit_norm:
    proxies = _normalize_proxies(proxies)
  params = {"model": variables["params"], "proxies": proxies}
  banks = {}
  if loss.uses_memory:
    banks = {g: memory_lib.init_bank(p["rgb"], p["ir"], loss.memory_size, mode=loss.mem_mode)
             for g, p in proxies.items()}
  tx = optim.make_optimizer(optim.OptimConfig(**config["optim"]), data.steps_per_epoch,
                            reid_lib.param_groups)
  state = state_lib.TrainState.create(params=params, batch_stats=variables["batch_stats"],
                                      tx=tx, method_state=banks, seed=seed)
  return api.Setup(model=model, tx=tx, state=state, config=loss, data=data, load_report=report)


def phase(setup: api.Setup, epoch: int) -> int:
  """0 before `uni_start_epoch` (no cross-modality terms), 1 from then on."""
  loss = setup.config
  return int(loss.uni and epoch >= loss.uni_start_epoch)


def describe_phase(setup: api.Setup, phase_: int) -> str | None:
  """What changes when the run enters `phase_` (printed by the trainer)."""
  loss = setup.config
  if phase_ == 0:
    return None
  memory = f" with a {loss.memory_size}-step memory bank" if loss.memory_size else ""
  return (f"the cross-modality terms (unidirectional proxy metrics{memory}) join the loss; "
          "the total loss rises as they start")


def _triplet_feats(out: dict[str, dict[str, jax.Array]], tri_on: str) -> list[jax.Array]:
  if tri_on == "global":
    if "global" not in out:
      raise ValueError("loss.tri_on='global' needs model.head 'global' or 'both'")
    return [out["global"]["pre"][:, 0]]
  if tri_on == "concat":
    return [jnp.concatenate([o["pre"].reshape(o["pre"].shape[0], -1) for o in out.values()],
                            axis=1)]
  return [o["pre"][:, h] for o in out.values() for h in range(o["pre"].shape[1])]


def loss_weights(loss: LossConfig, groups, *, cross_modal: bool) -> dict[str, float]:
  """The explicit `{term: weight}` of every term `compute_losses` returns for these switches."""
  weights = {}
  for g in groups:
    if loss.shared_proxy:
      weights[f"shared_{g}"] = loss.w_shared
    if loss.ms_proxy:
      weights[f"ms_{g}"] = loss.w_ms
    if loss.uni and cross_modal:
      weights[f"ir_to_rgb_{g}"] = loss.w_uni
      weights[f"rgb_to_ir_{g}"] = loss.w_uni
  if loss.triplet:
    weights["triplet"] = loss.w_tri
  return weights


def class_masks(loss: LossConfig, data: api.DataInfo) -> tuple[Any, Any]:
  """(ref_valid_rgb, ref_valid_ir) for the losses: None where every class is present."""
  if not loss.mask_absent_classes:
    return None, None
  return tuple(None if np.all(m) else jnp.asarray(m, bool)
               for m in (data.classes_rgb, data.classes_ir))


def compute_losses(out, labels_rgb, labels_ir, proxies, memory, loss: LossConfig, *,
                   cross_modal: bool = True, ref_valid_rgb: jax.Array | None = None,
                   ref_valid_ir: jax.Array | None = None) -> dict[str, jax.Array]:
  """Every enabled MAUM term on one (global) batch of head outputs, unweighted.

  Args:
    out: model outputs {group: {'pre': [N, H, D], 'bn': [N, H, D]}} for the batch
      [rgb; ir] with N = 2B (the first B rows visible).
    labels_rgb, labels_ir: [B] int labels.
    proxies: {group: {'rgb'|'ir'|'shared': [H, C, D]}}.
    memory: {group: ProxyBank} or {} (no banks).
    loss: loss switches.
    cross_modal: compute the unidirectional terms (phase 1); False skips them entirely.
    ref_valid_rgb, ref_valid_ir: optional [C] bool masks of the classes usable as visible /
      infrared references (`class_masks`).

  Returns:
    {name: value} with every enabled term; weight them with `loss_weights`.
  """
  b = labels_rgb.shape[0]
  kw = loss.metric_kwargs()
  terms = {}
  for g, o in out.items():
    feats_rgb, feats_ir = o["bn"][:b], o["bn"][b:]
    p = proxies[g]
    if loss.shared_proxy:
      both = _either(ref_valid_rgb, ref_valid_ir)
      terms[f"shared_{g}"] = losses.shared_proxy_loss(feats_rgb, labels_rgb, feats_ir, labels_ir,
                                                      p["shared"], ref_valid=both, **kw)
    if loss.ms_proxy:
      terms[f"ms_{g}"] = losses.ms_proxy_loss(feats_rgb, labels_rgb, feats_ir, labels_ir,
                                              p["rgb"], p["ir"], ref_valid_rgb=ref_valid_rgb,
                                              ref_valid_ir=ref_valid_ir, **kw)
    if loss.uni and cross_modal:
      bank = memory.get(g)
      uni = losses.unidirectional_loss(
          feats_rgb, labels_rgb, feats_ir, labels_ir, p["rgb"], p["ir"],
          None if bank is None else bank.rgb, None if bank is None else bank.ir,
          stop_gradient=loss.uni_stop_gradient, ref_valid_rgb=ref_valid_rgb,
          ref_valid_ir=ref_valid_ir, **kw)
      terms[f"ir_to_rgb_{g}"] = uni["ir_to_rgb"]
      terms[f"rgb_to_ir_{g}"] = uni["rgb_to_ir"]
  if loss.triplet:
    labels = jnp.concatenate([labels_rgb, labels_ir])
    terms["triplet"] = sum(losses.batch_hard_triplet(f, labels, margin=loss.tri_margin)
                           for f in _triplet_feats(out, loss.tri_on))
  return terms


def _either(a, b):
  """Classes present in either modality; None (every class) when either mask is None."""
  if a is None or b is None:
    return None
  return a | b


def step_parts(setup: api.Setup, phase_: int, ctx: api.StepContext) -> api.StepParts:
  """MAUM's pieces of the train step for phase 0 (no cross-modality terms) or 1.

  Args:
    setup: from `init`.
    phase_: `phase(setup, epoch)` of the steps this will run.
    ctx: the data axis and device count.
  """
  loss = setup.config
  model = setup.model.clone(axis_name=ctx.bn_axis_name)
  cross_modal = bool(phase_)
  start_step = loss.uni_start_epoch * setup.data.steps_per_epoch
  banks = cross_modal and loss.uses_memory
  ref_valid_rgb, ref_valid_ir = class_masks(loss, setup.data)

  def loss_fn(params, state: state_lib.TrainState, batch, rng):
    del rng  # MAUM draws no random numbers in the step
    labels_rgb = ctx.gather(batch["rgb"]["label"].astype(jnp.int32))
    labels_ir = ctx.gather(batch["ir"]["label"].astype(jnp.int32))
    out, updates = model.apply({"params": params["model"], "batch_stats": state.batch_stats},
                               batch["rgb"]["image"], batch["ir"]["image"], train=True,
                               mutable=["batch_stats"])
    b = batch["rgb"]["image"].shape[0]
    out = {g: {k: jnp.concatenate([ctx.gather(v[:b]), ctx.gather(v[b:])])
               for k, v in o.items()} for g, o in out.items()}
    terms = compute_losses(out, labels_rgb, labels_ir, params["proxies"],
                           state.method_state if banks else {}, loss, cross_modal=cross_modal,
                           ref_valid_rgb=ref_valid_rgb, ref_valid_ir=ref_valid_ir)
    return terms, updates["batch_stats"]

  def fill(state: state_lib.TrainState):
    """On the phase's first step, every bank slot becomes the current proxies."""

    def refill(method_state):
      return {g: memory_lib.fill_bank(m, state.params["proxies"][g]["rgb"],
                                      state.params["proxies"][g]["ir"])
              for g, m in method_state.items()}

    # A cond, not a select: the fill runs on one step of the run, not on every step.
    return jax.lax.cond(state.step == start_step, refill, lambda m: m, state.method_state)

  def after(state: state_lib.TrainState, params, finite: jax.Array):
    if loss.proxy_unit_norm:
      params = dict(params, proxies=_normalize_proxies(params["proxies"]))
    method_state = state.method_state
    if banks:  # written from the updated proxies; the write interval counts from the phase start
      # A step that will not be applied writes nothing.
      method_state = {g: memory_lib.update_bank(
          m, params["proxies"][g]["rgb"], params["proxies"][g]["ir"],
          step=state.step - start_step, mode=loss.mem_mode, every=loss.mem_update_every,
          momentum=loss.mem_momentum, enabled=finite) for g, m in method_state.items()}
    return params, method_state

  groups = tuple(setup.state.params["proxies"])
  return api.StepParts(
      loss=loss_fn, weights=loss_weights(loss, groups, cross_modal=cross_modal),
      before=fill if banks else None,
      after=after if (banks or loss.proxy_unit_norm) else None)


def embed(setup: api.Setup):
  """Jitted `(variables, images [B,H,W,3] float32, modality [B]) -> features [B, D]`."""
  return api.model_embed(setup.model, reid_lib.ReidNet.embed)


def variables_of(state: state_lib.TrainState) -> dict[str, Any]:
  """The model's inference variables from a train state."""
  return api.model_variables(state)
