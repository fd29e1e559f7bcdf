"""BDF's derivative modalities: image-level transforms of a base batch (bdf.md §2, all [I]).

The Base-Derivative Framework (ICPR 2020) doubles each input: a visible image V gets a derived
V^ and an infrared image I a derived I^, each homologous with its base (same person, same
instance) and meant to sit between the two modalities. Only the greyscale derivation of the
visible image is close to confirmed; how I^ is made is unknown, so it is a switch (`DERIVE_IR`).

Every function here is pure and jittable: uint8 images [B, H, W, 3] (and, where random, a PRNG
key) in, uint8 images of the same shape out. They run on the device after the spatial
augmentation and before normalisation, so a base image and its derivative are pixel-aligned.
The learnable 1x1 colour map (`derive_ir='learnable_1x1'`) has parameters and so lives in the
model; this module holds the parameter-free ones.

References: bdf.md §2 (candidates and their ranking), §7 rows 1 and 8 (the switches).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# ITU-R BT.601 luma weights (bdf.md §2: Y = 0.299 R + 0.587 G + 0.114 B).
BT601 = (0.299, 0.587, 0.114)
# contrast_gamma's default ranges [I]: gamma log-uniform in [1/2, 2] (brightening and darkening
# equally likely), contrast uniform in [0.6, 1.4] around mid-grey.
GAMMA_RANGE = (0.5, 2.0)
CONTRAST_RANGE = (0.6, 1.4)


def _to_uint8(x: jax.Array) -> jax.Array:
  """float values on the 0..255 scale -> uint8, rounded half to even and clipped."""
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def _luma(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 [B, H, W] BT.601 luma on the 0..255 scale."""
  x = images.astype(jnp.float32)
  return x[..., 0] * BT601[0] + x[..., 1] * BT601[1] + x[..., 2] * BT601[2]


def grey(images: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """V^ from V: BT.601 greyscale, rounded to uint8 and replicated to 3 channels.

  Args:
    images: uint8 [B, H, W, 3].
    key: unused (the transform is deterministic); accepted so every derivation has one form.

  Returns:
    uint8 [B, H, W, 3] with three equal channels.
  """
  del key
  y = _to_uint8(_luma(images))
  return jnp.repeat(y[..., None], 3, axis=-1)


def invert(images: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """I^ = 255 - I: hot becomes dark (bdf.md §2 candidate 2). uint8 in, uint8 out."""
  del key
  return (255 - images.astype(jnp.int32)).astype(jnp.uint8)


def contrast_gamma(images: jax.Array, key: jax.Array, *,
                   gamma_range: tuple[float, float] = GAMMA_RANGE,
                   contrast_range: tuple[float, float] = CONTRAST_RANGE) -> jax.Array:
  """I^: a random gamma, then a random linear contrast about mid-grey, one draw per image.

  With t = I / 255: t' = t ** gamma, t'' = clip(0.5 + c (t' - 0.5), 0, 1), I^ = round(255 t'').
  gamma is log-uniform in `gamma_range`, c uniform in `contrast_range` (bdf.md §2 candidate 2,
  the spec's default derivation; the ranges are our defaults [I]).

  Args:
    images: uint8 [B, H, W, 3].
    key: PRNG key; the B draws come from it.
    gamma_range, contrast_range: (low, high), low <= high; (1, 1) disables that part.

  Returns:
    uint8 [B, H, W, 3].
  """
  k_gamma, k_contrast = jax.random.split(key)
  batch = images.shape[0]
  log_lo, log_hi = jnp.log(gamma_range[0]), jnp.log(gamma_range[1])
  gamma = jnp.exp(jax.random.uniform(k_gamma, (batch,), minval=log_lo, maxval=log_hi))
  contrast = jax.random.uniform(k_contrast, (batch,), minval=contrast_range[0],
                                maxval=contrast_range[1])
  t = images.astype(jnp.float32) / 255.0
  t = jnp.power(t, gamma[:, None, None, None])
  t = jnp.clip(0.5 + contrast[:, None, None, None] * (t - 0.5), 0.0, 1.0)
  return _to_uint8(255.0 * t)


def hist_eq(images: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """I^: histogram equalisation of each image and channel (bdf.md §2 candidate 2).

  For a channel with N = H x W pixels and cumulative histogram cdf, value v maps to
  round(255 (cdf[v] - cdf_min) / (N - cdf_min)), cdf_min the cdf at the smallest present
  value; a constant channel (N == cdf_min) is left as it is.

  Args:
    images: uint8 [B, H, W, 3].
    key: unused.

  Returns:
    uint8 [B, H, W, 3].
  """
  del key
  b, h, w, c = images.shape
  flat = jnp.moveaxis(images, -1, 1).reshape(b * c, h * w).astype(jnp.int32)  # [B*C, N]
  hist = jax.vmap(lambda v: jnp.bincount(v, length=256))(flat)  # [B*C, 256]
  cdf = jnp.cumsum(hist, axis=1)
  n = h * w
  # cdf at the smallest present value = the smallest nonzero cdf entry.
  cdf_min = jnp.min(jnp.where(cdf > 0, cdf, n), axis=1, keepdims=True)
  denom = n - cdf_min
  lut = jnp.where(denom > 0,
                  jnp.round(255.0 * (cdf - cdf_min) / jnp.maximum(denom, 1)),
                  jnp.arange(256)[None, :])
  lut = jnp.clip(lut, 0, 255).astype(jnp.uint8)
  out = jnp.take_along_axis(lut, flat, axis=1)  # [B*C, N]
  return jnp.moveaxis(out.reshape(b, c, h, w), 1, -1)


def pseudocolor(images: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """I^: a fixed 'jet' colour map of the BT.601 intensity (bdf.md §2 candidate 3).

  With t = luma / 255: R = clip(1.5 - |4t - 3|), G = clip(1.5 - |4t - 2|),
  B = clip(1.5 - |4t - 1|), each clipped to [0, 1] and scaled to 0..255 (dark blue for cold,
  dark red for hot).

  Args:
    images: uint8 [B, H, W, 3].
    key: unused.

  Returns:
    uint8 [B, H, W, 3].
  """
  del key
  t = _luma(images) / 255.0
  channels = [jnp.clip(1.5 - jnp.abs(4.0 * t - centre), 0.0, 1.0) for centre in (3.0, 2.0, 1.0)]
  return _to_uint8(255.0 * jnp.stack(channels, axis=-1))


Derivation = Callable[..., jax.Array]
# The parameter-free derivations of I^ (the `learnable_1x1` one is a model module).
DERIVE_IR: dict[str, Derivation] = {
    "contrast_gamma": contrast_gamma,
    "hist_eq": hist_eq,
    "invert": invert,
    "pseudocolor": pseudocolor,
}
DERIVE_VISIBLE: dict[str, Derivation] = {"grey": grey}


def derive(images: jax.Array, key: jax.Array, name: str) -> jax.Array:
  """Applies the derivation `name` (a key of DERIVE_VISIBLE or DERIVE_IR).

  Raises:
    ValueError: unknown `name` (the message lists the known ones).
  """
  table = {**DERIVE_VISIBLE, **DERIVE_IR}
  if name not in table:
    raise ValueError(f"unknown derivation {name!r}; use one of {sorted(table)} "
                     "('learnable_1x1' is a model module, not a function here)")
  return table[name](images, key)
