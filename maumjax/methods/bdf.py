"""BDF, the Base-Derivative Framework (ICPR 2020, "A Base-Derivative Framework for
Cross-Modality RGB-Infrared Person Re-Identification"), as a method of the shared trainer.
Spec: ../shared/spec/bdf.md.

Confirmed (the paper's poster, bdf.md §1): two auxiliary "derivative" modalities, each derived
from one base modality (visible V, infrared I), turn the problem into four-modality learning;
the network sees doubled input images; three losses: DID, MML (the two-mode intra-modality
triplet enlarged to all four modes) and MDL (multi-directional cross-modality). Everything
else is a reconstruction [I] with a switch (bdf.md §2-§7); the defaults are the spec's.

Each step (on the device, after the spatial augmentation and before normalisation, so a base
image and its derivative are pixel-aligned; `derive_where`):

    V^ = derive_vis(V)  (BT.601 grey)      I^ = derive_ir(I)  (contrast_gamma by default)
    batch = [V; I; V^; I^]  -> BDFNet (one shared ResNet by default, `model.stems`)
    L = w_id L_DID + w_mml L_MML + w_mdl L_MDL   (each a mean over its terms, bdf.md §4)

* L_DID (`losses.did_loss`): identity CE of the shared classifier on the BN-neck features over
  the four modalities (`did_mode='ce_plus_consistency'` adds the base-derivative posterior
  consistency);
* L_MML, L_MDL (`losses.mml_mdl_losses`, one distance matrix): batch-hard triplets (margin 0.3)
  on the pre-BN features, MML inside each mode plus V -> V^ and I -> I^ (`homologous='intra'`),
  MDL over the 8 heterogeneous directions (`homologous='cross'` moves the four base-derivative
  directions from MML to MDL, bdf.md §7 row 4).

Rows (experiments/configs/bdf.py): `base` (no derivatives: identity CE + AGW's batch-hard
triplet over [V; I], `tri`), `did` (derivative inputs, CE only), `did_mml`, `did_mdl`, `full`.

Test time: base features only (`BDFNet.embed`); `model.tta_derivative` averages the normalised
base and derivative features.

Randomness: `contrast_gamma` draws one gamma and one contrast per image from the step's key
folded with the image's position in the global batch, so a run on 4 devices derives the same
images as on one. `derive_where='before_augment'` derives from the shipped image and augments
the derivative with the augmentation parameters of the next image in the device's shard (an
independent draw from the same distribution; the shipped batch carries one draw per image).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from maumjax import losses
from maumjax import models as models_lib
from maumjax.data import augment
from maumjax.data import derive as derive_lib
from maumjax.methods import api
from maumjax.models import bdf as bdf_model
from maumjax.models import reid as reid_lib
from maumjax.train import optim
from maumjax.train import state as state_lib

DERIVE_WHERE = ("after_augment", "before_augment")
HOMOLOGOUS = ("intra", "cross")
BASE_PAIRS = ((0, 2), (1, 3))  # V -> V^, I -> I^


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """BDF's training switches (defaults: bdf.md §2-§7, all [I] except the three losses' names).

  Attributes:
    derivatives: the derivative modalities on (False: the `base` row, [V; I] only).
    derive_where: 'after_augment' (default; derive from the augmented pixels, pixel-aligned)
      or 'before_augment' (derive from the shipped image; the derivative is augmented on its
      own). bdf.md §7 row 8.
    w_id: weight of the identity term (L_DID; plain CE over [V; I] without derivatives).
    did_mode: 'ce' (default) or 'ce_plus_consistency' (bdf.md §7 row 2).
    label_smoothing: epsilon of the CE (0; 0.1 optional, bdf.md §4).
    tri: AGW's batch-hard triplet over the whole batch (the `base` row's metric loss).
    w_tri: its weight.
    mml: L_MML on; w_mml its weight lambda1 (1).
    mdl: L_MDL on; w_mdl its weight lambda2 (1).
    margin: triplet margin rho of every triplet term (0.3).
    family: MML / MDL's triplet form, 'batch_hard' (single images, default; per direction it
      is BDTR's bi-directional top-ranking loss) or 'center' (over identity centres, the
      hetero-center idea). bdf.md §7 row 3.
    homologous: 'intra' (default: V -> V^ and I -> I^ are MML terms) or 'cross' (V <-> V^ and
      I <-> I^, both directions, are MDL terms). bdf.md §7 row 4.
  """

  derivatives: bool = True
  derive_where: str = "after_augment"
  w_id: float = 1.0
  did_mode: str = "ce"
  label_smoothing: float = 0.0
  tri: bool = False
  w_tri: float = 1.0
  mml: bool = True
  w_mml: float = 1.0
  mdl: bool = True
  w_mdl: float = 1.0
  margin: float = 0.3
  family: str = "batch_hard"
  homologous: str = "intra"

  def __post_init__(self):
    for name, value, choices in (("derive_where", self.derive_where, DERIVE_WHERE),
                                 ("did_mode", self.did_mode, losses.DID_MODES),
                                 ("homologous", self.homologous, HOMOLOGOUS),
                                 ("family", self.family, tuple(losses.FAMILIES))):
      if value not in choices:
        raise ValueError(f"loss.{name}={value!r}; choose one of {choices}")
    if not self.derivatives and self.did_mode != "ce":
      raise ValueError(f"loss.did_mode={self.did_mode!r} needs the derivative modalities; "
                       "set loss.derivatives=True or loss.did_mode='ce'")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"loss.label_smoothing={self.label_smoothing} must be in [0, 1)")
    if not (self.mml or self.mdl or self.tri or self.w_id):
      raise ValueError("every BDF loss term is off; turn on loss.mml, loss.mdl, loss.tri or "
                       "give loss.w_id a weight")

  @property
  def num_blocks(self) -> int:
    """4 ([V; I; V^; I^]) with derivatives, else 2 ([V; I])."""
    return 4 if self.derivatives else 2

  def pairs(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """(MML directions, MDL directions) as (anchor group, target group) over the blocks."""
    if not self.derivatives:
      return ((0, 0), (1, 1)), ((0, 1), (1, 0))
    if self.homologous == "intra":
      return losses.MML_PAIRS, losses.MDL_PAIRS
    intra = tuple(p for p in losses.MML_PAIRS if p not in BASE_PAIRS)
    both = BASE_PAIRS + tuple((b, a) for a, b in BASE_PAIRS)
    return intra, losses.MDL_PAIRS + both


@dataclasses.dataclass(frozen=True)
class Settings:
  """What BDF's step reads: the loss switches and each modality's augmentation config (the
  derivative images are normalised, erased and channel-mixed as their bases)."""

  loss: LossConfig
  augment_rgb: augment.AugmentConfig
  augment_ir: augment.AugmentConfig


def init(config: dict[str, Any], data: api.DataInfo, *, seed: int = 0) -> api.Setup:
  """Builds BDFNet, the optimiser and the initial train state."""
  loss = LossConfig(**config["loss"])
  pipe = config["data"]["pipeline"]
  if loss.derivatives and pipe.get("augment_on", "device") != "device":
    raise ValueError("BDF derives its images from the augmented pixels on the device; set "
                     f"data.pipeline.augment_on='device' (it is {pipe['augment_on']!r})")
  model_cfg = dict(config["model"])
  if model_cfg.get("name", "bdf") != "bdf":
    raise ValueError(f"model.name={model_cfg['name']!r}; BDF trains model.name='bdf'")
  model_cfg["name"] = "bdf"
  model = models_lib.model_from_config(model_cfg, num_classes=data.num_classes)
  dummy = jnp.zeros((4, *data.image_shape, 3), jnp.float32)  # one image per block
  variables, report = api.init_model(
      model, jax.random.PRNGKey(seed), (dummy,), model_cfg.get("pretrained", ""))
  params = {"model": variables["params"]}
  tx = optim.make_optimizer(optim.OptimConfig(**config["optim"]), data.steps_per_epoch,
                            reid_lib.param_groups)
  state = state_lib.TrainState.create(params=params, batch_stats=variables["batch_stats"],
                                      tx=tx, seed=seed)
  settings = Settings(loss, augment.preset(pipe.get("augment_rgb", "agw")),
                      augment.preset(pipe.get("augment_ir", "agw")))
  return api.Setup(model=model, tx=tx, state=state, config=settings, data=data,
                   load_report=report)


def phase(setup: api.Setup, epoch: int) -> int:
  """BDF trains one phase."""
  return 0


def describe_phase(setup: api.Setup, phase_: int) -> str | None:
  """The line printed at the start: what the network sees besides the shipped images."""
  del phase_
  loss, model = setup.config.loss, setup.model
  if not loss.derivatives:
    return "bdf: base row, the network sees the [V; I] batch only (no derivatives)"
  return (f"bdf: each step derives V^ ({model.derive_vis}) and I^ ({model.derive_ir}) "
          f"{loss.derive_where.replace('_', ' ')}: the network sees [V; I; V^; I^], twice the "
          "shipped images")


def loss_weights(loss: LossConfig) -> dict[str, float]:
  """{term: weight} of the enabled terms: 'did' ('id' without derivatives), 'tri', 'mml',
  'mdl'."""
  weights = {("did" if loss.derivatives else "id"): loss.w_id}
  if loss.tri:
    weights["tri"] = loss.w_tri
  if loss.mml:
    weights["mml"] = loss.w_mml
  if loss.mdl:
    weights["mdl"] = loss.w_mdl
  return weights


def compute_losses(out: dict[str, jax.Array], labels: jax.Array,
                   loss: LossConfig) -> dict[str, jax.Array]:
  """Every enabled BDF term on one (global) batch, unweighted.

  Args:
    out: the model's outputs ('feat', 'logits') over the blocks [V; I; V^; I^] (or [V; I]),
      each block of n rows.
    labels: [num_blocks * n] int (a derivative block repeats its base block's labels).
    loss: switches.
  """
  blocks = loss.num_blocks
  n = labels.shape[0] // blocks
  terms = {}
  if loss.derivatives:
    terms["did"] = losses.did_loss(out["logits"], labels, mode=loss.did_mode,
                                   label_smoothing=loss.label_smoothing)
  else:
    ce = losses.softmax_cross_entropy(out["logits"].astype(jnp.float32), labels,
                                      label_smoothing=loss.label_smoothing)
    terms["id"] = jnp.mean(ce.reshape(blocks, n).mean(axis=1))
  if loss.tri:
    terms["tri"] = losses.batch_hard_triplet(out["feat"], labels, margin=loss.margin)
  if loss.mml or loss.mdl:
    mml_pairs, mdl_pairs = loss.pairs()
    groups = jnp.repeat(jnp.arange(blocks, dtype=jnp.int32), n)
    mml, mdl = losses.mml_mdl_losses(out["feat"], labels, margin=loss.margin, groups=groups,
                                     family=loss.family,
                                     mml_pairs=mml_pairs if loss.mml else (),
                                     mdl_pairs=mdl_pairs if loss.mdl else ())
    if loss.mml:
      terms["mml"] = mml
    if loss.mdl:
      terms["mdl"] = mdl
  return terms


def _image_keys(rng: jax.Array, n: int, ctx: api.StepContext) -> jax.Array:
  """[n] keys of this device's images, from their positions in the global batch."""
  first = 0 if ctx.axis_name is None else jax.lax.axis_index(ctx.axis_name) * n
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(first + jnp.arange(n))


def _fixed_derivation(name: str):
  """A parameter-free derivation applied image by image with one key each."""
  fn = {**derive_lib.DERIVE_VISIBLE, **derive_lib.DERIVE_IR}[name]
  return jax.vmap(lambda image, key: fn(image[None], key)[0])


def derived_images(model: bdf_model.BDFNet, params: Any, part: dict[str, jax.Array],
                   key: jax.Array, *, infrared: bool, where: str,
                   cfg: augment.AugmentConfig, ctx: api.StepContext) -> jax.Array:
  """The normalised derivative images of one modality's device batch.

  Args:
    model: the BDFNet (its `derive_vis` / `derive_ir`; the colour map's parameters).
    params: the model's parameters (`params['model']`).
    part: the modality's batch with 'raw', 'pixels' and 'aug' (`StepParts.pixels`).
    key: this step's key for the modality.
    infrared: which derivation (I^ or V^).
    where: 'after_augment' or 'before_augment'.
    cfg: the modality's augmentation config.
    ctx: the step context (the device's position in the global batch).

  Returns:
    float32 [n, H, W, 3], normalised as the base images are.
  """
  aug = part["aug"]
  if where == "after_augment":
    pixels = part["pixels"]
  else:
    aug = jax.tree.map(lambda a: jnp.roll(a, -1, axis=0), aug)
    pixels = part["raw"]
  name = model.derive_ir if infrared else model.derive_vis
  if name == bdf_model.LEARNABLE:
    if where == "before_augment":  # a per-pixel map: applied after the spatial part
      pixels = augment.apply_jax_pixels(pixels, aug, cfg)
    derived = model.apply({"params": params}, pixels, method=bdf_model.BDFNet.colour)
  else:
    keys = _image_keys(key, pixels.shape[0], ctx)
    derived = _fixed_derivation(name)(pixels, keys)
    if where == "before_augment":
      derived = augment.apply_jax_pixels(derived, aug, cfg)
  return augment.apply_jax_tensor(derived, aug, cfg)


def step_parts(setup: api.Setup, phase_: int, ctx: api.StepContext) -> api.StepParts:
  """BDF's pieces of the train step."""
  del phase_
  settings: Settings = setup.config
  loss = settings.loss
  model = setup.model.clone(axis_name=ctx.bn_axis_name)
  blocks = loss.num_blocks

  def loss_fn(params, state: state_lib.TrainState, batch, rng):
    rgb, ir = batch["rgb"], batch["ir"]
    images = [rgb["image"], ir["image"]]
    if loss.derivatives:
      key_v, key_i = jax.random.split(rng)
      images += [
          derived_images(model, params["model"], rgb, key_v, infrared=False,
                         where=loss.derive_where, cfg=settings.augment_rgb, ctx=ctx),
          derived_images(model, params["model"], ir, key_i, infrared=True,
                         where=loss.derive_where, cfg=settings.augment_ir, ctx=ctx)]
    n = images[0].shape[0]
    out, updates = model.apply({"params": params["model"], "batch_stats": state.batch_stats},
                               jnp.concatenate(images), train=True, num_blocks=blocks,
                               mutable=["batch_stats"])
    # The global batch, block by block: [all V; all I; all V^; all I^].
    out = {k: jnp.concatenate([ctx.gather(v[i * n:(i + 1) * n]) for i in range(blocks)])
           for k, v in out.items()}
    base_labels = [ctx.gather(rgb["label"]), ctx.gather(ir["label"])]
    labels = jnp.concatenate(base_labels * (blocks // 2)).astype(jnp.int32)
    return compute_losses(out, labels, loss), updates["batch_stats"]

  return api.StepParts(loss=loss_fn, weights=loss_weights(loss), pixels=loss.derivatives)


def embed(setup: api.Setup):
  """Jitted `(variables, images, modality) -> [B, D]` base features (`BDFNet.embed`)."""
  return api.model_embed(setup.model, bdf_model.BDFNet.embed)


def variables_of(state: state_lib.TrainState) -> dict[str, Any]:
  """The model's inference variables from a train state."""
  return api.model_variables(state)
