"""Re-ID heads on a backbone feature map: global (GeM/avg + BN-neck) and PCB-style parts.

Both heads return `{'pre': [B, G, D], 'bn': [B, G, D]}` in float32, with G = 1 for the global head
and G = num_parts for the part head: 'pre' is the pooled (and, for parts, reduced) feature that
metric losses such as triplet use, 'bn' the BN-neck output used for proxies/classifiers and at
test time (maum.md §2, §7).

Heads compute in float32 whatever the backbone's dtype: GeM raises activations to the power p,
which loses too much precision in bfloat16, and the heads are cheap.

GeM comes in two forms (`POOLS`): 'gem' clamps activations to at least 1e-6 before the power;
'gem_mean_eps' is AGW's and MMM's code, (mean over H, W of x^p + 1e-12)^(1/p), the 1e-12 added
after the mean and no clamp (mmm.md §3). On post-ReLU maps they differ only for activations
below 1e-6 and for all-zero channels (1e-6 against 1e-4 for p = 3).

Stripe rule (`stripe_bounds`): stripe i covers rows [floor(i*H/P), ceil((i+1)*H/P)), the bins of
torch's AdaptiveAvgPool2d((P, 1)) used by PCB. When P divides H (18 rows, 6 parts at 288x144 with
last stride 1) these are P equal, disjoint stripes of H/P rows. Otherwise neighbouring stripes
overlap by a row rather than dropping the remainder as the hetero-center code's floor division
does, so every row contributes.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# One l2_normalize for the whole library (finite gradient at 0), re-exported for the heads' users.
from maumjax.losses.metric import l2_normalize  # noqa: F401
from maumjax.models.resnet import BN_EPSILON, BN_MOMENTUM

POOLS = ("gem", "avg", "gem_mean_eps")


def check_num_classes(model: str, num_classes: int | None) -> None:
  """Raises unless a model with a classifier got its number of training identities."""
  if num_classes is None or num_classes < 1:
    raise ValueError(
        f"{model} needs num_classes >= 1 (the training identities), got {num_classes}; "
        f"pass it as model_from_config(cfg, num_classes=...)")


def gem_pool(x: jax.Array, p: float = 3.0, eps: float = 1e-6) -> jax.Array:
  """Generalised-mean pooling over height and width.

  Args:
    x: feature map [B, H, W, C]; computed in float32.
    p: the power; 1 is average pooling, large p approaches max pooling.
    eps: activations are clamped to at least eps so the power and its root stay finite.

  Returns:
    [B, C] float32: (mean over H, W of max(x, eps)^p)^(1/p).
  """
  x = jnp.maximum(x.astype(jnp.float32), eps)
  return jnp.mean(x ** p, axis=(1, 2)) ** (1.0 / p)


def gem_pool_mean_eps(x: jax.Array, p: float = 3.0, eps: float = 1e-12) -> jax.Array:
  """Generalised-mean pooling as AGW and MMM code it: eps added after the mean, no clamp.

  Meant for non-negative (post-ReLU) maps: a negative mean of x^p has no real root.

  Args:
    x: feature map [B, H, W, C]; computed in float32.
    p: the power.
    eps: added to the mean so that an all-zero channel has a finite root and gradient.

  Returns:
    [B, C] float32: (mean over H, W of x^p + eps)^(1/p).
  """
  x = x.astype(jnp.float32)
  return (jnp.mean(x ** p, axis=(1, 2)) + eps) ** (1.0 / p)


def avg_pool(x: jax.Array) -> jax.Array:
  """Average pooling over height and width: [B, H, W, C] -> [B, C] float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def pool2d(x: jax.Array, pool: str, gem_p: float = 3.0) -> jax.Array:
  """Pools [B, H, W, C] to [B, C] with 'gem', 'avg' or 'gem_mean_eps' (see `POOLS`).

  Raises:
    ValueError: unknown pool name.
  """
  if pool == "gem":
    return gem_pool(x, gem_p)
  if pool == "gem_mean_eps":
    return gem_pool_mean_eps(x, gem_p)
  if pool == "avg":
    return avg_pool(x)
  raise ValueError(f"unknown pool {pool!r}; use one of {POOLS}")


def stripe_bounds(height: int, num_parts: int) -> list[tuple[int, int]]:
  """Row ranges of the horizontal stripes (AdaptiveAvgPool2d bins; see the module docstring).

  Args:
    height: feature-map height H.
    num_parts: number of stripes P.

  Returns:
    P (start, stop) pairs; equal and disjoint when P divides H.

  Raises:
    ValueError: num_parts < 1 or height < num_parts (a stripe would have no row of its own).
  """
  if num_parts < 1:
    raise ValueError(f"num_parts must be >= 1, got {num_parts}")
  if height < num_parts:
    raise ValueError(
        f"feature map height {height} is smaller than num_parts={num_parts}; use fewer parts, "
        f"a taller input, or last_stride=1 (which doubles the final map's height)")
  return [((i * height) // num_parts, math.ceil((i + 1) * height / num_parts))
          for i in range(num_parts)]


def pool_stripes(x: jax.Array, num_parts: int, pool: str = "gem",
                 gem_p: float = 3.0) -> jax.Array:
  """Pools each horizontal stripe of [B, H, W, C] separately.

  Args:
    x: feature map [B, H, W, C].
    num_parts: number of stripes P.
    pool: a name in `POOLS`.
    gem_p: GeM power.

  Returns:
    [B, P, C] float32, stripe 0 at the top of the image.
  """
  bounds = stripe_bounds(x.shape[1], num_parts)
  return jnp.stack([pool2d(x[:, a:b], pool, gem_p) for a, b in bounds], axis=1)


class BNNeck(nn.Module):
  """BatchNorm over the batch axis with the bias removed (BN-neck: bias frozen at zero).

  Every trailing position is its own channel, so a [B, P, D] input gets independent statistics
  and scale per (part, dim), i.e. one BatchNorm1d per part.

  Attributes:
    axis_name: mapped axis for synchronised statistics under shard_map/pmap.
  """

  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Normalises [B, ...] features; returns float32 of the same shape."""
    return nn.BatchNorm(
        use_running_average=not train, axis=tuple(range(1, x.ndim)), momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON, use_bias=False, axis_name=self.axis_name, dtype=jnp.float32,
        param_dtype=jnp.float32, use_fast_variance=False, name="bn")(x.astype(jnp.float32))


class GlobalHead(nn.Module):
  """Global pooling of the whole map, then a BN-neck.

  Attributes:
    pool: 'gem', 'avg' or 'gem_mean_eps' (MMM's GeM form; see the module docstring).
    gem_p: GeM power (fixed, not learned).
    axis_name: mapped axis for synchronised BN statistics.
  """

  pool: str = "gem"
  gem_p: float = 3.0
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Maps [B, H, W, C] to {'pre': [B, 1, C], 'bn': [B, 1, C]} (float32)."""
    pre = pool2d(x, self.pool, self.gem_p)
    bn = BNNeck(self.axis_name, name="bnneck")(pre, train=train)
    return {"pre": pre[:, None], "bn": bn[:, None]}


class PartHead(nn.Module):
  """PCB-style part features: stripes, pooling, per-part reduction and per-part BN-neck.

  Each part has its own reduction matrix (a stacked kernel [P, C, dim], applied by einsum) and
  its own BN. The reduction has no bias: the BN that follows subtracts the batch mean, so a bias
  would not change 'bn' and would only shift 'pre'. No ReLU (maum.md §2).

  Attributes:
    num_parts: number of horizontal stripes P.
    dim: reduced dimension per part.
    pool: stripe pooling, a name in `POOLS`.
    gem_p: GeM power.
    axis_name: mapped axis for synchronised BN statistics.
  """

  num_parts: int = 6
  dim: int = 256
  pool: str = "gem"
  gem_p: float = 3.0
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Maps [B, H, W, C] to {'pre': [B, P, dim], 'bn': [B, P, dim]} (float32)."""
    stripes = pool_stripes(x, self.num_parts, self.pool, self.gem_p)
    # kaiming_normal_(mode='fan_in') as the hetero-center code's 1x1 convs; fan_in = C.
    kernel = self.param(
        "reduce_kernel", nn.initializers.variance_scaling(2.0, "fan_in", "normal",
                                                          in_axis=-2, out_axis=-1,
                                                          batch_axis=(0,)),
        (self.num_parts, stripes.shape[-1], self.dim), jnp.float32)
    pre = jnp.einsum("bpc,pcd->bpd", stripes, kernel)
    bn = BNNeck(self.axis_name, name="bnneck")(pre, train=train)
    return {"pre": pre, "bn": bn}
