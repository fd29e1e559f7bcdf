"""MMM (ECCV 2024, "Multi-Memory Matching for Unsupervised Visible-Infrared Person
Re-Identification") as a method of the shared trainer. Spec: ../shared/spec/mmm.md.

Unsupervised: training never reads the identity labels. The released code's offline pipeline
(mmm.md §1, the default `pipeline='code_offline'`) is three trainer runs and one host step, which
`experiments/mmm.py` chains in one workdir (`mmm.stage` selects the run):

  stage1  per-modality ClusterNCE (§5): every epoch the whole training set's flip-averaged
          features are re-clustered per modality (k-reciprocal Jaccard + DBSCAN,
          `maumjax.cluster`), the memories are rebuilt from the cluster means and the labels of
          the epoch are the cluster ids (outliers sit the epoch out). Loss: ClusterNCE of both
          visible views against the visible memory + ClusterNCE of the infrared images against
          the infrared memory; after the optimiser step each memory row moves towards the
          step's features, sample by sample in batch order (`memory.update_cluster_memory`).
  stage2  from stage 1's final parameters, the same plus the joint cross-modality clustering
          (CMC): each epoch also clusters both modalities together (the modality-aware
          Jaccard) into a joint memory. An iteration is two optimiser steps, as in the code: a
          per-modality step (stage 1's loss) and a joint step (both modalities against the
          joint memory, on batches from the clusters that hold both modalities). The trainer
          runs them as consecutive steps: the labels are two columns (per-modality, joint),
          the 'cluster' sampler draws even steps from column 0 and odd steps from column 1, and
          the loss picks the memories by the step's parity.
  export + MMLM (`export_and_match`): after stage 2, one per-modality clustering of the final
          model's features, k-means sub-memories (n = 4) of every cluster, the visible-to-
          infrared cluster matching (greedy, code; Hungarian, paper) and the visible labels
          moved into the infrared label space (`cluster.mmlm_labels`); saved keyed by path.
  final   a fresh network trained on the fixed matched pseudo-labels (§7): `warm_epochs`
          epochs of plain CE over every image (the 'all' sampler), then per epoch the GMM
          "clean probability" of every sample (from its CE loss), the identity sampler, and
          weighted CE + batch-hard triplet (margin 0.2) + Intra (self-mimic to
          confidence-weighted prototypes, 0.5) + Inter (MMD between the modalities of each
          pseudo-identity, 0.05), with the prototypes recomputed at every epoch start.

The paper's pipeline (`pipeline='paper_online'`, mmm.md §1 and §9 row 1; the `paper` preset
row) is one run, stage 'online': every epoch starts with the per-modality and joint
re-clustering and memories of stages 1-2 and the MMLM matching of this epoch's clusters
(Hungarian, cost summed over the visible sub-memories in the preset); the identity sampler
draws P matched pseudo-identities x K images per modality, and one optimiser step minimises
L_CMC (per-modality and joint ClusterNCE) + L_SCA (Intra, squared L2 in the preset, and
Inter, with the paper's normalisation and start epochs). No classifier and no GMM over CE: the
clean probabilities come from each sample's ClusterNCE loss at its matched label [I].

Memories and per-sample state live in `TrainState.method_state` with fixed shapes: the three
cluster memories {'rgb', 'ir', 'all'} are [mmm.max_clusters, D] (zero rows are padding, masked
out of the softmax), the final stage's weights [N records, 3] (visible view 1, view 2, infrared)
and prototypes [3, C, D].

Deviations from the code, recorded [I]:
* The visible second view (channel exchange) is made on the device from the first view's
  augmented pixels: the two views share the crop, flip and erasing box (the code draws them
  independently) and differ by the exchanged channel.
* The prototype pass runs in eval mode without augmentation over every training image; the
  code runs it in train mode over the epoch's sampled batches. The prototype of a label divides
  by its member count, as the code does. The GMM pass is the code's (train mode, training
  augmentation, `gmm_pass_mode='train'`) or, as a switch, eval mode without augmentation.
* In the joint step both modalities are scored against the memory as it was before the step;
  the code's infrared loss reads the memory already updated by the visible branch.
* Single-device BN over the global batch (the code ran 2-GPU DataParallel).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maumjax import cluster as cluster_lib
from maumjax import losses
from maumjax import memory as memory_lib
from maumjax import models as models_lib
from maumjax.data import augment as augment_lib
from maumjax.methods import api
from maumjax.models import reid as reid_lib
from maumjax.models.resnet import stage_output_channels
from maumjax.train import optim
from maumjax.train import state as state_lib

STAGES = ("stage1", "stage2", "final", "online")
PIPELINES = ("code_offline", "paper_online")
GMM_PASS_MODES = ("train", "eval")
JOINT_FALLBACKS = ("all_clusters", "error")
VISIBLE, INFRARED = 0, 1
MEMORIES = ("rgb", "ir", "all")
# The classifier's init (AGW weights_init_classifier, mmm.md §3): normal, std 0.001.
CLASSIFIER_STD = 0.001
LABELS_FILE = "labels.npz"
JOINT_KEYS = ("joint_ari", "joint_nmi", "correspondence")


@dataclasses.dataclass(frozen=True)
class MMMConfig:
  """MMM's settings (a trainer config's `mmm` section; defaults: the released code, mmm.md §9).

  Attributes:
    stage: the run's stage, one of `STAGES`; 'online' is the paper pipeline's only stage.
    pipeline: 'code_offline' (the released three-script pipeline, stages 'stage1', 'stage2',
      'final') or 'paper_online' (the paper's one objective, stage 'online').
    k1, k2: per-modality Jaccard neighbourhoods. [CODE 30, 6]
    joint_k1, joint_k2: the joint (modality-aware) Jaccard's. [CODE SYSU 40, 32; RegDB 38, 18]
    eps: DBSCAN radius on the Jaccard distance. [CODE SYSU 0.6, RegDB 0.3]
    min_samples: DBSCAN's. [CODE 4]
    max_clusters: rows of each memory (the step compiles once); a clustering with more
      clusters stops the run with an error naming this field.
    feature_batch: images per forward pass when features are extracted for clustering.
    temperature: ClusterNCE tau. [CODE 0.05]
    mem_momentum: memory momentum m (a row keeps m of itself). [CODE 0.1]
    mem_update: 'sequential' (code) or 'per_label_mean' (`memory.CLUSTER_UPDATES`).
    init_from: a run directory whose latest checkpoint gives the initial parameters and BN
      statistics (stage 2 starts from stage 1); '' = the model's own init / pretrained file.
    init_best: take init_from's `eval.select='best_on_test'` pick (its <run>/best folder)
      instead of its latest checkpoint: the code's stage 1 -> 2 hand-off (best test mAP,
      mmm.md §5.5, §9 row 17); experiments/mmm.py sets it when eval.select='best_on_test'.
    labels_file: the final stage's pseudo-labels (`export_and_match`'s labels.npz).
    num_classes: the final stage's classifier width (the matched label space's size).
    warm_epochs: CE-only epochs over every image before the SCA terms. [CODE 5]
    use_ce: the weighted identity CE. [CODE on]
    use_triplet: batch-hard triplet on the pre-BN features. [CODE on]
    margin: its margin. [CODE 0.2]
    intra: the Intra (self-mimic) term. intra_form: 'l1_weighted' (code) or 'l2sq' (paper).
    sm_w: Intra's weight. [CODE/P 0.5]
    intra_start: first epoch of Intra (>= warm_epochs takes effect). [CODE 5 (= warm-up end)]
    inter: the Inter (MMD) term. inter_norm: 'code' or 'paper' (`losses.INTER_NORMS`).
    md_w: Inter's weight. [CODE/P 0.05]
    inter_start: first epoch of Inter. [CODE 5; paper 15]
    gmm_pass_mode: how the per-sample CE losses of the GMM are computed: 'train' (code) runs
      the network in train mode with the training augmentation over every training image,
      visible and infrared shuffled and paired as the all-sampler does, in batches of
      `feature_batch` pairs, and keeps the BN running statistics it moves; 'eval' uses the
      running statistics and no augmentation (nothing moves).
    diagnostics: log the pseudo-labels' agreement with the ground truth (ARI, NMI, purity,
      ...; read for reporting only) after every clustering.
    matching, cost_sum_over, unmatched, off_by_one, sub_memories: the online stage's
      per-epoch MMLM (`cluster.mmlm_labels`, `cluster.sub_memories`); experiments/mmm.py fills
      them from its `mmlm` section, which the offline pipeline's MMLM step reads.
    joint_fallback: stage 2, an epoch whose joint clustering has no cluster holding both
      modalities (early training on data with a wide modality gap): 'all_clusters' [I] trains
      that epoch's joint steps on every joint cluster (logged as cmc_clusters_both = 0);
      'error' stops the run. The code has no such case (its joint loader would be empty).
  """

  stage: str = "stage1"
  pipeline: str = "code_offline"
  k1: int = 30
  k2: int = 6
  joint_k1: int = 40
  joint_k2: int = 32
  eps: float = 0.6
  min_samples: int = 4
  max_clusters: int = 1024
  feature_batch: int = 128
  temperature: float = 0.05
  mem_momentum: float = 0.1
  mem_update: str = "sequential"
  init_from: str = ""
  init_best: bool = False
  labels_file: str = ""
  num_classes: int = 0
  warm_epochs: int = 5
  use_ce: bool = True
  use_triplet: bool = True
  margin: float = 0.2
  intra: bool = True
  intra_form: str = "l1_weighted"
  sm_w: float = 0.5
  intra_start: int = 5
  inter: bool = True
  inter_norm: str = "code"
  md_w: float = 0.05
  inter_start: int = 5
  gmm_pass_mode: str = "train"
  diagnostics: bool = True
  joint_fallback: str = "all_clusters"
  matching: str = "greedy"
  cost_sum_over: str = "ir"
  unmatched: str = "nearest"
  off_by_one: bool = False
  sub_memories: int = 4

  def __post_init__(self):
    for name, choices in (("stage", STAGES), ("pipeline", PIPELINES),
                          ("joint_fallback", JOINT_FALLBACKS),
                          ("mem_update", memory_lib.CLUSTER_UPDATES),
                          ("intra_form", losses.INTRA_FORMS), ("inter_norm", losses.INTER_NORMS),
                          ("gmm_pass_mode", GMM_PASS_MODES),
                          ("matching", cluster_lib.MATCHINGS),
                          ("cost_sum_over", cluster_lib.COST_SUMS),
                          ("unmatched", cluster_lib.UNMATCHED)):
      if getattr(self, name) not in choices:
        raise ValueError(f"mmm.{name}={getattr(self, name)!r}; choose one of {choices}")
    if (self.pipeline == "paper_online") != (self.stage == "online"):
      raise ValueError(f"mmm.stage={self.stage!r} with mmm.pipeline={self.pipeline!r}: the "
                       "'online' stage is the paper_online pipeline's only stage, and the "
                       "code_offline pipeline's stages are stage1, stage2 and final")
    if self.sub_memories < 1:
      raise ValueError(f"mmm.sub_memories={self.sub_memories} must be >= 1")
    if self.stage == "final" and (self.num_classes < 1 or not self.labels_file):
      raise ValueError("mmm.stage='final' needs mmm.labels_file (the MMLM labels.npz) and "
                       "mmm.num_classes >= 1; experiments/mmm.py fills both after MMLM")
    if self.max_clusters < 1 or self.feature_batch < 1:
      raise ValueError(f"mmm.max_clusters={self.max_clusters} and mmm.feature_batch="
                       f"{self.feature_batch} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the step and the hooks read: the MMM settings and the run facts they need."""

  mmm: MMMConfig
  aug_rgb: augment_lib.AugmentConfig
  num_identities: int
  feature_dim: int
  aug_ir: augment_lib.AugmentConfig = augment_lib.AugmentConfig()
  seed: int = 0


def _check_model(model_cfg: dict[str, Any]) -> dict[str, Any]:
  model_cfg = dict(model_cfg)
  name = model_cfg.setdefault("name", "reid")
  if name != "reid" or model_cfg.get("head", "global") != "global":
    raise ValueError(f"MMM trains model.name='reid' with model.head='global' (the AGW network, "
                     f"mmm.md §3); got name={name!r}, head={model_cfg.get('head')!r}")
  model_cfg["head"] = "global"
  return model_cfg


def restore_variables(run_dir: str | os.PathLike, template: state_lib.TrainState, *,
                      best: bool = False):
  """(params, batch_stats) of the latest checkpoint of the run in `run_dir` (with `best`: of
  its `eval.select='best_on_test'` pick), checked against the structure and shapes of
  `template`'s (the same network; the optimiser may differ)."""
  from maumjax.train import checkpoint as checkpoint_lib

  run_dir = Path(run_dir)
  subdir = checkpoint_lib.BEST_SUBDIR if best else "checkpoints"
  if not checkpoint_lib.saved_steps(run_dir, subdir):
    raise FileNotFoundError(
        f"mmm.init_from={str(run_dir)!r} holds no checkpoint in {subdir}/; give the directory "
        "of a finished earlier stage (e.g. <workdir>/stage1)" + (
            ", trained with eval.select='best_on_test' (mmm.init_best)" if best else ""))
  with checkpoint_lib.Checkpointer(run_dir, subdir=subdir) as ckpt:
    arrays = ckpt.restore_arrays()
  out = []
  for part in ("params", "batch_stats"):
    want, got = getattr(template, part), arrays[part]
    shapes = lambda t: jax.tree.map(lambda x: tuple(np.shape(x)), t)  # noqa: E731
    if jax.tree.structure(want) != jax.tree.structure(got) or shapes(want) != shapes(got):
      raise ValueError(f"the checkpoint in {run_dir} holds another network's {part} than "
                       "this stage builds; the stages of one workdir must share the model "
                       "section")
    out.append(jax.tree.map(lambda w, g: jnp.asarray(g, w.dtype), want, got))
  return out[0], out[1]


def init(config: dict[str, Any], data: api.DataInfo, *, seed: int = 0) -> api.Setup:
  """The network (AGW two-stream ReidNet), the optimiser and the stage's method state."""
  cfg = MMMConfig(**config["mmm"])
  model_cfg = _check_model(config["model"])
  model = models_lib.model_from_config(model_cfg)
  dummy = jnp.zeros((1, *data.image_shape, 3), jnp.float32)
  variables, report = api.init_model(model, jax.random.PRNGKey(seed), (dummy, dummy),
                                     model_cfg.get("pretrained", ""))
  dim = stage_output_channels(model_cfg.get("arch", "resnet50"))
  params = {"model": variables["params"]}
  if cfg.stage == "final":
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    params["classifier"] = CLASSIFIER_STD * jax.random.normal(key, (dim, cfg.num_classes))
    method_state = {"weights": jnp.ones((data.num_records, 3), jnp.float32),
                    "proto": jnp.zeros((3, cfg.num_classes, dim), jnp.float32)}
  else:
    method_state = {k: jnp.zeros((cfg.max_clusters, dim), jnp.float32) for k in MEMORIES}
  if cfg.stage == "online":
    # Per record: its per-modality and joint cluster ids (-1: outlier), its clean
    # probabilities (visible view 1, view 2, infrared); prototypes per matched label.
    method_state.update(ids=jnp.full((data.num_records, 2), -1, jnp.int32),
                        weights=jnp.ones((data.num_records, 3), jnp.float32),
                        proto=jnp.zeros((3, cfg.max_clusters, dim), jnp.float32))
  tx = optim.make_optimizer(optim.OptimConfig(**config["optim"]), data.steps_per_epoch,
                            reid_lib.param_groups)
  state = state_lib.TrainState.create(params=params, batch_stats=variables["batch_stats"],
                                      tx=tx, method_state=method_state, seed=seed)
  if cfg.init_from:
    restored, stats = restore_variables(cfg.init_from, state, best=cfg.init_best)
    state = state_lib.TrainState.create(params=restored, batch_stats=stats, tx=tx,
                                        method_state=method_state, seed=seed)
  pipe = config["data"]["pipeline"]
  if pipe.get("augment_on", "device") != "device":
    raise ValueError("MMM makes the visible second view on the device; use "
                     "data.pipeline.augment_on='device'")
  if cfg.stage == "final" and int(pipe.get("warm_epochs", 0)) != cfg.warm_epochs:
    raise ValueError(f"mmm.warm_epochs={cfg.warm_epochs} but data.pipeline.warm_epochs="
                     f"{pipe.get('warm_epochs', 0)}: the warm-up epochs draw every image (the "
                     "'all' sampler), so both must agree")
  settings = Settings(cfg, augment_lib.preset(pipe["augment_rgb"]), int(pipe["num_identities"]),
                      dim, augment_lib.preset(pipe["augment_ir"]), int(pipe.get("seed", 0)))
  return api.Setup(model=model, tx=tx, state=state, config=settings, data=data,
                   load_report=report)


def phase(setup: api.Setup, epoch: int) -> int:
  """Stages 1 and 2: one phase. Final: 0 during the warm-up, then 1 + 2 (Intra on) + 4 (Inter
  on), so a term that has not started is not computed. Online: 1 + 2 (Intra) + 4 (Inter)."""
  cfg = setup.config.mmm
  if cfg.stage not in ("final", "online") or (cfg.stage == "final" and
                                              epoch < cfg.warm_epochs):
    return 0
  return 1 + 2 * (cfg.intra and epoch >= cfg.intra_start) + 4 * (cfg.inter and
                                                                 epoch >= cfg.inter_start)


def describe_phase(setup: api.Setup, phase_: int) -> str | None:
  """What changes in the loss at a final- or online-stage phase change."""
  stage = setup.config.mmm.stage
  if stage not in ("final", "online") or phase_ == 0:
    return None
  sca = ["Intra"] * bool(phase_ & 2) + ["Inter"] * bool(phase_ & 4)
  if stage == "online":
    return "loss: " + " + ".join(["ClusterNCE (per-modality and joint)"] + sca)
  return "warm-up over; per-sample GMM weights and " + " + ".join(["weighted CE", "triplet"]
                                                                   + sca)


def exchange_view(rgb: dict[str, jax.Array], rng: jax.Array, aug: augment_lib.AugmentConfig,
                  ctx: api.StepContext | None = None) -> jax.Array:
  """The visible second view: the first view's augmented pixels with one of R, G, B copied to
  all channels (CAJ channel exchange, mmm.md §4), normalised and erased like the first.

  The channels are drawn for the global batch and each device takes its rows, so a step on
  several devices sees the same views as on one.
  """
  cfg = dataclasses.replace(aug, channel_mode="exchange", channel_p=1.0)
  params = dict(rgb["aug"])
  b = params["channel"].shape[0]
  if ctx is not None and ctx.axis_name is not None:
    k = jax.random.randint(rng, (b * ctx.devices,), 0, 3)
    k = jax.lax.dynamic_slice(k, (jax.lax.axis_index(ctx.axis_name) * b,), (b,))
  else:
    k = jax.random.randint(rng, (b,), 0, 3)
  params["channel"] = k.astype(params["channel"].dtype)
  return augment_lib.apply_jax_tensor(rgb["pixels"], params, cfg)


def _streams(model, params, state, batch, rng, s: Settings, ctx: api.StepContext):
  """The step's train-mode forward of [view 1; view 2 (channel exchange)] (visible stem) and
  the infrared images (thermal stem) in one batch.

  Returns:
    (BN-neck streams, pre-BN float32 streams, new batch_stats); each is (view 1, view 2,
    infrared), gathered over the devices (global batch order).
  """
  v1 = batch["rgb"]["image"]
  v2 = exchange_view(batch["rgb"], rng, s.aug_rgb, ctx)
  b = v1.shape[0]
  out, updates = model.apply({"params": params["model"], "batch_stats": state.batch_stats},
                             jnp.concatenate([v1, v2]), batch["ir"]["image"], train=True,
                             mutable=["batch_stats"])
  split = lambda x: (ctx.gather(x[:b]), ctx.gather(x[b:2 * b]), ctx.gather(x[2 * b:]))  # noqa
  return (split(out["global"]["bn"][:, 0]),
          split(out["global"]["pre"][:, 0].astype(jnp.float32)), updates["batch_stats"])


def _sca_terms(cfg: MMMConfig, num_ids: int, pre, y, yi, weights, proto, *, intra: bool,
               inter: bool) -> dict[str, jax.Array]:
  """Intra and Inter (mmm.md §7.5) of the pre-BN streams (view 1, view 2, infrared) with the
  visible / infrared labels `y`, `yi`, the streams' clean probabilities and prototypes
  [3, C, D]; L_SM_rgb is the mean of the two views', and the weights sm_w, md_w apply
  outside."""
  x1, x2, xi = pre
  w1, w2, wi = weights
  terms = {}
  if intra:
    sm = lambda x, lab, p, w: losses.self_mimic_loss(x, lab, p, w,  # noqa: E731
                                                     form=cfg.intra_form)
    terms["intra"] = (0.5 * (sm(x1, y, proto[0], w1) + sm(x2, y, proto[1], w2))
                      + sm(xi, yi, proto[2], wi))
  if inter:
    terms["inter"] = losses.inter_modality_mmd([x1, x2], xi, num_ids=num_ids,
                                               norm=cfg.inter_norm)
  return terms


def _record_weights(state, batch, ctx: api.StepContext):
  """The clean probabilities (view 1, view 2, infrared) of the step's records (global)."""
  wts = state.method_state["weights"]
  i_rgb, i_ir = (ctx.gather(batch[m]["index"]) for m in ("rgb", "ir"))
  return wts[i_rgb, 0], wts[i_rgb, 1], wts[i_ir, 2]


def _cluster_parts(setup: api.Setup, ctx: api.StepContext) -> api.StepParts:
  """Stages 1 and 2: ClusterNCE against the memories, then the memory update."""
  s = setup.config
  cfg = s.mmm
  joint = cfg.stage == "stage2"
  model = setup.model.clone(axis_name=ctx.bn_axis_name)

  def pick(state, batch):
    """(joint step?, visible labels, infrared labels) of this step."""
    odd = (state.step % 2 == 1) if joint else jnp.bool_(False)
    lab = []
    for name in ("rgb", "ir"):
      y = batch[name]["label"]
      if joint:
        y = jnp.where(odd, y[:, 1], y[:, 0])
      lab.append(ctx.gather(y.astype(jnp.int32)))
    return odd, lab[0], lab[1]

  def memories(state, odd):
    mem = state.method_state
    return (jnp.where(odd, mem["all"], mem["rgb"]), jnp.where(odd, mem["all"], mem["ir"]))

  def loss_fn(params, state, batch, rng):
    (b1, b2, f_ir), _, stats = _streams(model, params, state, batch, rng, s, ctx)
    f_rgb = jnp.concatenate([b1, b2])
    odd, y_rgb, y_ir = pick(state, batch)
    y_rgb = jnp.concatenate([y_rgb, y_rgb])
    m_rgb, m_ir = memories(state, odd)
    nce = lambda f, y, m: losses.cluster_nce_loss(f, y, m, temperature=cfg.temperature)  # noqa
    terms = {"nce_rgb": nce(f_rgb, y_rgb, m_rgb), "nce_ir": nce(f_ir, y_ir, m_ir)}
    return terms, stats, (f_rgb, y_rgb, f_ir, y_ir)

  def after(state, params, finite, aux):
    f_rgb, y_rgb, f_ir, y_ir = aux
    mem = state.method_state
    update = lambda m, f, y: memory_lib.update_cluster_memory(  # noqa: E731
        m, f, y, momentum=cfg.mem_momentum, mode=cfg.mem_update)
    if joint:
      odd = state.step % 2 == 1
      m_rgb, m_ir = memories(state, odd)
      a = update(m_rgb, f_rgb, y_rgb)
      # The joint step writes both modalities into the one joint memory, visible first.
      c = update(jnp.where(odd, a, m_ir), f_ir, y_ir)
      new = {"rgb": jnp.where(odd, mem["rgb"], a), "ir": jnp.where(odd, mem["ir"], c),
             "all": jnp.where(odd, c, mem["all"])}
    else:
      new = {"rgb": update(mem["rgb"], f_rgb, y_rgb), "ir": update(mem["ir"], f_ir, y_ir),
             "all": mem["all"]}
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, dict(mem))
    return params, new

  return api.StepParts(loss=loss_fn, weights={"nce_rgb": 1.0, "nce_ir": 1.0}, after=after,
                       pixels=True, aux=True)


def _final_parts(setup: api.Setup, phase_: int, ctx: api.StepContext) -> api.StepParts:
  """The final stage: warm-up CE, then weighted CE + triplet + Intra + Inter."""
  s = setup.config
  cfg = s.mmm
  model = setup.model.clone(axis_name=ctx.bn_axis_name)
  warm = phase_ == 0
  intra, inter = bool(phase_ & 2), bool(phase_ & 4)

  def loss_fn(params, state, batch, rng):
    bn, pre, stats = _streams(model, params, state, batch, rng, s, ctx)
    logits = jnp.concatenate(bn).astype(jnp.float32) @ params["classifier"]
    y, yi = (ctx.gather(batch[m]["label"].astype(jnp.int32)) for m in ("rgb", "ir"))
    labels = jnp.concatenate([y, y, yi])
    ce = losses.softmax_cross_entropy(logits, labels)
    if warm:
      return {"id": jnp.mean(ce)}, stats
    weights = _record_weights(state, batch, ctx)
    terms = {}
    if cfg.use_ce:
      terms["id"] = jnp.mean(jnp.concatenate(weights) * ce)
    if cfg.use_triplet:
      terms["tri"] = losses.batch_hard_triplet(jnp.concatenate(pre), labels, margin=cfg.margin)
    terms.update(_sca_terms(cfg, s.num_identities, pre, y, yi, weights,
                            state.method_state["proto"], intra=intra, inter=inter))
    return terms, stats

  weights = ({"id": 1.0} if warm else
             {"id": 1.0, "tri": 1.0, "intra": cfg.sm_w, "inter": cfg.md_w})
  return api.StepParts(loss=loss_fn, weights=weights, pixels=True)


def _online_parts(setup: api.Setup, phase_: int, ctx: api.StepContext) -> api.StepParts:
  """The paper pipeline's one objective (mmm.md §1, §9 row 1): L_CMC + L_SCA.

  L_CMC: ClusterNCE of both visible views against the visible memory and of the infrared
  images against the infrared memory (per-modality cluster ids), plus both modalities against
  the joint memory (joint cluster ids; joint outliers sit out). L_SCA: Intra and Inter on the
  pre-BN features with the matched labels the sampler drew (and the triplet when
  `use_triplet`). The cluster ids are looked up per record in the method state, so the
  pipeline carries only the matched label. After the step the three memories move, the joint
  one visible samples first.
  """
  s = setup.config
  cfg = s.mmm
  model = setup.model.clone(axis_name=ctx.bn_axis_name)
  intra, inter = bool(phase_ & 2), bool(phase_ & 4)

  def loss_fn(params, state, batch, rng):
    (b1, b2, bi), pre, stats = _streams(model, params, state, batch, rng, s, ctx)
    f_rgb = jnp.concatenate([b1, b2])
    mst = state.method_state
    i_rgb, i_ir = (ctx.gather(batch[m]["index"]) for m in ("rgb", "ir"))
    ids_rgb = jnp.concatenate([mst["ids"][i_rgb]] * 2)
    ids_ir = mst["ids"][i_ir]
    nce = lambda f, y, m: losses.cluster_nce_loss(f, y, m, temperature=cfg.temperature)  # noqa
    terms = {"nce_rgb": nce(f_rgb, ids_rgb[:, 0], mst["rgb"]),
             "nce_ir": nce(bi, ids_ir[:, 0], mst["ir"]),
             "cmc_rgb": nce(f_rgb, ids_rgb[:, 1], mst["all"]),
             "cmc_ir": nce(bi, ids_ir[:, 1], mst["all"])}
    y, yi = (ctx.gather(batch[m]["label"].astype(jnp.int32)) for m in ("rgb", "ir"))
    if cfg.use_triplet:
      terms["tri"] = losses.batch_hard_triplet(jnp.concatenate(pre),
                                               jnp.concatenate([y, y, yi]), margin=cfg.margin)
    terms.update(_sca_terms(cfg, s.num_identities, pre, y, yi,
                            _record_weights(state, batch, ctx), mst["proto"], intra=intra,
                            inter=inter))
    return terms, stats, (f_rgb, ids_rgb, bi, ids_ir)

  def after(state, params, finite, aux):
    f_rgb, ids_rgb, f_ir, ids_ir = aux
    mem = state.method_state
    update = lambda m, f, y: memory_lib.update_cluster_memory(  # noqa: E731
        m, f, y, momentum=cfg.mem_momentum, mode=cfg.mem_update)
    new = dict(mem)
    new["rgb"] = update(mem["rgb"], f_rgb, ids_rgb[:, 0])
    new["ir"] = update(mem["ir"], f_ir, ids_ir[:, 0])
    new["all"] = update(update(mem["all"], f_rgb, ids_rgb[:, 1]), f_ir, ids_ir[:, 1])
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, dict(mem))
    return params, new

  weights = {"nce_rgb": 1.0, "nce_ir": 1.0, "cmc_rgb": 1.0, "cmc_ir": 1.0, "tri": 1.0,
             "intra": cfg.sm_w, "inter": cfg.md_w}
  return api.StepParts(loss=loss_fn, weights=weights, after=after, pixels=True, aux=True)


def step_parts(setup: api.Setup, phase_: int, ctx: api.StepContext) -> api.StepParts:
  """The stage's pieces of the train step."""
  stage = setup.config.mmm.stage
  if stage == "final":
    return _final_parts(setup, phase_, ctx)
  if stage == "online":
    return _online_parts(setup, phase_, ctx)
  return _cluster_parts(setup, ctx)


def embed(setup: api.Setup):
  """Jitted `(variables, images, modality) -> L2-normalised BN-neck features` (each image
  through its own modality's stem)."""
  return api.model_embed(setup.model, reid_lib.ReidNet.embed)


def variables_of(state: state_lib.TrainState) -> dict[str, Any]:
  """The model's inference variables from a train state."""
  return api.model_variables(state)


# --- Host side: features of the whole training set, clustering, GMM, prototypes -------------


def _global_outputs(module, images, modality):
  """Eval-mode global head outputs {'pre', 'bn'} [B, D], each image through its stem."""
  if module.specific_stages > 0:
    is_ir = (modality == reid_lib.MODALITY_IR)[:, None, None, None]
    x = jnp.where(is_ir, module.ir(images, train=False), module.rgb(images, train=False))
  else:
    x = images
  out = module._trunk_and_heads(x, train=False)["global"]  # noqa: SLF001 (same package)
  return {k: v[:, 0].astype(jnp.float32) for k, v in out.items()}


_FORWARD_CACHE: dict[Any, Any] = {}


def _outputs_fn(model):
  """A jitted `(variables, images, modality) -> {'pre', 'bn'}` for `model` (cached)."""
  if model not in _FORWARD_CACHE:
    _FORWARD_CACHE[model] = jax.jit(
        lambda v, x, m: model.apply(v, x, m, method=_global_outputs))
  return _FORWARD_CACHE[model]


def extract(setup: api.Setup, state, data: api.EpochData, indices: np.ndarray, *,
            flip: bool = False, exchange: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Eval-mode outputs for the train records `indices`, in order.

  Args:
    flip: also run the mirror images and return 'flip_bn' (for the flip-averaged features).
    exchange: int [len(indices)] channel (0..2) copied to all channels before normalisation,
      -1 for none (the visible second view); None = unchanged images.

  Returns:
    {'pre', 'bn'[, 'flip_bn']}: float32 [len(indices), D].
  """
  fn = _outputs_fn(setup.model)
  variables = jax.device_get(variables_of(state))
  modality = np.asarray(data.metadata["modality"])
  size = setup.config.mmm.feature_batch
  norm = augment_lib.preset("none")
  outs: dict[str, list[np.ndarray]] = {"pre": [], "bn": []}
  if flip:
    outs["flip_bn"] = []
  for start in range(0, len(indices), size):
    idx = np.asarray(indices[start:start + size])
    n = len(idx)
    pad = np.concatenate([idx, np.repeat(idx[-1:], size - n)])
    images = np.stack([data.images(int(i)) for i in pad])
    if exchange is not None:
      k = np.concatenate([exchange[start:start + size], np.repeat(exchange[start + n - 1:][:1],
                                                                  size - n)])
      single = np.take_along_axis(images, np.clip(k, 0, 2)[:, None, None, None], axis=3)
      images = np.where((k >= 0)[:, None, None, None], single, images)
    x = augment_lib.normalize_numpy(images, mean=norm.mean, std=norm.std)
    m = modality[pad].astype(np.int32)
    got = fn(variables, x, m)
    outs["pre"].append(np.asarray(got["pre"])[:n])
    outs["bn"].append(np.asarray(got["bn"])[:n])
    if flip:
      outs["flip_bn"].append(np.asarray(fn(variables, x[:, :, ::-1], m)["bn"])[:n])
  dim = setup.config.feature_dim
  return {k: (np.concatenate(v) if v else np.zeros((0, dim), np.float32)) for k, v in outs.items()}


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _flip_average(out: dict[str, np.ndarray]) -> np.ndarray:
  return ((_unit(out["bn"]) + _unit(out["flip_bn"])) / 2).astype(np.float32)


def cluster_features(setup: api.Setup, state, data: api.EpochData,
                     indices: np.ndarray) -> np.ndarray:
  """The clustering's features (mmm.md §4): the mean of the L2-normalised BN-neck features of
  each image and its mirror, not re-normalised."""
  return _flip_average(extract(setup, state, data, indices, flip=True))


def _pad_memory(mem: np.ndarray, rows: int, what: str) -> jnp.ndarray:
  if len(mem) > rows:
    raise ValueError(f"the {what} clustering found {len(mem)} clusters, more than "
                     f"mmm.max_clusters={rows}; raise mmm.max_clusters")
  out = np.zeros((rows, mem.shape[1]), np.float32)
  out[:len(mem)] = mem
  return jnp.asarray(out)


def _checked_labels(labels: np.ndarray, what: str, cfg: MMMConfig) -> np.ndarray:
  if labels.size == 0 or labels.max() < 0:
    raise ValueError(f"the {what} clustering found no cluster (every sample an outlier at "
                     f"mmm.eps={cfg.eps}, min_samples={cfg.min_samples}); raise mmm.eps or "
                     "check the features")
  return labels


def match_modalities(feats: np.ndarray, is_ir: np.ndarray, lab_rgb: np.ndarray,
                     lab_ir: np.ndarray, *, matching: str = "greedy", cost_sum_over: str = "ir",
                     unmatched: str = "nearest", off_by_one: bool = False,
                     sub_memories: int = 4) -> np.ndarray:
  """MMLM (mmm.md §6): k-means sub-memories of every cluster of each modality, the visible-to-
  infrared cluster matching and the visible labels moved into the infrared label space.

  Args:
    feats: [N, D] the clustering's features of the records; is_ir: bool [N].
    lab_rgb, lab_ir: the per-modality cluster labels of the visible / infrared rows.

  Returns:
    int64 [number of visible rows]: the visible labels in the infrared label space.
  """
  sub_rgb = cluster_lib.sub_memories(feats[~is_ir], lab_rgb, n=sub_memories)
  sub_ir = cluster_lib.sub_memories(feats[is_ir], lab_ir, n=sub_memories)
  return cluster_lib.mmlm_labels(lab_rgb, sub_rgb, sub_ir, method=matching,
                                 cost_sum_over=cost_sum_over, unmatched=unmatched,
                                 off_by_one=off_by_one)


def _prototypes(streams, weights: np.ndarray, old: np.ndarray) -> np.ndarray:
  """Confidence-weighted prototypes (mmm.md §7.6): per stream k and label c, the sum of
  weight x pre-BN feature over the stream's records labelled c divided by their count; `old`
  where a label has no record.

  Args:
    streams: three (records [n], labels [n], pre-BN features [n, D], weight column) tuples
      (visible view 1, view 2, infrared).
    weights: [N records, 3] clean probabilities.
    old: [3, C, D].
  """
  proto = np.array(old, np.float32)
  num = proto.shape[1]
  for k, (idx, y, pre, col) in enumerate(streams):
    sums = np.zeros((num, proto.shape[2]), np.float64)
    np.add.at(sums, y, pre * weights[idx, col][:, None])
    counts = np.bincount(y, minlength=num)
    seen = counts > 0
    proto[k][seen] = (sums[seen] / counts[seen][:, None]).astype(np.float32)
  return proto


def cluster_modalities(feats: np.ndarray, is_ir: np.ndarray, cfg: MMMConfig):
  """Per-modality pseudo-labels (mmm.md §5.2 steps 2-3): (visible labels, infrared labels)."""
  out = []
  for m, what in ((False, "visible"), (True, "infrared")):
    dist = cluster_lib.jaccard_distance(feats[is_ir == m], k1=cfg.k1, k2=cfg.k2)
    labels = cluster_lib.pseudo_labels(dist, eps=cfg.eps, min_samples=cfg.min_samples)
    del dist
    out.append(_checked_labels(labels, what, cfg))
  return out[0], out[1]


def _modality_memories(feats, is_ir, lab_rgb, lab_ir, cfg: MMMConfig) -> dict[str, jax.Array]:
  """The visible and infrared memories {'rgb', 'ir'} from their clusters' means."""
  return {"rgb": _pad_memory(cluster_lib.init_cluster_memory(feats[~is_ir], lab_rgb),
                             cfg.max_clusters, "visible"),
          "ir": _pad_memory(cluster_lib.init_cluster_memory(feats[is_ir], lab_ir),
                            cfg.max_clusters, "infrared")}


def _joint_clusters(feats, is_ir, cfg: MMMConfig):
  """The joint (modality-aware) clustering: (labels [N], its modality-balanced memory)."""
  dist = cluster_lib.jaccard_distance(feats, k1=cfg.joint_k1, k2=cfg.joint_k2, modality=is_ir)
  labels = _checked_labels(
      cluster_lib.pseudo_labels(dist, eps=cfg.eps, min_samples=cfg.min_samples), "joint", cfg)
  del dist
  memory = _pad_memory(cluster_lib.init_cluster_memory(feats, labels, modality=is_ir),
                       cfg.max_clusters, "joint")
  return labels, memory


def _diagnostics(data: api.EpochData, kept: np.ndarray, is_ir: np.ndarray, rgb: np.ndarray,
                 ir: np.ndarray, *, joint: bool) -> dict[str, float]:
  """Agreement of the pseudo-labels with the ground truth (reporting only)."""
  from maumjax import diagnostics

  truth = np.asarray(data.metadata["identity"])[kept]
  return diagnostics.report(rgb, truth[~is_ir], ir, truth[is_ir], joint=joint)


def _log(data: api.EpochData, values: dict[str, float], kind: str = "pseudo_labels") -> None:
  if data.log is not None:
    data.log({k: float(v) for k, v in values.items()}, kind)


def _recluster(setup: api.Setup, state, epoch: int, data: api.EpochData):
  """Stages 1/2 epoch start: features, clustering, memories and the epoch's labels."""
  cfg = setup.config.mmm
  kept = np.flatnonzero(data.keep)
  is_ir = np.asarray(data.metadata["modality"])[kept] == INFRARED
  feats = cluster_features(setup, state, data, kept)
  lab_rgb, lab_ir = cluster_modalities(feats, is_ir, cfg)
  num = len(data.keep)
  per_modality = np.full(num, -1, np.int64)
  per_modality[kept[~is_ir]] = lab_rgb
  per_modality[kept[is_ir]] = lab_ir
  mem = dict(state.method_state)
  mem.update(_modality_memories(feats, is_ir, lab_rgb, lab_ir, cfg))
  logged = {}
  if cfg.diagnostics:
    logged = _diagnostics(data, kept, is_ir, lab_rgb, lab_ir, joint=False)
  labels = per_modality
  if cfg.stage == "stage2":
    lab_all, mem["all"] = _joint_clusters(feats, is_ir, cfg)
    # Only the joint clusters that hold both modalities make the joint step's batches (§5.2
    # step 8); the memory keeps every joint cluster.
    both = np.intersect1d(lab_all[~is_ir], lab_all[is_ir])
    both = both[both >= 0]
    joint_labels = np.full(num, -1, np.int64)
    if len(both) or cfg.joint_fallback == "error":
      if not len(both):
        raise ValueError(f"epoch {epoch}: the joint clustering found no cluster holding both "
                         f"modalities (mmm.eps={cfg.eps}, joint_k1={cfg.joint_k1}, joint_k2="
                         f"{cfg.joint_k2}); raise mmm.eps or mmm.joint_k1, train stage 1 longer, "
                         "or set mmm.joint_fallback='all_clusters'")
      joint_labels[kept] = np.where(np.isin(lab_all, both), lab_all, -1)
    else:
      # 'all_clusters' [I]: every joint cluster makes this epoch's joint batches, each
      # modality's images against the joint memory (the code has no such case: its loader
      # would be empty). Each modality needs at least one joint cluster.
      for m, what in ((False, "visible"), (True, "infrared")):
        if not np.any(lab_all[is_ir == m] >= 0):
          raise ValueError(f"epoch {epoch}: the joint clustering left every {what} image an "
                           f"outlier (mmm.eps={cfg.eps}); raise mmm.eps or mmm.joint_k1")
      joint_labels[kept] = lab_all
    labels = np.stack([per_modality, joint_labels], axis=1)
    if cfg.diagnostics:
      cmc = _diagnostics(data, kept, is_ir, lab_all[~is_ir], lab_all[is_ir], joint=True)
      # The joint clustering's cross-modality numbers keep their plain names (one series in
      # diagnostics.png with MMLM's); its per-modality ones are prefixed 'cmc_'.
      logged.update({k if k in JOINT_KEYS else f"cmc_{k}": v for k, v in cmc.items()})
      logged["cmc_clusters_both"] = float(len(both))
  if logged:
    _log(data, logged)
  state = state.replace(method_state=mem)
  return state, labels


def load_labels(path: str | os.PathLike, data: api.EpochData | None = None,
                paths: np.ndarray | None = None) -> np.ndarray:
  """The MMLM labels saved by `export_and_match`, as int64 [N records] in record order.

  Stored keyed by record path (mmm.md §2: never by position); `paths` (the train records'
  paths in record order) checks and maps them. Without `paths` the stored order is used after
  checking the record count.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"mmm.labels_file={str(path)!r} does not exist; run the 'mmlm' "
                            "stage first (python -m experiments.mmm --config.stages=mmlm)")
  with np.load(path, allow_pickle=False) as f:
    stored_paths, labels = f["path"], f["label"].astype(np.int64)
  if paths is not None:
    lookup = {p: i for i, p in enumerate(stored_paths.tolist())}
    missing = [p for p in paths.tolist() if p not in lookup]
    if missing:
      raise ValueError(f"{path} has no label for {len(missing)} train records (e.g. "
                       f"{missing[0]!r}); it was made for other data: run the 'mmlm' stage "
                       "again")
    labels = labels[[lookup[p] for p in paths.tolist()]]
  if data is not None and len(labels) != len(data.keep):
    raise ValueError(f"{path} has {len(labels)} labels for {len(data.keep)} train records; it "
                     "was made for other data: run the 'mmlm' stage again")
  return labels


def _final_epoch(setup: api.Setup, state, epoch: int, data: api.EpochData):
  """Final stage epoch start: the fixed labels, the prototypes and the GMM weights."""
  cfg = setup.config.mmm
  labels = load_labels(cfg.labels_file, data,
                       paths=None if data.paths is None else data.paths())
  new_labels = None if np.array_equal(np.asarray(data.labels), labels) else labels
  if epoch < cfg.warm_epochs:
    return state, new_labels
  kept = np.flatnonzero((labels >= 0) & data.keep)
  is_ir = np.asarray(data.metadata["modality"])[kept] == INFRARED
  rgb, ir = kept[~is_ir], kept[is_ir]
  variables = jax.device_get(state.params)
  mstate = dict(state.method_state)
  weights = np.asarray(mstate["weights"]).copy()
  rng = np.random.default_rng([epoch, 7])
  exchange = rng.integers(0, 3, size=len(rgb))
  # Eval-mode outputs, only where something reads them: the prototypes (after the first SCA
  # epoch) and the eval-mode GMM pass.
  if epoch > cfg.warm_epochs or cfg.gmm_pass_mode == "eval":
    o1 = extract(setup, state, data, rgb)
    o2 = extract(setup, state, data, rgb, exchange=exchange)
    oi = extract(setup, state, data, ir)
  if epoch > cfg.warm_epochs:
    # The prototypes of the epoch that just ended, with its weights (mmm.md §7.6).
    mstate["proto"] = jnp.asarray(_prototypes(
        [(rgb, labels[rgb], o1["pre"], 0), (rgb, labels[rgb], o2["pre"], 1),
         (ir, labels[ir], oi["pre"], 2)], weights, np.asarray(mstate["proto"])))
  kernel = np.asarray(variables["classifier"], np.float32)

  def ce(out, y):
    logits = out["bn"] @ kernel
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y]

  if cfg.gmm_pass_mode == "train":
    c1, c2, ci, stats = train_mode_losses(setup, state, data, rgb, ir, labels, epoch)
    state = state.replace(batch_stats=stats)
  else:
    c1, c2 = ce(o1, labels[rgb]), ce(o2, labels[rgb])
    ci = ce(oi, labels[ir])
  w1, w2 = cluster_lib.clean_probability(c1, c2)
  (wi,) = cluster_lib.clean_probability(ci)
  weights[rgb, 0], weights[rgb, 1], weights[ir, 2] = w1, w2, wi
  mstate["weights"] = jnp.asarray(weights)
  _log(data, {"weight_rgb_mean": float(np.mean(np.concatenate([w1, w2]))),
              "weight_ir_mean": float(np.mean(wi))}, kind="gmm")
  return state.replace(method_state=mstate), new_labels


_TRAIN_PASS_CACHE: dict[Any, Any] = {}


def _train_pass_fn(setup: api.Setup):
  """A jitted train-mode forward of one all-sampler batch: augmented views and infrared images
  in, per-row CE against the labels and the moved BN statistics out."""
  s = setup.config
  model = setup.model
  if model not in _TRAIN_PASS_CACHE:

    def fn(params, stats, images_rgb, aug_rgb, images_ir, aug_ir, y_rgb, y_ir, key):
      pixels = augment_lib.apply_jax_pixels(images_rgb, aug_rgb, s.aug_rgb)
      v1 = augment_lib.apply_jax_tensor(pixels, aug_rgb, s.aug_rgb)
      v2 = exchange_view({"pixels": pixels, "aug": aug_rgb}, key, s.aug_rgb)
      ir = augment_lib.apply_jax(images_ir, aug_ir, s.aug_ir)
      out, updates = model.apply({"params": params["model"], "batch_stats": stats},
                                 jnp.concatenate([v1, v2]), ir, train=True,
                                 mutable=["batch_stats"])
      logits = out["global"]["bn"][:, 0].astype(jnp.float32) @ params["classifier"]
      ce = losses.softmax_cross_entropy(logits, jnp.concatenate([y_rgb, y_rgb, y_ir]))
      return ce, updates["batch_stats"]

    _TRAIN_PASS_CACHE[model] = jax.jit(fn)
  return _TRAIN_PASS_CACHE[model]


def train_mode_losses(setup: api.Setup, state, data: api.EpochData, rgb: np.ndarray,
                      ir: np.ndarray, labels: np.ndarray, epoch: int):
  """The code's GMM pass (mmm.md §7.3 step 1): per-sample CE of visible view 1, view 2 and the
  infrared images in train mode with the training augmentation, no gradient.

  The visible and infrared records are shuffled on their own and the shorter list is padded
  with random repeats of its own records (the all-sampler's pairing), then run in batches of
  `mmm.feature_batch` pairs, each visible image with its two views; the BN running statistics
  move batch after batch, as in the code. A record drawn twice keeps its first loss.

  Returns:
    (CE of view 1 [len(rgb)], of view 2 [len(rgb)], of infrared [len(ir)], batch_stats).
  """
  s = setup.config
  size = s.mmm.feature_batch
  rng = np.random.default_rng([s.seed, epoch, 11])
  n = max(len(rgb), len(ir))
  n = -(-n // size) * size
  order = []
  for idx in (rgb, ir):
    perm = rng.permutation(idx)
    order.append(np.concatenate([perm, rng.choice(idx, n - len(idx))]))
  fn = _train_pass_fn(setup)
  params, stats = jax.device_get(state.params), state.batch_stats
  pos = {m: {int(r): i for i, r in enumerate(idx)} for m, idx in (("rgb", rgb), ("ir", ir))}
  got = [np.full(len(rgb), np.nan), np.full(len(rgb), np.nan), np.full(len(ir), np.nan)]
  key = jax.random.PRNGKey(s.seed)
  h, w = data.images(int(rgb[0])).shape[:2]
  for start in range(0, n, size):
    r, i = order[0][start:start + size], order[1][start:start + size]
    aug_r = augment_lib.draw_params_batch(rng, s.aug_rgb, size, h, w)
    aug_i = augment_lib.draw_params_batch(rng, s.aug_ir, size, h, w)
    ce, stats = fn(params, stats, np.stack([data.images(int(j)) for j in r]), aug_r,
                   np.stack([data.images(int(j)) for j in i]), aug_i,
                   labels[r].astype(np.int32), labels[i].astype(np.int32),
                   jax.random.fold_in(key, epoch * n + start))
    ce = np.asarray(ce)
    for rows, idx, slots in ((r, "rgb", (0, 1)), (i, "ir", (2,))):
      for j, record in enumerate(rows):
        p = pos[idx][int(record)]
        for k, slot in enumerate(slots):
          if np.isnan(got[slot][p]):
            got[slot][p] = ce[(k * size if idx == "rgb" else 2 * size) + j]
  return got[0], got[1], got[2], stats


def nce_losses(feats: np.ndarray, labels: np.ndarray, memory: np.ndarray,
               temperature: float) -> np.ndarray:
  """Per-sample ClusterNCE, -log softmax(normalise(x) M^T / tau)[y] over the memory's non-zero
  rows (NumPy, float64): the online stage's GMM input."""
  mem = np.asarray(memory, np.float64)
  logits = _unit(np.asarray(feats, np.float64)) @ mem.T / temperature
  logits = np.where(np.any(mem != 0, axis=1)[None], logits, -np.inf)
  top = logits.max(1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
  return lse - logits[np.arange(len(labels)), labels]


def _online_epoch(setup: api.Setup, state, epoch: int, data: api.EpochData):
  """The paper pipeline's epoch start: per-modality and joint re-clustering with their
  memories (as stages 1 and 2), the MMLM matching of this epoch's clusters (the sampler's
  labels), and, while Intra is on, the GMM clean probabilities and the prototypes.

  GMM input [I] (the paper has no classifier here): each sample's ClusterNCE loss against the
  infrared memory at its matched label, i.e. how well its feature agrees with the infrared
  cluster it was matched to (view 1 and view 2 fitted together, infrared alone). The
  prototypes are the confidence-weighted means of this epoch's pre-BN features (mmm.md §7.6's
  formula) over the matched labels.
  """
  cfg = setup.config.mmm
  kept = np.flatnonzero(data.keep)
  is_ir = np.asarray(data.metadata["modality"])[kept] == INFRARED
  out = extract(setup, state, data, kept, flip=True)
  feats = _flip_average(out)
  lab_rgb, lab_ir = cluster_modalities(feats, is_ir, cfg)
  mem = dict(state.method_state)
  mem.update(_modality_memories(feats, is_ir, lab_rgb, lab_ir, cfg))
  lab_all, mem["all"] = _joint_clusters(feats, is_ir, cfg)
  moved = match_modalities(feats, is_ir, lab_rgb, lab_ir, matching=cfg.matching,
                           cost_sum_over=cfg.cost_sum_over, unmatched=cfg.unmatched,
                           off_by_one=cfg.off_by_one, sub_memories=cfg.sub_memories)
  num = len(data.keep)
  ids = np.full((num, 2), -1, np.int32)
  ids[kept[~is_ir], 0], ids[kept[is_ir], 0], ids[kept, 1] = lab_rgb, lab_ir, lab_all
  labels = np.full(num, -1, np.int64)
  labels[kept[~is_ir]], labels[kept[is_ir]] = moved, lab_ir
  if labels.max() + 1 > cfg.max_clusters:
    raise ValueError(f"the matched label space has {labels.max() + 1} labels, more than "
                     f"mmm.max_clusters={cfg.max_clusters}; raise mmm.max_clusters")
  mem["ids"] = jnp.asarray(ids)
  if cfg.intra and epoch >= cfg.intra_start:
    pos_rgb = np.flatnonzero(~is_ir)[moved >= 0]
    pos_ir = np.flatnonzero(is_ir)[lab_ir >= 0]
    rgb, ir = kept[pos_rgb], kept[pos_ir]
    y_rgb, y_ir = labels[rgb], labels[ir]
    exchange = np.random.default_rng([setup.config.seed, epoch, 7]).integers(0, 3, len(rgb))
    o2 = extract(setup, state, data, rgb, exchange=exchange)
    m_ir = np.asarray(mem["ir"])
    nll = lambda f, y: nce_losses(f, y, m_ir, cfg.temperature)  # noqa: E731
    w1, w2 = cluster_lib.clean_probability(nll(out["bn"][pos_rgb], y_rgb),
                                           nll(o2["bn"], y_rgb))
    (wi,) = cluster_lib.clean_probability(nll(out["bn"][pos_ir], y_ir))
    weights = np.ones((num, 3), np.float32)
    weights[rgb, 0], weights[rgb, 1], weights[ir, 2] = w1, w2, wi
    mem["weights"] = jnp.asarray(weights)
    mem["proto"] = jnp.asarray(_prototypes(
        [(rgb, y_rgb, out["pre"][pos_rgb], 0), (rgb, y_rgb, o2["pre"], 1),
         (ir, y_ir, out["pre"][pos_ir], 2)], weights, np.zeros(mem["proto"].shape, np.float32)))
    _log(data, {"weight_rgb_mean": float(np.mean(np.concatenate([w1, w2]))),
                "weight_ir_mean": float(np.mean(wi))}, kind="gmm")
  if cfg.diagnostics:
    logged = _diagnostics(data, kept, is_ir, lab_rgb, lab_ir, joint=False)
    cmc = _diagnostics(data, kept, is_ir, lab_all[~is_ir], lab_all[is_ir], joint=True)
    logged.update({f"cmc_{k}": v for k, v in cmc.items()})
    # The matched labels' cross-modality numbers keep the plain names (as after MMLM).
    matched = _diagnostics(data, kept, is_ir, moved, lab_ir, joint=True)
    logged.update({k: matched[k] for k in JOINT_KEYS})
    logged["matched_classes"] = float(len(np.unique(labels[labels >= 0])))
    _log(data, logged)
  return state.replace(method_state=mem), labels


def on_epoch_start(setup: api.Setup, state, epoch: int, data: api.EpochData):
  """Re-clustering (stages 1, 2), the GMM / prototype pass (final), or both with the
  per-epoch matching (online) before an epoch."""
  stage = setup.config.mmm.stage
  if stage == "final":
    return _final_epoch(setup, state, epoch, data)
  if stage == "online":
    return _online_epoch(setup, state, epoch, data)
  return _recluster(setup, state, epoch, data)


# --- Export and MMLM (between stage 2 and the final stage) ----------------------------------


def export_and_match(config: dict[str, Any], run_dir: str | os.PathLike,
                     out_dir: str | os.PathLike, *, matching: str = "greedy",
                     cost_sum_over: str = "ir", unmatched: str = "nearest",
                     off_by_one: bool = False, sub_memories: int = 4) -> dict[str, Any]:
  """Stage 2's export and the MMLM step (mmm.md §5.6, §6): writes `<out_dir>/labels.npz`.

  Restores the latest checkpoint of the stage-2 run in `run_dir` (its config `config`),
  clusters each modality once (k1, k2, eps of the config's `mmm` section), splits every cluster
  into `sub_memories` k-means sub-centres, matches visible to infrared clusters and moves the
  visible labels into the infrared label space. The labels are saved with the records' paths
  (`load_labels`), the features next to them (features.npy, record order), and a summary in
  mmlm.json: cluster counts, the label space's size (`num_classes`) and the diagnostics
  before and after the matching.

  Returns:
    The summary (also in `<out_dir>/mmlm.json`).
  """
  from maumjax.data import pipeline as pipeline_lib
  from maumjax.train import checkpoint as checkpoint_lib
  from maumjax.train import inputs

  out_dir = Path(out_dir)
  prepared, pipe_cfg, pipe, source = inputs.prepare(config)
  setup = init(config, inputs.data_info(pipe, config), seed=config["seed"])
  with checkpoint_lib.Checkpointer(Path(run_dir)) as ckpt:
    state, _ = ckpt.restore(setup.state)
  del prepared
  data = api.EpochData(metadata=pipe.metadata, keep=pipe.keep, labels=pipe.metadata["label"],
                       images=pipe.store.__getitem__, pipeline=pipe_cfg)
  cfg = setup.config.mmm
  kept = np.flatnonzero(pipe.keep)
  is_ir = np.asarray(pipe.metadata["modality"])[kept] == INFRARED
  feats = cluster_features(setup, state, data, kept)
  lab_rgb, lab_ir = cluster_modalities(feats, is_ir, cfg)
  moved = match_modalities(feats, is_ir, lab_rgb, lab_ir, matching=matching,
                           cost_sum_over=cost_sum_over, unmatched=unmatched,
                           off_by_one=off_by_one, sub_memories=sub_memories)
  labels = np.full(len(pipe.keep), -1, np.int64)
  labels[kept[~is_ir]] = moved
  labels[kept[is_ir]] = lab_ir
  num_classes = int(labels.max()) + 1
  summary: dict[str, Any] = {
      "clusters_rgb": int(lab_rgb.max()) + 1, "clusters_ir": int(lab_ir.max()) + 1,
      "num_classes": num_classes, "matching": matching, "cost_sum_over": cost_sum_over,
      "unmatched": unmatched, "off_by_one": off_by_one, "sub_memories": sub_memories}
  if cfg.diagnostics:
    summary["before"] = _diagnostics(data, kept, is_ir, lab_rgb, lab_ir, joint=False)
    summary["after"] = _diagnostics(data, kept, is_ir, moved, lab_ir, joint=True)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = pipeline_lib.read_paths(source)
  full = np.zeros((len(pipe.keep), feats.shape[1]), np.float32)
  full[kept] = feats
  _atomic_save(out_dir / "features.npy", lambda f: np.save(f, full))
  _atomic_save(out_dir / LABELS_FILE, lambda f: np.savez(f, path=paths, label=labels))
  _atomic_save(out_dir / "mmlm.json",
               lambda f: f.write(json.dumps(summary, indent=1, default=_json_safe).encode()))
  return summary


def _json_safe(x):
  return float(x) if isinstance(x, (np.floating, np.integer)) else str(x)


def _atomic_save(path: Path, write) -> None:
  """Writes `path` through a temporary file in the same folder, so a failure leaves nothing
  half-written."""
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
