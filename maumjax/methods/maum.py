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
`memory[g]` holds the proxy banks (`maumjax.memory.ProxyBank`, [K, H_g, C, D_g] per
modality). The total loss (maum.md §5.6) is

  L = w_ms L_ms + w_uni [t >= uni_start] (L_{IR->RGB} + L_{RGB->IR}) + w_tri L_tri
      + w_shared L_shared,

summed over head groups. The banks are filled with the current proxies on the first step of
epoch `uni_start_epoch` and updated after every optimiser step (or every `mem_update_every`).
Every loss sees the global batch (features all-gathered over devices), see
`maumjax.train.parallel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from maumjax import losses
from maumjax import memory as memory_lib
from maumjax.data import pipeline as pipeline_lib
from maumjax.models import reid as reid_lib
from maumjax.train import optim
from maumjax.train import parallel
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


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `init` builds: the model, the optimiser and the initial (host) train state."""

  model: reid_lib.ReidNet
  tx: optax.GradientTransformation
  state: state_lib.TrainState
  loss: LossConfig
  num_classes: int
  load_report: Any = None


def model_from_config(model_cfg: dict[str, Any]) -> reid_lib.ReidNet:
  """A `ReidNet` from the config's `model` section (non-model keys removed)."""
  kwargs = {k: v for k, v in model_cfg.items() if k not in ("pretrained", "sync_bn")}
  kwargs["dtype"] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[kwargs.get("dtype",
                                                                                  "float32")]
  return reid_lib.ReidNet(**kwargs)


def head_dims(model: reid_lib.ReidNet, variables,
              image_shape: tuple[int, int]) -> dict[str, tuple[int, int]]:
  """(heads, width) per head group, read from a forward pass's shapes."""
  shape = (1, *image_shape, 3)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), jnp.zeros(shape),
                                             train=False), variables)
  return {g: (o["bn"].shape[1], o["bn"].shape[2]) for g, o in out.items()}


def param_groups(params) -> Any:
  """'backbone' for the ResNet stages (both stems and the shared trunk), 'head' otherwise."""
  backbone = {"rgb", "ir", "shared"}

  def label(path, _):
    keys = [getattr(p, "key", None) for p in path]
    return "backbone" if keys[:1] == ["model"] and keys[1] in backbone else "head"

  return jax.tree_util.tree_map_with_path(label, params)


def _proxy_names(loss: LossConfig) -> tuple[str, ...]:
  names = ("rgb", "ir") if loss.ms_proxy else ()
  return names + (("shared",) if loss.shared_proxy else ())


def init(config: dict[str, Any], *, num_classes: int, image_shape: tuple[int, int],
         steps_per_epoch: int, seed: int = 0) -> Setup:
  """Builds the model, proxies, banks, optimiser and the initial train state.

  Args:
    config: the run config as a plain dict (sections model, loss, optim).
    num_classes: training identities C.
    image_shape: (height, width) of training images.
    steps_per_epoch: for the per-epoch lr schedule.
    seed: initialisation seed.
  """
  loss = LossConfig(**config["loss"])
  model = model_from_config(config["model"])
  key_model, key_proxy = jax.random.split(jax.random.PRNGKey(seed))
  dummy = jnp.zeros((2, *image_shape, 3), jnp.float32)
  variables = jax.jit(lambda k: model.init(k, dummy, dummy, train=False))(key_model)
  report = None
  if config["model"].get("pretrained"):
    from maumjax.models import weights

    variables, report = weights.load_backbone(variables, config["model"]["pretrained"],
                                              model=model)
  dims = head_dims(model, variables, image_shape)
  proxies = {}
  for g, (heads, width) in dims.items():
    keys = jax.random.split(jax.random.fold_in(key_proxy, len(proxies)), 3)
    proxies[g] = {name: loss.proxy_init_std * jax.random.normal(k, (heads, num_classes, width))
                  for name, k in zip(_proxy_names(loss), keys)}
  params = {"model": variables["params"], "proxies": proxies}
  memory = {}
  if loss.uses_memory:
    memory = {g: memory_lib.init_bank(p["rgb"], p["ir"], loss.memory_size, mode=loss.mem_mode)
              for g, p in proxies.items()}
  tx = optim.make_optimizer(optim.OptimConfig(**config["optim"]), steps_per_epoch, param_groups)
  state = state_lib.TrainState.create(params=params, batch_stats=variables["batch_stats"],
                                      tx=tx, memory=memory, seed=seed)
  return Setup(model, tx, state, loss, num_classes, report)


def _triplet_feats(out: dict[str, dict[str, jax.Array]], tri_on: str) -> list[jax.Array]:
  if tri_on == "global":
    if "global" not in out:
      raise ValueError("loss.tri_on='global' needs model.head 'global' or 'both'")
    return [out["global"]["pre"][:, 0]]
  if tri_on == "concat":
    return [jnp.concatenate([o["pre"].reshape(o["pre"].shape[0], -1) for o in out.values()],
                            axis=1)]
  return [o["pre"][:, h] for o in out.values() for h in range(o["pre"].shape[1])]


def compute_losses(out, labels_rgb, labels_ir, proxies, memory, loss: LossConfig,
                   uni_weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """All MAUM terms on one (global) batch of head outputs.

  Args:
    out: model outputs {group: {'pre': [N, H, D], 'bn': [N, H, D]}} for the batch
      [rgb; ir] with N = 2B (the first B rows visible).
    labels_rgb, labels_ir: [B] int labels.
    proxies: {group: {'rgb'|'ir'|'shared': [H, C, D]}}.
    memory: {group: ProxyBank} or {} (no banks).
    loss: loss switches.
    uni_weight: 0 before the cross-modality phase, `w_uni` after (traced).

  Returns:
    (total, {name: value}) with every enabled term.
  """
  b = labels_rgb.shape[0]
  kw = loss.metric_kwargs()
  terms = {}
  for g, o in out.items():
    feats_rgb, feats_ir = o["bn"][:b], o["bn"][b:]
    p = proxies[g]
    if loss.shared_proxy:
      terms[f"shared_{g}"] = losses.shared_proxy_loss(feats_rgb, labels_rgb, feats_ir, labels_ir,
                                                      p["shared"], **kw)
    if loss.ms_proxy:
      terms[f"ms_{g}"] = losses.ms_proxy_loss(feats_rgb, labels_rgb, feats_ir, labels_ir,
                                              p["rgb"], p["ir"], **kw)
    if loss.uni:
      bank = memory.get(g)
      uni = losses.unidirectional_loss(
          feats_rgb, labels_rgb, feats_ir, labels_ir, p["rgb"], p["ir"],
          None if bank is None else bank.rgb, None if bank is None else bank.ir,
          stop_gradient=loss.uni_stop_gradient, **kw)
      terms[f"ir_to_rgb_{g}"] = uni["ir_to_rgb"]
      terms[f"rgb_to_ir_{g}"] = uni["rgb_to_ir"]
  total = jnp.zeros((), jnp.float32)
  for name, value in terms.items():
    if name.startswith("shared_"):
      total += loss.w_shared * value
    elif name.startswith("ms_"):
      total += loss.w_ms * value
    else:
      total += uni_weight * value
  if loss.triplet:
    labels = jnp.concatenate([labels_rgb, labels_ir])
    tri = sum(losses.batch_hard_triplet(f, labels, margin=loss.tri_margin)
              for f in _triplet_feats(out, loss.tri_on))
    terms["triplet"] = tri
    total += loss.w_tri * tri
  terms["loss"] = total
  return total, terms


def make_train_step(setup: Setup, *, steps_per_epoch: int, pipeline: pipeline_lib.PipelineConfig,
                    axis_name: str | None, devices: int, sync_bn: bool = True):
  """The per-device train step `(state, batch) -> (state, metrics)` (see parallel.py).

  Args:
    setup: from `init`.
    steps_per_epoch: to derive the epoch (phase and bank initialisation) from `state.step`.
    pipeline: the pipeline config, for `device_augment`.
    axis_name: the data axis of the collectives, or None on a single device.
    devices: number of devices sharing the global batch.
    sync_bn: average BatchNorm statistics over devices (one BN over the global batch, as the
      single-GPU references); False keeps per-device batch statistics and averages only the
      running statistics after the step.
  """
  loss = setup.loss
  model = setup.model.clone(axis_name=axis_name if sync_bn else None)
  tx = setup.tx
  start_step = loss.uni_start_epoch * steps_per_epoch

  def step(state: state_lib.TrainState, batch):
    batch = pipeline_lib.device_augment(batch, pipeline)
    labels_rgb = parallel.gather(batch["rgb"]["label"].astype(jnp.int32), axis_name)
    labels_ir = parallel.gather(batch["ir"]["label"].astype(jnp.int32), axis_name)
    memory = state.memory
    if loss.uses_memory:  # fill the banks with the current proxies when phase 2 starts
      def fill(banks):
        return {g: memory_lib.fill_bank(m, state.params["proxies"][g]["rgb"],
                                        state.params["proxies"][g]["ir"])
                for g, m in banks.items()}

      # A cond, not a select: the fill runs on one step of the run, not on every step.
      memory = jax.lax.cond(state.step == start_step, fill, lambda banks: banks, memory)
    uni_weight = jnp.where(state.step >= start_step, loss.w_uni, 0.0)

    def loss_fn(params):
      out, updates = model.apply({"params": params["model"], "batch_stats": state.batch_stats},
                                 batch["rgb"]["image"], batch["ir"]["image"], train=True,
                                 mutable=["batch_stats"])
      b = batch["rgb"]["image"].shape[0]
      out = {g: {k: jnp.concatenate([parallel.gather(v[:b], axis_name),
                                     parallel.gather(v[b:], axis_name)]) for k, v in o.items()}
             for g, o in out.items()}
      total, terms = compute_losses(out, labels_rgb, labels_ir, params["proxies"], memory, loss,
                                    uni_weight)
      # Every device computes the same global loss; its share makes the psum of the
      # gradients the gradient of the global loss (parallel.py).
      return total / devices, (terms, updates["batch_stats"])

    grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = parallel.psum(grads, axis_name)
    if not sync_bn:
      batch_stats = parallel.pmean(batch_stats, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if loss.uses_memory:
      memory = {g: memory_lib.update_bank(
          m, params["proxies"][g]["rgb"], params["proxies"][g]["ir"], step=state.step,
          mode=loss.mem_mode, every=loss.mem_update_every, momentum=loss.mem_momentum)
          for g, m in memory.items()}
    new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state, memory=memory)
    finite = jnp.isfinite(terms["loss"])
    new = state_lib.keep_if_finite(finite, new, state)
    metrics = dict(terms, finite=finite.astype(jnp.float32),
                   grad_norm=optax.tree.norm(grads))
    return new, metrics

  return step


def make_embed(setup: Setup):
  """Jitted `(variables, images [B,H,W,3] float32, modality [B]) -> features [B, D]`."""
  model = setup.model

  @jax.jit
  def embed(variables, images, modality):
    return model.apply(variables, images, modality, method=reid_lib.ReidNet.embed)

  return embed


def variables_of(state: state_lib.TrainState) -> dict[str, Any]:
  """The model's inference variables from a train state."""
  return {"params": state.params["model"], "batch_stats": state.batch_stats}
