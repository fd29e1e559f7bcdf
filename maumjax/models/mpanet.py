"""MPANet: a single-stream ResNet with modality alleviation (MAM) and pattern alignment (PAM).

Layout (mpanet.md §3): one ResNet shared by both modalities, last stride 1; a MAM after layer3
and after layer4 (`modality_attention`); a PAM of `num_parts` sigmoid maps on the layer4 map
giving `num_parts` pattern features and the global feature, concatenated (patterns first, global
last); a BN-neck over the concatenation; a shared identity classifier and two modality-specific
ones (visible, infrared), all bias-free and applied to the BN-neck output.

Parameter tree (`params`):
  shared        the backbone, with torchvision names directly below it (`conv1`, `bn1`,
                `layer{1..4}_{i}`), exactly as a fully shared `ReidNet` lays it out, so
                `weights.load_backbone` and `reid.param_groups` work unchanged
  mam3, mam4    the MAMs after layer3 / layer4: `w1` [C, C/16], `w2` [C/16, C] (absent for the
                'in' variant, which has no parameters, or when `modality_attention` drops them)
  pam           `kernel` [C, num_parts] and `bias` [num_parts] (absent when `pam=False`)
  bnneck        `bn/scale` only: see below
  classifier, classifier_v, classifier_r
                `kernel` [D, num_classes] each (`CLASSIFIERS`), no bias

Frozen BN-neck bias: the reference initialises beta to 0 and never trains it, so beta is always 0.
The BN-neck here is `heads.BNNeck`, a BatchNorm with `use_bias=False`: the bias is the constant 0,
not a variable at all, so it is in no collection, gets no gradient, no weight decay and no
optimiser slot. The running mean and variance live in `batch_stats` as for every BatchNorm.

The EMA ("mean") classifiers of mutual mean learning are not part of this module: the method
keeps them in its state and computes their logits as `bn @ kernel`, initialising them from
`params[CLASSIFIERS['visible']]['kernel']` and `params[CLASSIFIERS['infrared']]['kernel']`.

Create variables with `MPANet(...).init(key, images, train=False)`; `embed` alone does not touch
the classifiers, so it would create a tree without them.

References:
  mpanet.md §3 (architecture), §10 (JAX notes); Wu et al., "Discover Cross-Modality Nuances for
  Visible-Infrared Person Re-Identification", CVPR 2021, Eq. 1-6.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maumjax.models.heads import BNNeck, check_num_classes
from maumjax.models.resnet import ResNet, conv_kernel_init, get_arch, stage_output_channels

MAM_VARIANTS = ("mam", "se", "in")
INSTANCE_NORM_EPSILON = 1e-5
# Param names of the three student classifiers; each holds `kernel` [feature_dim, num_classes].
CLASSIFIERS = {"shared": "classifier", "visible": "classifier_v", "infrared": "classifier_r"}

# torch Conv2d / Linear default weight init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# Small matmuls whose results a parity check compares: no TF32 / bf16 passes on GPU.
_HIGHEST = jax.lax.Precision.HIGHEST


def instance_norm(x: jax.Array, eps: float = INSTANCE_NORM_EPSILON) -> jax.Array:
  """Instance normalisation without affine parameters or running statistics.

  Args:
    x: [B, H, W, C]; computed in float32.
    eps: added to the variance.

  Returns:
    [B, H, W, C] float32: each sample's channel minus its mean over H x W, divided by
    sqrt(biased variance over H x W + eps).
  """
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)  # two-pass, biased
  return (x - mean) * jax.lax.rsqrt(var + eps)


def channel_gate(x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
  """The MAM / SE channel attention m = sigmoid(relu(g @ w1) @ w2), g the spatial mean of x.

  Args:
    x: [B, H, W, C].
    w1: [C, C/r], the bias-free reduction (a 1x1 conv on the pooled map).
    w2: [C/r, C], the bias-free expansion.

  Returns:
    m: [B, C] float32 in (0, 1).
  """
  g = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  hidden = jax.nn.relu(jnp.matmul(g, w1.astype(jnp.float32), precision=_HIGHEST))
  return jax.nn.sigmoid(jnp.matmul(hidden, w2.astype(jnp.float32), precision=_HIGHEST))


def modality_alleviation(x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
  """MAM: a channel gate mixing each channel with its instance-normalised self.

  F = m * x + (1 - m) * IN(x), with m = `channel_gate(x, w1, w2)` broadcast over H and W and IN
  the affine-free instance norm (eps 1e-5). Identical at train and test time.

  Args:
    x: [B, H, W, C] feature map.
    w1: [C, C/r], bias-free.
    w2: [C/r, C], bias-free.

  Returns:
    [B, H, W, C] in x's dtype (computed in float32).

  References: MPANet, CVPR 2021, Eq. 1-3; mpanet.md §3.2.
  """
  m = channel_gate(x, w1, w2)[:, None, None, :]
  out = m * x.astype(jnp.float32) + (1.0 - m) * instance_norm(x)
  return out.astype(x.dtype)


def squeeze_excitation(x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
  """The SE ablation of MAM (Table 4): m * x with the same gate and no instance norm.

  Args:
    x: [B, H, W, C]; w1: [C, C/r]; w2: [C/r, C].

  Returns:
    [B, H, W, C] in x's dtype.
  """
  m = channel_gate(x, w1, w2)[:, None, None, :]
  return (m * x.astype(jnp.float32)).astype(x.dtype)


def pattern_alignment(fmap: jax.Array, kernel: jax.Array,
                      bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  """PAM: sigmoid pattern maps from a 1x1 conv, masked average features and the global one.

  Pattern feature k is the plain mean over all H x W positions of maps_k * fmap; it is not
  divided by the mask's mass (mpanet.md §3.3).

  Args:
    fmap: [B, H, W, C] feature map; computed in float32.
    kernel: [C, l], the 1x1 conv's weight.
    bias: [l], the 1x1 conv's bias.

  Returns:
    (feats, maps): feats [B, (l + 1) * C] float32, the blocks [p_1, ..., p_l, global] of C each
    (patterns first, global last); maps [B, H, W, l] float32 in (0, 1).

  References: MPANet, CVPR 2021, Eq. 4-6; mpanet.md §3.3.
  """
  fmap = fmap.astype(jnp.float32)
  batch, height, width, _ = fmap.shape
  logits = jnp.einsum("bhwc,cl->bhwl", fmap, kernel.astype(jnp.float32), precision=_HIGHEST)
  maps = jax.nn.sigmoid(logits + bias.astype(jnp.float32))
  patterns = jnp.einsum("bhwl,bhwc->blc", maps, fmap, precision=_HIGHEST) / (height * width)
  global_feat = jnp.mean(fmap, axis=(1, 2))
  return jnp.concatenate([patterns.reshape(batch, -1), global_feat], axis=-1), maps


class ModalityAlleviation(nn.Module):
  """MAM and its Table 4 ablations on a [B, H, W, C] map.

  Attributes:
    variant: 'mam' (m * x + (1 - m) * IN(x), the default), 'se' (m * x) or 'in' (IN(x), no
      parameters).
    reduction: channel reduction r of the gate; the hidden width is max(C // r, 1).
  """

  variant: str = "mam"
  reduction: int = 16

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [B, H, W, C] to [B, H, W, C] in x's dtype; the same at train and test time."""
    if self.variant not in MAM_VARIANTS:
      raise ValueError(f"unknown MAM variant {self.variant!r}; use one of {MAM_VARIANTS}")
    if self.variant == "in":
      return instance_norm(x).astype(x.dtype)
    channels = x.shape[-1]
    hidden = max(channels // self.reduction, 1)
    # Created in the reference's ResNet constructor, so torchvision's conv init applies:
    # kaiming_normal_(fan_out) of a 1x1 conv; for a [in, out] kernel fan_out is out.
    w1 = self.param("w1", conv_kernel_init, (channels, hidden), jnp.float32)
    w2 = self.param("w2", conv_kernel_init, (hidden, channels), jnp.float32)
    if self.variant == "se":
      return squeeze_excitation(x, w1, w2)
    return modality_alleviation(x, w1, w2)


class PatternAlignment(nn.Module):
  """PAM on a [B, H, W, C] map: `num_parts` pattern features plus the global one.

  Attributes:
    num_parts: number of pattern maps l.
  """

  num_parts: int = 6

  @nn.compact
  def __call__(self, fmap: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (feats [B, (l + 1) C], maps [B, H, W, l]), both float32; see `pattern_alignment`."""
    # The reference's 1x1 conv keeps torch's default weight init; its bias starts at 0.
    kernel = self.param("kernel", torch_default_kernel_init, (fmap.shape[-1], self.num_parts),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.num_parts,), jnp.float32)
    return pattern_alignment(fmap, kernel, bias)


class SharedBackbone(nn.Module):
  """The full ResNet as two stage ranges, layer1-3 and layer4, so a MAM fits in between.

  Both ranges share this module's scope (`nn.share_scope`), so the parameters sit directly
  below it with torchvision names (`conv1`, ..., `layer4_0`), as in a single `ResNet`.

  Attributes:
    arch, last_stride, axis_name, dtype: as in `maumjax.models.resnet.ResNet`.
  """

  arch: str = "resnet50"
  last_stride: int = 1
  axis_name: str | None = None
  dtype: Any = jnp.float32

  def setup(self) -> None:
    backbone = {"arch": self.arch, "last_stride": self.last_stride,
                "axis_name": self.axis_name, "dtype": self.dtype}
    self.low = ResNet(start=0, stop=4, **backbone)
    self.high = ResNet(start=4, stop=5, **backbone)
    nn.share_scope(self, self.low)
    nn.share_scope(self, self.high)

  def stages_0_to_3(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Stem and layer1-3: [B, H, W, 3] -> the layer3 map."""
    return self.low(x, train=train)

  def stage_4(self, x: jax.Array, *, train: bool) -> jax.Array:
    """layer4: the layer3 map -> the final map."""
    return self.high(x, train=train)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """The whole backbone, [B, H, W, 3] -> [B, H', W', C]."""
    return self.stage_4(self.stages_0_to_3(x, train=train), train=train)


class MPANet(nn.Module):
  """Single-stream ResNet, MAM, PAM, BN-neck and three bias-free classifiers.

  Attributes:
    num_classes: training identities N of the classifiers (the method passes it, e.g.
      `model_from_config(cfg, num_classes=data.num_classes)`).
    arch: backbone variant, a key of `maumjax.models.resnet.ARCHS` ('tiny' for tests / CPU).
    last_stride: layer4 stride; 1 in the reference.
    modality_attention: 2 = a MAM after layer3 and after layer4 (reference), 1 = only after
      layer4, 0 = none.
    mam_variant: 'mam', or the Table 4 ablations 'se' / 'in'; see `ModalityAlleviation`.
    mam_reduction: the MAM gate's channel reduction.
    pam: pattern alignment on; False keeps only the global feature (Table 3 rows without PAM).
    num_parts: number of patterns l.
    axis_name: mapped axis for synchronised BN under shard_map/pmap; None otherwise.
    dtype: backbone compute dtype; parameters, features and logits stay float32.
  """

  num_classes: int | None = None
  arch: str = "resnet50"
  last_stride: int = 1
  modality_attention: int = 2
  mam_variant: str = "mam"
  mam_reduction: int = 16
  pam: bool = True
  num_parts: int = 6
  axis_name: str | None = None
  dtype: Any = jnp.float32

  def setup(self) -> None:
    get_arch(self.arch)
    check_num_classes("MPANet", self.num_classes)
    if self.modality_attention not in (0, 1, 2):
      raise ValueError(
          f"modality_attention must be 0 (no MAM), 1 (after layer4) or 2 (after layer3 and "
          f"layer4), got {self.modality_attention}")
    if self.mam_variant not in MAM_VARIANTS:
      raise ValueError(f"unknown mam_variant {self.mam_variant!r}; use one of {MAM_VARIANTS}")
    if self.pam and self.num_parts < 1:
      raise ValueError(f"num_parts must be >= 1 with pam=True, got {self.num_parts}")
    self.shared = SharedBackbone(self.arch, self.last_stride, self.axis_name, self.dtype)
    if self.modality_attention == 2:
      self.mam3 = ModalityAlleviation(self.mam_variant, self.mam_reduction)
    if self.modality_attention >= 1:
      self.mam4 = ModalityAlleviation(self.mam_variant, self.mam_reduction)
    if self.pam:
      self.pam_module = PatternAlignment(self.num_parts, name="pam")
    self.bnneck = BNNeck(self.axis_name)
    classifier = {"features": self.num_classes, "use_bias": False, "dtype": jnp.float32,
                  "param_dtype": jnp.float32, "kernel_init": torch_default_kernel_init}
    self.classifier = nn.Dense(**classifier, name=CLASSIFIERS["shared"])
    self.classifier_v = nn.Dense(**classifier, name=CLASSIFIERS["visible"])
    self.classifier_r = nn.Dense(**classifier, name=CLASSIFIERS["infrared"])

  @property
  def specific_stages(self) -> int:
    """0: no modality-specific stages (the `ReidNet` field `weights.load_backbone` reads)."""
    return 0

  @property
  def feature_dim(self) -> int:
    """Width D of 'feat' and 'bn': (num_parts + 1) * C with PAM, C without."""
    channels = stage_output_channels(self.arch)
    return (self.num_parts + 1) * channels if self.pam else channels

  def _features(self, images: jax.Array,
                train: bool) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    x = self.shared.stages_0_to_3(images, train=train)
    if self.modality_attention == 2:
      x = self.mam3(x)
    x = self.shared.stage_4(x, train=train)
    if self.modality_attention >= 1:
      x = self.mam4(x)
    if self.pam:
      feat, maps = self.pam_module(x)
    else:
      feat, maps = jnp.mean(x.astype(jnp.float32), axis=(1, 2)), None
    return feat, self.bnneck(feat, train=train), maps

  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array | None]:
    """Runs a batch of either or both modalities (one shared pass, shared BN statistics).

    Args:
      images: [B, H, W, 3] normalised images.
      train: batch statistics (update them with `mutable=['batch_stats']`) if True.

    Returns:
      float32 arrays: 'feat' [B, D], the pre-BN feature (patterns, then global); 'bn' [B, D],
      the BN-neck output; 'logits', 'logits_v', 'logits_r' [B, num_classes], the shared,
      visible and infrared classifiers on every row (the method masks by modality); 'maps'
      [B, H', W', num_parts], the PAM maps, or None with `pam=False`.
    """
    feat, bn, maps = self._features(images, train)
    return {"feat": feat, "bn": bn, "logits": self.classifier(bn),
            "logits_v": self.classifier_v(bn), "logits_r": self.classifier_r(bn), "maps": maps}

  def embed(self, images: jax.Array, modality: jax.Array | None = None) -> jax.Array:
    """Test-time feature: the BN-neck output with running statistics, not normalised.

    Args:
      images: [B, H, W, 3] normalised images.
      modality: ignored (the network is fully shared); accepted for the method interface's
        `(variables, images, modality)` signature.

    Returns:
      [B, feature_dim] float32.
    """
    del modality
    return self._features(images, train=False)[1]
