"""BDF's network: one ResNet over the four modalities [V; I; V^; I^], a global head, a classifier.

Layout (bdf.md §3, [I]): ResNet (last stride 1), GeM or average pooling, a BN-neck with the
bias frozen at zero (`heads.BNNeck`), one shared bias-free classifier over the C identities.
The stems switch (`stems`, bdf.md §7 row 5) chooses how the four modalities enter the network:

  shared     (default) one network for all four: the derivatives can only bridge the two
             modalities if they pass through the same weights;
  by_origin  AGW-style modality-specific stems (stage 0), V and V^ through the visible stem
             (`rgb`), I and I^ through the infrared one (`ir`), a shared trunk after them;
  four       four stems (`rgb`, `ir`, `rgb_derived`, `ir_derived`), a shared trunk.

The backbone's module names are those of `ReidNet` (`rgb`, `ir`, `shared`, plus the two derived
stems), so `weights.load_backbone` loads ImageNet weights into every stem and the trunk, and
`reid.param_groups` gives them the backbone's learning rate.

The learnable derivation of I^ (`derive_ir='learnable_1x1'`, bdf.md §2 candidate 1) is the
`ColourMap` submodule `colour_map`: a per-pixel 3 -> 3 affine map (a 1x1 convolution), trained
end to end with the re-ID losses. Its kernel is stored as `identity + delta` with `delta` and
the bias initialised to zero, so the map starts as the identity and weight decay pulls it back
towards the identity rather than towards a black image.

Test time (`embed`): base features only, each image through its own modality's stem; with
`tta_derivative` (bdf.md §5, §7 row 6) the L2-normalised features of x and of derive(x) are
averaged. The test images arrive normalised (ImageNet mean and std), so the derivation first
recovers their uint8 pixels; a random derivation (`contrast_gamma`) uses the fixed key
`TTA_KEY`, so the features are deterministic.

Create variables with `BDFNet(...).init(key, images, train=False)` (the classifier and, with
`learnable_1x1`, the colour map are created then; `embed` alone does not touch the classifier).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maumjax.data import augment
from maumjax.data import derive as derive_lib
from maumjax.losses.metric import l2_normalize
from maumjax.models.heads import GlobalHead, check_num_classes
from maumjax.models.reid import MODALITY_IR
from maumjax.models.resnet import NUM_STAGES, ResNet, get_arch, stage_output_channels

STEMS = ("shared", "by_origin", "four")
LEARNABLE = "learnable_1x1"
DERIVE_IR = (*derive_lib.DERIVE_IR, LEARNABLE)
DERIVE_VISIBLE = tuple(derive_lib.DERIVE_VISIBLE)
# Blocks of the training batch, in order, and the stem each one takes per `stems` setting.
BLOCKS = ("V", "I", "V^", "I^")
STEM_OF = {
    "shared": (None, None, None, None),
    "by_origin": ("rgb", "ir", "rgb", "ir"),
    "four": ("rgb", "ir", "rgb_derived", "ir_derived"),
}
TTA_KEY = 0  # PRNG seed of a random derivation at test time
# AGW's classifier init (weights_init_classifier): normal, std 0.001.
classifier_init = nn.initializers.normal(0.001)


class ColourMap(nn.Module):
  """A learnable per-pixel affine colour map on the 0..255 scale, starting at the identity.

  y = 255 * ((x / 255) @ (I + delta) + bias), no clipping (the gradient reaches every
  parameter); `delta` [3, 3] and `bias` [3] start at zero.
  """

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """float or uint8 [B, H, W, 3] on the 0..255 scale -> float32 [B, H, W, 3]."""
    delta = self.param("delta", nn.initializers.zeros, (3, 3), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (3,), jnp.float32)
    t = pixels.astype(jnp.float32) / 255.0
    kernel = jnp.eye(3, dtype=jnp.float32) + delta
    out = jnp.einsum("bhwc,cd->bhwd", t, kernel, precision=jax.lax.Precision.HIGHEST)
    return 255.0 * (out + bias)


class BDFNet(nn.Module):
  """ResNet with shared, by-origin or four stems, a global head and a shared classifier.

  Attributes:
    num_classes: training identities C (the method passes it).
    arch: backbone variant, a key of `maumjax.models.resnet.ARCHS`.
    last_stride: layer4 stride; 1 (re-ID default).
    stems: 'shared' (default), 'by_origin' or 'four' (see the module docstring).
    pool: 'gem' (p = `gem_p`) or 'avg'.
    gem_p: GeM power.
    derive_vis: how V^ is made, a key of `maumjax.data.derive.DERIVE_VISIBLE` ('grey').
    derive_ir: how I^ is made, a key of `derive.DERIVE_IR` or 'learnable_1x1' (adds
      `colour_map`).
    tta_derivative: `embed` averages the normalised base and derivative features.
    axis_name: mapped axis for synchronised BN under shard_map/pmap; None otherwise.
    dtype: backbone compute dtype; parameters, features and logits stay float32.
  """

  num_classes: int | None = None
  arch: str = "resnet50"
  last_stride: int = 1
  stems: str = "shared"
  pool: str = "gem"
  gem_p: float = 3.0
  derive_vis: str = "grey"
  derive_ir: str = "contrast_gamma"
  tta_derivative: bool = False
  axis_name: str | None = None
  dtype: Any = jnp.float32

  def setup(self) -> None:
    get_arch(self.arch)
    check_num_classes("BDFNet", self.num_classes)
    for name, value, choices in (("stems", self.stems, STEMS),
                                 ("derive_vis", self.derive_vis, DERIVE_VISIBLE),
                                 ("derive_ir", self.derive_ir, DERIVE_IR)):
      if value not in choices:
        raise ValueError(f"model.{name}={value!r}; choose one of {choices}")
    backbone = {"arch": self.arch, "last_stride": self.last_stride,
                "axis_name": self.axis_name, "dtype": self.dtype}
    for stem in sorted({s for s in STEM_OF[self.stems] if s is not None}):
      setattr(self, stem, ResNet(start=0, stop=1, **backbone))
    self.shared = ResNet(start=self.specific_stages, stop=NUM_STAGES, **backbone)
    self.global_head = GlobalHead(self.pool, self.gem_p, self.axis_name)
    self.classifier = nn.Dense(self.num_classes, use_bias=False, dtype=jnp.float32,
                               param_dtype=jnp.float32, kernel_init=classifier_init)
    if self.derive_ir == LEARNABLE:
      self.colour_map = ColourMap()

  @property
  def specific_stages(self) -> int:
    """Stages before the shared trunk: 0 with `stems='shared'`, else 1 (the stem)."""
    return 0 if self.stems == "shared" else 1

  @property
  def feature_dim(self) -> int:
    """Width of 'feat', 'bn' and `embed`'s output."""
    return stage_output_channels(self.arch)

  def _stem(self, name: str | None, x: jax.Array, train: bool) -> jax.Array:
    return x if name is None else getattr(self, name)(x, train=train)

  def _stems(self, blocks: list[jax.Array], train: bool) -> jax.Array:
    """Each block through its stem; blocks sharing a stem take one pass (one BN batch)."""
    names = STEM_OF[self.stems][:len(blocks)]
    if self.specific_stages == 0:
      return jnp.concatenate(blocks, axis=0)
    out = [None] * len(blocks)
    for stem in dict.fromkeys(names):
      idx = [i for i, s in enumerate(names) if s == stem]
      mapped = self._stem(stem, jnp.concatenate([blocks[i] for i in idx], axis=0), train)
      for j, i in enumerate(idx):
        n = blocks[i].shape[0]
        out[i] = mapped[j * n:(j + 1) * n]
    return jnp.concatenate(out, axis=0)

  def _head(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    x = self.shared(x, train=train)
    out = self.global_head(x, train=train)
    feat, bn = out["pre"][:, 0], out["bn"][:, 0]
    return {"feat": feat, "bn": bn}

  def __call__(self, images: jax.Array, *, train: bool, num_blocks: int = 4) -> dict[str, Any]:
    """Runs the training batch [V; I; V^; I^] (or [V; I] with `num_blocks=2`).

    Args:
      images: [num_blocks * n, H, W, 3] normalised images, blocks of n rows in `BLOCKS`
        order.
      train: batch statistics (update them with `mutable=['batch_stats']`) if True.
      num_blocks: 4 (base and derivative) or 2 (base only, the `base` row).

    Returns:
      float32 'feat' [B, D] (pre-BN, the triplet losses' feature), 'bn' [B, D] (BN-neck) and
      'logits' [B, num_classes].
    """
    if num_blocks not in (2, 4) or images.shape[0] % num_blocks:
      raise ValueError(f"images: expected {num_blocks} equal blocks [V; I; V^; I^][:"
                       f"{num_blocks}], got {images.shape[0]} rows")
    if self.derive_ir == LEARNABLE and self.is_initializing():
      self.colour_map(jnp.zeros((1, 1, 1, 3), jnp.float32))
    n = images.shape[0] // num_blocks
    blocks = [images[i * n:(i + 1) * n] for i in range(num_blocks)]
    out = self._head(self._stems(blocks, train), train)
    out["logits"] = self.classifier(out["bn"])
    return out

  def colour(self, pixels: jax.Array) -> jax.Array:
    """The learnable colour map (`derive_ir='learnable_1x1'`) on 0..255 pixels."""
    if self.derive_ir != LEARNABLE:
      raise ValueError(f"model.derive_ir={self.derive_ir!r} has no learnable colour map")
    return self.colour_map(pixels)

  def derive_pixels(self, pixels: jax.Array, key: jax.Array, *, infrared: bool) -> jax.Array:
    """The derivative of uint8 base pixels: uint8 (fixed derivations) or float32 0..255
    (the learnable colour map)."""
    if not infrared:
      return derive_lib.derive(pixels, key, self.derive_vis)
    if self.derive_ir == LEARNABLE:
      return self.colour(pixels)
    return derive_lib.derive(pixels, key, self.derive_ir)

  def embed(self, images: jax.Array, modality: jax.Array) -> jax.Array:
    """Test-time features: each image through its own modality's stem, running statistics.

    Args:
      images: [B, H, W, 3] images normalised with the ImageNet mean and std.
      modality: [B] integer codes, 0 visible, 1 infrared.

    Returns:
      [B, D] float32: the L2-normalised BN-neck feature of the base image; with
      `tta_derivative`, the mean of it and the normalised feature of the derivative.
    """
    is_ir = (jnp.asarray(modality) == MODALITY_IR)
    base = l2_normalize(self._embed_blocks(images, is_ir, derived=False), axis=-1)
    if not self.tta_derivative:
      return base
    pixels = _unnormalize(images)
    key = jax.random.PRNGKey(TTA_KEY)
    derived = jnp.where(is_ir[:, None, None, None],
                        self.derive_pixels(pixels, key, infrared=True).astype(jnp.float32),
                        self.derive_pixels(pixels, key, infrared=False).astype(jnp.float32))
    images_d = augment._normalize_jnp(derived, augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    feats_d = l2_normalize(self._embed_blocks(images_d, is_ir, derived=True), axis=-1)
    return (base + feats_d) / 2.0

  def _embed_blocks(self, images: jax.Array, is_ir: jax.Array, *, derived: bool) -> jax.Array:
    names = STEM_OF[self.stems]
    vis, ir = (names[2], names[3]) if derived else (names[0], names[1])
    if self.specific_stages == 0:
      x = images
    else:
      x = jnp.where(is_ir[:, None, None, None], self._stem(ir, images, False),
                    self._stem(vis, images, False))
    return self._head(x, False)["bn"]


def _unnormalize(images: jax.Array) -> jax.Array:
  """Normalised float images (ImageNet mean and std) -> their uint8 pixels (rounded)."""
  mean = jnp.asarray(augment.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(augment.IMAGENET_STD, jnp.float32)
  return jnp.clip(jnp.round((images.astype(jnp.float32) * std + mean) * 255.0), 0,
                  255).astype(jnp.uint8)
