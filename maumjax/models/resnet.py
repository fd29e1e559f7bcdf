"""Linen ResNet v1.5 with torchvision names, runnable as a contiguous range of stages.

The layout is torchvision's (v1.5): the stride of a bottleneck sits on its 3x3 conv, and the
downsample path is a strided 1x1 conv followed by BatchNorm. Module names mirror torchvision's
state_dict keys (`conv1`, `bn1`, `layer{1..4}_{i}/{conv1, bn1, ..., downsample_0, downsample_1}`,
`fc`) so that `maumjax.models.weights` converts an ImageNet checkpoint by renaming and
transposing only (stack.md §7.2-7.3).

Stages: 0 is the stem (conv1 7x7/2, bn1, ReLU, 3x3/2 max-pool), 1..4 are layer1..layer4.
`ResNet(start=s, stop=t)` runs stages [s, t), and its submodules keep the torchvision names
whatever the range, so a two-stream model is assembled from a per-modality `ResNet(0, k)` and a
shared `ResNet(k, 5)`, and each part loads from the same checkpoint.

Non-local blocks (`non_local='agw'`, AGW and MMM; mmm.md §3): after the last 2 blocks of layer2
and the last 3 of layer3 (after blocks 2, 3 and 3, 4, 5 of a resnet50; clipped to the blocks a
smaller arch has), none in the stem, layer1 or layer4. They are named `nonlocal{L}_{i}` (after
block i of layer L), apart from every torchvision name, and a ResNet creates only those of the
stages it runs. Checkpoints hold none of them: `weights.load_backbone` leaves them at their
init, where each block is the identity.

Padding is explicit and symmetric everywhere (7x7: 3, 3x3 and max-pool: 1). Flax `'SAME'` pads
asymmetrically for stride 2 on even sizes and would not match torch (stack.md §7.4).

References:
  stack.md §7 (naming, conversion, pitfalls); maum.md §2 (backbone: last stride 1, two-stream).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_STAGES = 5  # stem + layer1..layer4
BN_MOMENTUM = 0.9  # Flax momentum keeps this much of the old average: torch momentum 0.1
BN_EPSILON = 1e-5

# torchvision init: kaiming_normal_(mode='fan_out', nonlinearity='relu'), not truncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's default Conv2d/Linear weight init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

NON_LOCAL = ("none", "agw")
# AGW's non_layers: non-local blocks after the last n blocks of layer1..layer4.
_AGW_NON_LOCAL = (0, 2, 3, 0)
# Module names of the non-local blocks, `nonlocal{L}_{i}`; no torchvision key maps to them.
NON_LOCAL_NAME = re.compile(r"^nonlocal[1-4]_\d+$")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """Shape of a ResNet variant.

  Attributes:
    block: 'basic' (two 3x3 convs, expansion 1) or 'bottleneck' (1x1, 3x3, 1x1; expansion 4).
    layers: number of blocks in layer1..layer4.
    width: stem output channels and layer1 base width; layer L has base width width * 2**(L-1).
  """

  block: str
  layers: tuple[int, int, int, int]
  width: int = 64

  @property
  def expansion(self) -> int:
    return 4 if self.block == "bottleneck" else 1


ARCHS: dict[str, ArchSpec] = {
  "resnet50": ArchSpec("bottleneck", (3, 4, 6, 3), 64),
  "resnet18": ArchSpec("basic", (2, 2, 2, 2), 64),
  # Widths / 8 with one block per stage: for unit tests and CPU demos only.
  "tiny": ArchSpec("basic", (1, 1, 1, 1), 8),
  # Widths / 4 with one block per stage: the MPANet CPU demo (its instance norm needs more
  # channels than tiny's to keep identity information on 4 x 2 maps).
  "small": ArchSpec("basic", (1, 1, 1, 1), 16),
}


def get_arch(arch: str) -> ArchSpec:
  """Looks up a variant by name.

  Args:
    arch: a key of `ARCHS`.

  Returns:
    The variant's `ArchSpec`.

  Raises:
    ValueError: `arch` is not a known variant.
  """
  if arch not in ARCHS:
    raise ValueError(f"unknown ResNet arch {arch!r}; use one of {sorted(ARCHS)}")
  return ARCHS[arch]


def stage_output_channels(arch: str, stage: int = NUM_STAGES - 1) -> int:
  """Channels of the feature map after `stage` (0 = stem, 4 = layer4, the default).

  Args:
    arch: a key of `ARCHS`.
    stage: stage index in [0, 4].

  Returns:
    The channel count, e.g. 2048 for resnet50 after layer4, 64 for its stem.

  Raises:
    ValueError: unknown arch or stage out of range.
  """
  spec = get_arch(arch)
  if not 0 <= stage < NUM_STAGES:
    raise ValueError(f"stage must be in [0, {NUM_STAGES - 1}], got {stage}")
  if stage == 0:
    return spec.width
  return spec.width * 2 ** (stage - 1) * spec.expansion


def non_local_positions(arch: str, non_local: str = "agw") -> dict[int, tuple[int, ...]]:
  """Where the non-local blocks go: stage (1..4 = layer1..layer4) -> 0-based block indices.

  A block is inserted after each listed residual block. AGW's rule puts one after each of the
  last n blocks of a layer, n = (0, 2, 3, 0) for layer1..layer4; a layer with fewer than n blocks
  gets one after each of its blocks.

  Args:
    arch: a key of `ARCHS`.
    non_local: 'none' (no blocks) or 'agw'.

  Returns:
    E.g. {2: (2, 3), 3: (3, 4, 5)} for resnet50 with 'agw', {2: (0,), 3: (0,)} for tiny, {} for
    'none'.

  Raises:
    ValueError: unknown arch or `non_local` name.
  """
  spec = get_arch(arch)
  if non_local not in NON_LOCAL:
    raise ValueError(f"unknown non_local {non_local!r}; use one of {NON_LOCAL}")
  if non_local == "none":
    return {}
  return {stage: tuple(range(max(blocks - n, 0), blocks))
          for stage, (blocks, n) in enumerate(zip(spec.layers, _AGW_NON_LOCAL), start=1) if n}


def _torch_default_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """torch's default Conv2d/Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in ** 0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                     bound)


def _check_range(start: int, stop: int) -> None:
  if not 0 <= start < stop <= NUM_STAGES:
    raise ValueError(
        f"ResNet stage range [{start}, {stop}) is invalid; need 0 <= start < stop <= "
        f"{NUM_STAGES} (stage 0 = stem, 1..4 = layer1..layer4)")


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection (resnet18/34)."""

  features: int
  strides: int
  downsample: bool
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=conv_kernel_init)
    y = conv(self.features, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)),
             name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    y = self.norm(name="bn2")(y)
    if self.downsample:
      x = conv(self.features, (1, 1), strides=self.strides, padding="VALID",
               name="downsample_0")(x)
      x = self.norm(name="downsample_1")(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4, with a residual connection."""

  features: int
  strides: int
  downsample: bool
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=conv_kernel_init)
    y = conv(self.features, (1, 1), padding="VALID", name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.features, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)),
             name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = conv(self.features * 4, (1, 1), padding="VALID", name="conv3")(y)
    y = self.norm(name="bn3")(y)
    if self.downsample:
      x = conv(self.features * 4, (1, 1), strides=self.strides, padding="VALID",
               name="downsample_0")(x)
      x = self.norm(name="downsample_1")(x)
    return nn.relu(y + x)


class NonLocal(nn.Module):
  """AGW's non-local block with a residual connection; the identity at init.

  theta, phi and g are 1x1 convs C -> K (with biases), K = `inter_channels`; AGW's formula for
  K collapses to 1 (an inherited quirk kept by MMM). With N = H*W and the maps flattened to
  [B, N, K], the affinity is f = theta phi^T / N (dot product, no softmax) and y = f g. `W_0`
  (1x1 conv K -> C, with bias) and `W_1` (BatchNorm with scale and bias initialised to 0) map y
  back to C channels; the output is W(y) + x. The zero BN makes the block the identity at init,
  so it can sit in an ImageNet-pretrained trunk.

  y is evaluated as theta (phi^T g) / N, which equals (theta phi^T / N) g but never forms the
  N x N affinity (N = 648 on layer2's 36 x 18 map at 288 x 144). The products and the division
  by N run in float32 whatever the compute dtype. The convs use torch's default init
  (U(+-1/sqrt(fan_in)) for weights and biases), as AGW's blocks are not re-initialised.

  Attributes:
    norm: the ResNet's BatchNorm constructor (momentum, epsilon, axis_name, dtype policy).
    inter_channels: K, 1 in AGW and MMM.
    dtype: compute dtype of the convs.
  """

  norm: Callable[..., nn.Module]
  inter_channels: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [B, H, W, C] to [B, H, W, C] in `dtype`."""
    b, h, w, c = x.shape
    def conv(features, fan_in, name):
      return nn.Conv(features, (1, 1), padding="VALID", dtype=self.dtype,
                     param_dtype=jnp.float32, kernel_init=torch_default_kernel_init,
                     bias_init=_torch_default_bias_init(fan_in), name=name)
    k = self.inter_channels
    theta, phi, g = (conv(k, c, name)(x).reshape(b, h * w, k).astype(jnp.float32)
                     for name in ("theta", "phi", "g"))
    exact = jax.lax.Precision.HIGHEST  # O(N K^2) flops: no reason for TF32/bf16 passes
    phi_g = jnp.einsum("bmk,bml->bkl", phi, g, precision=exact) / (h * w)
    y = jnp.einsum("bnk,bkl->bnl", theta, phi_g, precision=exact)
    y = conv(c, k, "W_0")(y.reshape(b, h, w, k).astype(self.dtype))
    y = self.norm(scale_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                  name="W_1")(y)
    return y + x


class ResNet(nn.Module):
  """Stages [start, stop) of a torchvision-layout ResNet.

  Attributes:
    arch: a key of `ARCHS`.
    start: first stage to run (0 = stem, 1..4 = layer1..layer4).
    stop: one past the last stage to run.
    last_stride: stride of layer4 (its first block's 3x3 conv and downsample conv); 1 is the
      re-ID default and doubles the final map's height and width.
    num_classes: when set (only with stop == 5), global average pooling and the `fc` layer run
      and logits are returned, as in torchvision; otherwise the feature map is returned.
    axis_name: mapped axis over which BatchNorm statistics are averaged under shard_map/pmap
      (synchronised BN); None for per-call statistics (plain jit gives global-batch stats).
    dtype: compute dtype of the convs (e.g. jnp.bfloat16). Parameters are always float32, and
      BatchNorm computes its statistics and normalisation in float32 before casting back.
    non_local: 'none' (torchvision's ResNet) or 'agw' (`NonLocal` blocks where
      `non_local_positions` puts them, for the stages in [start, stop)).
  """

  arch: str = "resnet50"
  start: int = 0
  stop: int = NUM_STAGES
  last_stride: int = 1
  num_classes: int | None = None
  axis_name: str | None = None
  dtype: Any = jnp.float32
  non_local: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Runs the stages on an NHWC batch.

    Args:
      x: [B, H, W, C_in] with C_in = 3 for start == 0, else the previous stage's channels.
      train: batch statistics (and running-average updates when `batch_stats` is mutable)
        if True; running averages if False.

    Returns:
      The feature map [B, H', W', C'] in `dtype`, or float32 logits [B, num_classes].

    Raises:
      ValueError: invalid stage range, last_stride, num_classes use, input channels, or
        non_local name.
    """
    spec = get_arch(self.arch)
    _check_range(self.start, self.stop)
    non_local = non_local_positions(self.arch, self.non_local)
    if self.last_stride not in (1, 2):
      raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
    if self.num_classes is not None and self.stop != NUM_STAGES:
      raise ValueError(
          f"num_classes={self.num_classes} needs stop={NUM_STAGES} (fc follows layer4), got "
          f"stop={self.stop}; leave num_classes=None for a partial range")
    expected = 3 if self.start == 0 else stage_output_channels(self.arch, self.start - 1)
    if x.ndim != 4 or x.shape[-1] != expected:
      raise ValueError(
          f"ResNet({self.arch!r}, start={self.start}) expects NHWC input with {expected} "
          f"channels, got shape {x.shape}")

    # Statistics stay float32 even for bf16 activations: flax promotes the reductions and the
    # normalisation to float32 (force_float32_reductions) and casts only the output to dtype.
    # Two-pass variance, as torch does; E[x^2] - E[x]^2 cancels badly when |mean| >> std.
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON, axis_name=self.axis_name, dtype=self.dtype,
        param_dtype=jnp.float32, use_fast_variance=False)
    x = x.astype(self.dtype)
    if self.start == 0:
      x = nn.Conv(spec.width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
                  dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_kernel_init,
                  name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    block_cls = Bottleneck if spec.block == "bottleneck" else BasicBlock
    for stage in range(max(self.start, 1), self.stop):
      features = spec.width * 2 ** (stage - 1)
      in_channels = stage_output_channels(self.arch, stage - 1)
      stage_stride = 1 if stage == 1 else (self.last_stride if stage == 4 else 2)
      for i in range(spec.layers[stage - 1]):
        strides = stage_stride if i == 0 else 1
        # torchvision adds the projection whenever the shape of the identity path changes.
        downsample = i == 0 and (strides != 1 or in_channels != features * spec.expansion)
        x = block_cls(features, strides, downsample, norm, self.dtype,
                      name=f"layer{stage}_{i}")(x)
        if i in non_local.get(stage, ()):
          x = NonLocal(norm, dtype=self.dtype, name=f"nonlocal{stage}_{i}")(x)

    if self.num_classes is None:
      return x
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    fan_in = pooled.shape[-1]
    # torch.nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    return nn.Dense(self.num_classes, param_dtype=jnp.float32,
                    kernel_init=torch_default_kernel_init,
                    bias_init=_torch_default_bias_init(fan_in), name="fc")(pooled)


def feature_map_size(height: int, width: int, last_stride: int = 1) -> tuple[int, int]:
  """Spatial size of the full backbone's output for an input of `height` x `width`.

  Every stride-2 layer here (7x7 pad 3, 3x3 pad 1, max-pool 3x3 pad 1) maps n to ceil(n / 2),
  so the size is exact for any input, not only multiples of 32.

  Args:
    height: input height in pixels.
    width: input width in pixels.
    last_stride: layer4 stride, 1 or 2.

  Returns:
    (H', W'), e.g. (18, 9) for 288 x 144 with last stride 1 and (9, 5) with 2.
  """
  halvings = 4 if last_stride == 1 else 5
  for _ in range(halvings):
    height, width = -(-height // 2), -(-width // 2)
  return height, width
