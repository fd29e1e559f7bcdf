"""Two-stream re-ID network: modality-specific early stages, a shared trunk, global/part heads.

Layout (maum.md §2, AGW): stages [0, specific_stages) exist once per modality (`rgb`, `ir`);
stages [specific_stages, 5) are `shared`. In training, the RGB and IR batches run through their
own stages, are concatenated as [RGB; IR] with a static split, and take one pass through the
shared trunk, so shared BatchNorm statistics cover both modalities as in the references.

AGW / MMM (mmm.md §3) is `specific_stages=1, head='global', non_local='agw'` with
`pool='gem_mean_eps'` (MMM's GeM form): the non-local blocks sit in layer2 and layer3, hence in
`shared`.

Create variables with `ReidNet(...).init(key, rgb, ir, train=False)`: `__call__` touches both
streams, so both get parameters, and `train=False` keeps init from needing a mutable
`batch_stats` (the running averages are created either way). `init(key, images, modality,
method='embed')` creates the same variables, since `embed` also runs both streams.

Test time (maum.md §7): `embed` routes each image through its own modality's stages, then the
shared trunk and heads with running statistics, and returns the concatenated L2-normalised
BN-neck features (global first, then each part normalised separately).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maumjax.models.heads import GlobalHead, PartHead, l2_normalize
from maumjax.models.resnet import (
  NUM_STAGES,
  ResNet,
  get_arch,
  non_local_positions,
  stage_output_channels,
)

# Integer modality codes, as the data pipeline stores them (`modality = camera is IR`).
MODALITY_RGB = 0
MODALITY_IR = 1
HEADS = ("global", "parts", "both")


class ReidNet(nn.Module):
  """ResNet backbone with modality-specific early stages and global and/or part heads.

  Attributes:
    arch: backbone variant, a key of `maumjax.models.resnet.ARCHS`.
    last_stride: layer4 stride; 1 (re-ID default) or 2.
    specific_stages: stages [0, specific_stages) are modality-specific; 0 = fully shared,
      1 = two-stream stem (AGW default), up to 5 = two complete backbones.
    head: 'global', 'parts' or 'both'.
    pool: global-head pooling, 'gem', 'avg' or 'gem_mean_eps' (`maumjax.models.heads.POOLS`).
    part_pool: stripe pooling, one of the same.
    gem_p: GeM power for both heads.
    num_parts: number of horizontal stripes.
    part_dim: reduced dimension per part.
    axis_name: mapped axis for synchronised BN under shard_map/pmap; None otherwise.
    dtype: backbone compute dtype; parameters and head outputs stay float32.
    non_local: 'none' or 'agw' (AGW's non-local blocks in layer2 and layer3, in whichever of
      the streams and the shared trunk runs those stages; `maumjax.models.resnet.NonLocal`).
  """

  arch: str = "resnet50"
  last_stride: int = 1
  specific_stages: int = 1
  head: str = "parts"
  pool: str = "gem"
  part_pool: str = "gem"
  gem_p: float = 3.0
  num_parts: int = 6
  part_dim: int = 256
  axis_name: str | None = None
  dtype: Any = jnp.float32
  non_local: str = "none"

  def setup(self) -> None:
    get_arch(self.arch)
    non_local_positions(self.arch, self.non_local)  # validates the name
    if not 0 <= self.specific_stages <= NUM_STAGES:
      raise ValueError(
          f"specific_stages must be in [0, {NUM_STAGES}] (0 = fully shared, 1 = two-stream "
          f"stem), got {self.specific_stages}")
    if self.head not in HEADS:
      raise ValueError(f"unknown head {self.head!r}; use one of {HEADS}")
    backbone = {"arch": self.arch, "last_stride": self.last_stride,
                "axis_name": self.axis_name, "dtype": self.dtype, "non_local": self.non_local}
    if self.specific_stages > 0:
      self.rgb = ResNet(start=0, stop=self.specific_stages, **backbone)
      self.ir = ResNet(start=0, stop=self.specific_stages, **backbone)
    if self.specific_stages < NUM_STAGES:
      self.shared = ResNet(start=self.specific_stages, stop=NUM_STAGES, **backbone)
    if self.head in ("global", "both"):
      self.global_head = GlobalHead(self.pool, self.gem_p, self.axis_name)
    if self.head in ("parts", "both"):
      self.parts_head = PartHead(self.num_parts, self.part_dim, self.part_pool, self.gem_p,
                                 self.axis_name)

  @property
  def head_groups(self) -> tuple[str, ...]:
    """Output groups in order: ('global',), ('parts',) or ('global', 'parts')."""
    return {"global": ("global",), "parts": ("parts",), "both": ("global", "parts")}[self.head]

  @property
  def feature_dim(self) -> int:
    """Width of `embed`'s output: C (global) and/or num_parts * part_dim (parts)."""
    dims = {"global": stage_output_channels(self.arch), "parts": self.num_parts * self.part_dim}
    return sum(dims[g] for g in self.head_groups)

  def _trunk_and_heads(self, x: jax.Array, train: bool) -> dict[str, dict[str, jax.Array]]:
    if self.specific_stages < NUM_STAGES:
      x = self.shared(x, train=train)
    out = {}
    if self.head in ("global", "both"):
      out["global"] = self.global_head(x, train=train)
    if self.head in ("parts", "both"):
      out["parts"] = self.parts_head(x, train=train)
    return out

  def __call__(self, rgb: jax.Array, ir: jax.Array, *,
               train: bool) -> dict[str, dict[str, jax.Array]]:
    """Runs a mixed batch; rows are [rgb; ir] in every output.

    Args:
      rgb: [Bv, H, W, 3] normalised RGB images (Bv > 0).
      ir: [Bi, H, W, 3] normalised IR images (Bi > 0), same H and W.
      train: batch statistics (update them with `mutable=['batch_stats']`) if True.

    Returns:
      {'global': {'pre', 'bn'}: [Bv+Bi, 1, C]} and/or {'parts': {'pre', 'bn'}:
      [Bv+Bi, num_parts, part_dim]}, all float32.

    Raises:
      ValueError: the two batches differ in image size or channels.
    """
    if rgb.shape[1:] != ir.shape[1:]:
      raise ValueError(
          f"rgb and ir images must have the same [H, W, C]; got rgb {rgb.shape} and ir "
          f"{ir.shape}. Resize both modalities to the same input size")
    if self.specific_stages > 0:
      x = jnp.concatenate([self.rgb(rgb, train=train), self.ir(ir, train=train)], axis=0)
    else:
      x = jnp.concatenate([rgb, ir], axis=0)
    return self._trunk_and_heads(x, train)

  def embed(self, images: jax.Array, modality: jax.Array) -> jax.Array:
    """Test-time features: per-modality routing, running statistics, normalised BN-neck.

    Both modality streams run on the whole batch and each row keeps its own modality's
    result; this costs the specific stages twice but keeps shapes static and jit simple.

    Args:
      images: [B, H, W, 3] normalised images.
      modality: [B] integer codes, MODALITY_RGB (0) or MODALITY_IR (1).

    Returns:
      [B, feature_dim] float32: the L2-normalised global BN feature, then each part's
      L2-normalised BN feature, concatenated.
    """
    if self.specific_stages > 0:
      is_ir = (jnp.asarray(modality) == MODALITY_IR)[:, None, None, None]
      x = jnp.where(is_ir, self.ir(images, train=False), self.rgb(images, train=False))
    else:
      x = images
    out = self._trunk_and_heads(x, train=False)
    feats = [l2_normalize(out[g]["bn"], axis=-1) for g in self.head_groups]
    return jnp.concatenate([f.reshape(f.shape[0], -1) for f in feats], axis=-1)


# The derived stems are BDF's (`stems='four'`, maumjax/models/bdf.py).
BACKBONE_MODULES = ("rgb", "ir", "shared", "rgb_derived", "ir_derived")


def head_dims(model: ReidNet, variables,
              image_shape: tuple[int, int]) -> dict[str, tuple[int, int]]:
  """(heads, width) per output group, read from a forward pass's shapes (no compute)."""
  shape = (1, *image_shape, 3)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), jnp.zeros(shape),
                                             train=False), variables)
  return {g: (o["bn"].shape[1], o["bn"].shape[2]) for g, o in out.items()}


def param_groups(params, *, model_key: str = "model") -> Any:
  """'backbone' for the ResNet stages (both stems and the shared trunk), 'head' otherwise.

  Args:
    params: a method's parameter tree whose `params[model_key]` holds a ReidNet's params;
      everything else (proxies, classifiers) is 'head'.
    model_key: the key of the ReidNet's params.

  Returns:
    The same tree with 'backbone' or 'head' at every leaf (for `train.optim.make_optimizer`).
  """

  def label(path, _):
    keys = [getattr(p, "key", None) for p in path]
    return ("backbone" if len(keys) > 1 and keys[0] == model_key
            and keys[1] in BACKBONE_MODULES else "head")

  return jax.tree_util.tree_map_with_path(label, params)
