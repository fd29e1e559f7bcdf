"""Training augmentations for RGB-IR re-ID: host-side draws, NumPy and jittable JAX application.

Drawing the random parameters is separated from applying them. `draw_params` runs on the host
with a `numpy.random.Generator` (one per sample, e.g. `np.random.default_rng((seed, epoch,
position))`, protocol.md §4.7). The parameters are then applied either per image on the host
(`apply_numpy`, for data-loader workers) or batched on the accelerator (`apply_jax`, jittable
with `cfg` static), so uint8 images travel to the device. Both give the same float32 output
up to float32 rounding.

Reference order (protocol.md §4.2-4.7): pad (fill on uint8 pixels) -> crop -> flip -> greyscale
-> normalise -> random erasing -> channel operation; erasing fills and channel operations act on
the normalised tensor.

References:
  protocol.md §4 (AGW, CAJ/CAJ+, DEEN, MPANet recipes); mmm.md §4 (MMM uses CAJ's).
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CHANNEL_MODES = ("none", "exchange", "adaptive")

# Pillow's RGB -> L conversion in 16-bit fixed point (Convert.c, L24); the weights sum to 65536,
# so a grey pixel maps to itself and greyscale commutes with a grey padding fill. Both backends
# use this integer form, so the result equals PIL's `convert("L")` exactly.
_PIL_LUMA = (19595, 38470, 7471)
# CAJ's ChannelAdapGray luminance, applied to the normalised tensor as the reference does.
_CAJ_LUMA = (np.float32(0.2989), np.float32(0.5870), np.float32(0.1140))

# Parameter names and dtypes: fixed whatever the config, so per-sample draws stack into batches.
# channel: -1 leave, 0/1/2 copy that channel to all three, 3 CAJ luminance.
PARAM_DTYPES: dict[str, np.dtype] = {
  "crop_y": np.dtype(np.int32), "crop_x": np.dtype(np.int32),
  "flip": np.dtype(np.bool_), "gray": np.dtype(np.bool_), "erase": np.dtype(np.bool_),
  "erase_y": np.dtype(np.int32), "erase_x": np.dtype(np.int32),
  "erase_h": np.dtype(np.int32), "erase_w": np.dtype(np.int32),
  "channel": np.dtype(np.int32),
}
PARAM_KEYS: tuple[str, ...] = tuple(PARAM_DTYPES)


def _check_prob(name: str, value: float) -> None:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"AugmentConfig.{name} must be a probability in [0, 1], got {value!r}")


def _check_range(name: str, value: tuple[float, ...], upper: float | None) -> None:
  bound = f"0 < low <= high <= {upper}" if upper is not None else "0 < low <= high"
  ok = len(value) == 2 and 0.0 < value[0] <= value[1] and (upper is None or value[1] <= upper)
  if not ok:
    raise ValueError(f"AugmentConfig.{name} must be a (low, high) pair with {bound}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Augmentation switches for one modality; frozen and hashable, so a valid jit static arg.

  Attributes:
    pad: pixels padded on every side before the random crop back to H x W; 0 disables both.
    pad_fill: uint8 padding value (0 for AGW/CAJ/DEEN, 127 for MPANet).
    flip_p: horizontal-flip probability.
    gray_p: probability of greyscale (PIL `convert("L")`, replicated to 3 channels) on pixels.
    erase_p: random-erasing probability; 0 disables erasing.
    erase_area: erased area fraction of H*W, drawn uniformly from this range.
    erase_aspect: aspect ratio h/w range.
    erase_log_aspect: draw the aspect log-uniformly (torchvision) instead of uniformly (CRE).
    erase_attempts: tries before giving up; a sample with no success is not erased.
    erase_fill: per-channel value written into the normalised tensor.
    channel_mode: 'none', 'exchange' (copy R, G or B to all channels) or 'adaptive' (CAJ
      thermal: R, G, B with 1/4 each, CAJ luminance 1/8, unchanged 1/8).
    channel_p: probability that the channel operation runs at all.
    mean: normalisation mean on [0, 1] RGB.
    std: normalisation std on [0, 1] RGB.
  """

  pad: int = 10
  pad_fill: int = 0
  flip_p: float = 0.5
  gray_p: float = 0.0
  erase_p: float = 0.0
  erase_area: tuple[float, float] = (0.02, 0.4)
  erase_aspect: tuple[float, float] = (0.3, 1 / 0.3)
  erase_log_aspect: bool = False
  erase_attempts: int = 100
  erase_fill: tuple[float, float, float] = CIFAR_MEAN
  channel_mode: str = "none"
  channel_p: float = 1.0
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self) -> None:
    # Sequences from a config system may arrive as lists; tuples keep the config hashable.
    for name in ("erase_area", "erase_aspect", "erase_fill", "mean", "std"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    for name in ("pad", "pad_fill", "erase_attempts"):
      value = getattr(self, name)
      if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"AugmentConfig.{name} must be an integer, got {value!r}")
      object.__setattr__(self, name, int(value))
    if self.pad < 0:
      raise ValueError(f"AugmentConfig.pad must be >= 0 (0 disables pad-and-crop), got {self.pad}")
    if not 0 <= self.pad_fill <= 255:
      raise ValueError(
          f"AugmentConfig.pad_fill must be a uint8 value in [0, 255], got {self.pad_fill}")
    for name in ("flip_p", "gray_p", "erase_p", "channel_p"):
      _check_prob(name, getattr(self, name))
    _check_range("erase_area", self.erase_area, 1.0)
    _check_range("erase_aspect", self.erase_aspect, None)
    if self.erase_attempts < 1:
      raise ValueError(f"AugmentConfig.erase_attempts must be >= 1, got {self.erase_attempts}")
    if self.channel_mode not in CHANNEL_MODES:
      raise ValueError(
          f"AugmentConfig.channel_mode must be one of {CHANNEL_MODES}, got {self.channel_mode!r}")
    for name in ("erase_fill", "mean", "std"):
      if len(getattr(self, name)) != 3:
        raise ValueError(
            f"AugmentConfig.{name} needs 3 values (R, G, B), got {getattr(self, name)!r}")
    if min(self.std) <= 0:
      raise ValueError(f"AugmentConfig.std must be positive, got {self.std!r}")


# Erasing variants (protocol.md §4.6) as config fields; combine with an `erase_p`.
ERASE_VARIANTS: dict[str, dict[str, Any]] = {
  # CAJ/MMM ChannelRandomErasing: CIFAR means written into the normalised tensor.
  "cre": dict(erase_area=(0.02, 0.4), erase_aspect=(0.3, 1 / 0.3), erase_log_aspect=False,
              erase_attempts=100, erase_fill=CIFAR_MEAN),
  # torchvision RandomErasing defaults: log-uniform aspect, 10 tries, value 0.
  "torchvision": dict(erase_area=(0.02, 0.33), erase_aspect=(0.3, 3.3), erase_log_aspect=True,
                      erase_attempts=10, erase_fill=(0.0, 0.0, 0.0)),
  # DEEN: RegDB area range; the reference passes r1 = 0.3 and draws U(r1, 1/r1) (~3.33).
  "deen": dict(erase_area=(0.02, 0.4), erase_aspect=(0.3, 1 / 0.3), erase_log_aspect=False,
               erase_attempts=100, erase_fill=IMAGENET_MEAN),
}

_CRE = ERASE_VARIANTS["cre"]
PRESETS: dict[str, AugmentConfig] = {
  # Test-time equivalent: only normalisation.
  "none": AugmentConfig(pad=0, flip_p=0.0),
  "agw": AugmentConfig(),
  # AGW's pad-crop-flip with the pad scaled to small inputs (engineering default): 10 px at
  # 288x144 is 7% of the width, so 2 px at 64x32. The CPU demos use it; the full pad shifts a
  # 32-px-wide image by up to a third of its width.
  "agw_small": AugmentConfig(pad=2),
  # CAJ views (protocol.md §4.3); MMM uses the same three.
  "caj_visible": AugmentConfig(erase_p=0.5, **_CRE),
  "caj_visible_exchange": AugmentConfig(erase_p=0.5, channel_mode="exchange", **_CRE),
  "caj_thermal": AugmentConfig(erase_p=0.5, channel_mode="adaptive", **_CRE),
  # CAJ+ (TPAMI 2023): CRE p 0.6, adaptive p 0.6, RandomGrayscale 0.1 on visible view 0.
  "cajplus_visible": AugmentConfig(gray_p=0.1, erase_p=0.6, **_CRE),
  "cajplus_visible_exchange": AugmentConfig(erase_p=0.6, channel_mode="exchange", **_CRE),
  "cajplus_thermal": AugmentConfig(erase_p=0.6, channel_mode="adaptive", channel_p=0.6, **_CRE),
  # MPANet flips before pad/crop. With a symmetric pad and dx ~ U{0..2p}, flip-then-crop at dx
  # equals crop at 2p - dx then flip, and 2p - dx has the same law, so this order is equivalent
  # in distribution.
  "mpanet": AugmentConfig(pad_fill=127, erase_p=0.5, **ERASE_VARIANTS["torchvision"]),
  # mpanet.md §9 row 5: the pad + crop (fill 127) is in the code, not in the paper; this is the
  # paper's reading (flip and random erasing only).
  "mpanet_nopad": AugmentConfig(pad=0, pad_fill=127, erase_p=0.5, **ERASE_VARIANTS["torchvision"]),
  # The same at the synthetic demo's 64x32 (a 10-pixel pad would move a third of the image).
  "mpanet_small": AugmentConfig(pad=2, pad_fill=127, erase_p=0.5,
                                **ERASE_VARIANTS["torchvision"]),
  # DEEN greys before cropping; greyscale is per pixel and maps the zero fill to itself, so it
  # commutes with pad/crop/flip.
  "deen": AugmentConfig(gray_p=0.5, erase_p=0.5, **ERASE_VARIANTS["deen"]),
  "deen_sysu": AugmentConfig(
      gray_p=0.5, erase_p=0.5, **{**ERASE_VARIANTS["deen"], "erase_area": (0.2, 0.8)}),
}


def preset(name: str) -> AugmentConfig:
  """Returns the named preset; raises ValueError listing the valid names when unknown."""
  if name not in PRESETS:
    raise ValueError(f"Unknown augmentation preset {name!r}; valid presets: {sorted(PRESETS)}")
  return PRESETS[name]


def draw_params_batch(
    rng: np.random.Generator, cfg: AugmentConfig, n: int, height: int, width: int,
) -> dict[str, np.ndarray]:
  """Draws the parameters of `n` independent samples, vectorised over samples and attempts.

  Disabled operations get neutral values (crop at the pad, no flip/grey/erase, channel -1).
  Erasing draws all `erase_attempts` candidates at once and keeps the first that fits (h < H
  and w < W), which has the same law as the reference's sequential loop.

  Args:
    rng: host generator; the same state gives the same parameters.
    cfg: augmentation config.
    n: number of samples.
    height: image height H the parameters are for.
    width: image width W.

  Returns:
    `PARAM_KEYS` -> array [n] of the dtype in `PARAM_DTYPES`.
  """
  if n < 0 or height < 1 or width < 1:
    raise ValueError(f"need n >= 0 and a positive image size, got n={n}, {height}x{width}")
  out = {k: np.zeros(n, dtype) for k, dtype in PARAM_DTYPES.items()}
  out["channel"] -= 1
  if cfg.pad > 0:
    out["crop_y"][:] = rng.integers(0, 2 * cfg.pad, size=n, endpoint=True)
    out["crop_x"][:] = rng.integers(0, 2 * cfg.pad, size=n, endpoint=True)
  if cfg.flip_p > 0:
    out["flip"][:] = rng.random(n) < cfg.flip_p
  if cfg.gray_p > 0:
    out["gray"][:] = rng.random(n) < cfg.gray_p
  if cfg.erase_p > 0:
    shape = (n, cfg.erase_attempts)
    area = rng.uniform(*cfg.erase_area, size=shape) * (height * width)
    if cfg.erase_log_aspect:
      aspect = np.exp(rng.uniform(*np.log(cfg.erase_aspect), size=shape))
    else:
      aspect = rng.uniform(*cfg.erase_aspect, size=shape)
    # np.rint rounds half to even, like Python's round() in the references.
    hs = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    ws = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (hs < height) & (ws < width)
    first = np.argmax(fits, axis=1)
    rows = np.arange(n)
    erase = (rng.random(n) < cfg.erase_p) & fits[rows, first]
    h = np.where(erase, hs[rows, first], 0)
    w = np.where(erase, ws[rows, first], 0)
    # Inclusive bounds, as random.randint(0, H - h) in the references.
    y = rng.integers(0, height - h, endpoint=True)
    x = rng.integers(0, width - w, endpoint=True)
    out["erase"][:] = erase
    out["erase_h"][:], out["erase_w"][:] = h, w
    out["erase_y"][:], out["erase_x"][:] = np.where(erase, y, 0), np.where(erase, x, 0)
  if cfg.channel_mode != "none":
    run = rng.random(n) < cfg.channel_p
    if cfg.channel_mode == "exchange":
      k = rng.integers(0, 3, size=n)
    else:
      # k == 3 is the reference's grey branch, itself taken with probability 0.5.
      k = rng.integers(0, 4, size=n)
      k = np.where((k == 3) & (rng.random(n) >= 0.5), -1, k)
    out["channel"][:] = np.where(run, k, -1)
  return out


def draw_params(
    rng: np.random.Generator, cfg: AugmentConfig, height: int, width: int,
) -> dict[str, np.ndarray]:
  """Draws one sample's parameters: `PARAM_KEYS` -> 0-d arrays (see `draw_params_batch`)."""
  return {k: v.reshape(()) for k, v in draw_params_batch(rng, cfg, 1, height, width).items()}


@functools.lru_cache(maxsize=16)
def _norm_consts(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
  # (x / 255 - mean) / std folded into one multiply-add, computed once in float64; both
  # backends use the same float32 constants so their outputs agree to rounding.
  scale = (1.0 / (255.0 * np.asarray(std, np.float64))).astype(np.float32)
  bias = (-np.asarray(mean, np.float64) / np.asarray(std, np.float64)).astype(np.float32)
  # Cached and shared between calls, so guard against in-place edits.
  scale.setflags(write=False)
  bias.setflags(write=False)
  return scale, bias


def _normalize_np(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  scale, bias = _norm_consts(tuple(mean), tuple(std))
  # In place on the fresh float32 copy: the same multiply-then-add as `_normalize_jnp`,
  # without a second full-size temporary.
  y = x.astype(np.float32)
  y *= scale
  y += bias
  return y


def _normalize_jnp(x: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
  scale, bias = _norm_consts(tuple(mean), tuple(std))
  return x.astype(jnp.float32) * scale + bias


def _pil_gray(x: Any, xp: ModuleType) -> Any:
  """uint8 [..., 3] -> uint8 [..., 1] PIL luminance, in integer arithmetic for either backend."""
  xi = x.astype(np.int32)
  lum = xi[..., 0] * _PIL_LUMA[0] + xi[..., 1] * _PIL_LUMA[1] + xi[..., 2] * _PIL_LUMA[2]
  return xp.expand_dims(((lum + 32768) >> 16).astype(np.uint8), -1)


def _caj_luma(y: Any) -> Any:
  """float32 [..., 3] -> [...] CAJ luminance; one expression so both backends round alike."""
  return _CAJ_LUMA[0] * y[..., 0] + _CAJ_LUMA[1] * y[..., 1] + _CAJ_LUMA[2] * y[..., 2]


def normalize_numpy(
    image: np.ndarray, *, mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> np.ndarray:
  """Test-time path: uint8 [..., 3] -> float32 [..., 3], (x / 255 - mean) / std."""
  image = np.asarray(image)
  _check_images(image.shape, image.dtype, None)
  return _normalize_np(image, mean, std)


def normalize_jax(
    images: jax.Array, *, mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> jax.Array:
  """Test-time path on device: uint8 [..., 3] -> float32 [..., 3], as `normalize_numpy`."""
  images = jnp.asarray(images)
  _check_images(images.shape, images.dtype, None)
  return _normalize_jnp(images, mean, std)


def _check_images(shape: tuple[int, ...], dtype: Any, ndim: int | None) -> None:
  """Raises unless `shape`/`dtype` describe uint8 RGB images with `ndim` axes (None: any)."""
  if (ndim is not None and len(shape) != ndim) or not shape or shape[-1] != 3 or dtype != np.uint8:
    layout = {None: "[..., 3]", 3: "[H, W, 3]", 4: "[B, H, W, 3]"}[ndim]
    raise ValueError(f"expected uint8 images {layout}, got {dtype} {tuple(shape)}; "
                     "pass the decoded uint8 pixels, not a float or [0, 1] tensor")


def apply_numpy(image: np.ndarray, params: dict[str, np.ndarray], cfg: AugmentConfig) -> np.ndarray:
  """Augments one image on the host.

  An operation whose switch is off in `cfg` is skipped and its parameters ignored, exactly as
  in `apply_jax`.

  Args:
    image: uint8 [H, W, 3].
    params: one sample from `draw_params` for this H x W and `cfg`.
    cfg: the config the parameters were drawn with.

  Returns:
    float32 [H, W, 3], normalised.
  """
  image = np.asarray(image)
  _check_images(image.shape, image.dtype, 3)
  h, w, _ = image.shape
  x = image
  if cfg.pad > 0:
    p, cy, cx = cfg.pad, int(params["crop_y"]), int(params["crop_x"])
    if not (0 <= cy <= 2 * p and 0 <= cx <= 2 * p):
      raise ValueError(f"crop offsets ({cy}, {cx}) outside [0, {2 * p}] for pad {p}")
    # Copy only the overlap into a filled canvas instead of padding the whole image.
    x = np.full_like(image, cfg.pad_fill)
    sy, sx = cy - p, cx - p
    y0, y1, x0, x1 = max(0, -sy), min(h, h - sy), max(0, -sx), min(w, w - sx)
    x[y0:y1, x0:x1] = image[y0 + sy:y1 + sy, x0 + sx:x1 + sx]
  if cfg.flip_p > 0 and bool(params["flip"]):
    x = x[:, ::-1]
  if cfg.gray_p > 0 and bool(params["gray"]):
    x = np.broadcast_to(_pil_gray(x, np), x.shape)
  y = _normalize_np(x, cfg.mean, cfg.std)
  if cfg.erase_p > 0 and bool(params["erase"]):
    ey, ex = int(params["erase_y"]), int(params["erase_x"])
    y[ey:ey + int(params["erase_h"]), ex:ex + int(params["erase_w"])] = np.asarray(
        cfg.erase_fill, np.float32)
  if cfg.channel_mode != "none":
    k = int(params["channel"])
    if k >= 0:
      # Copy before writing: y[..., k] is a view into y.
      single = _caj_luma(y) if k == 3 else y[..., k].copy()
      y[...] = single[..., None]
  return y


def apply_jax(images: jax.Array, params: dict[str, jax.Array], cfg: AugmentConfig) -> jax.Array:
  """Augments a batch on device; `jax.jit(apply_jax, static_argnames="cfg")` compiles it.

  Equal to `apply_numpy` per image (to float32 rounding). Per-sample choices are vectorised
  masks (`where`) and a vmapped `dynamic_slice` for the crop; no Python loop over the batch.
  Crop offsets outside [0, 2 * pad] cannot raise under jit; `dynamic_slice` clamps them.
  The same as `apply_jax_tensor(apply_jax_pixels(images, params, cfg), params, cfg)`: the
  two halves let a method change the augmented pixels before normalisation (BDF derives its
  images there, `maumjax.data.derive`).

  Args:
    images: uint8 [B, H, W, 3].
    params: `PARAM_KEYS` -> [B], e.g. from `draw_params_batch`.
    cfg: the config the parameters were drawn with (static).

  Returns:
    float32 [B, H, W, 3], normalised.
  """
  return apply_jax_tensor(apply_jax_pixels(images, params, cfg), params, cfg)


def _per_sample(params: dict[str, jax.Array], name: str) -> jax.Array:
  """[B] parameter -> [B, 1, 1], to broadcast against [B, H, W]."""
  return jnp.asarray(params[name])[:, None, None]


def apply_jax_pixels(images: jax.Array, params: dict[str, jax.Array],
                     cfg: AugmentConfig) -> jax.Array:
  """The pixel half of `apply_jax`: pad, crop, flip and greyscale on uint8 images.

  Args:
    images: uint8 [B, H, W, 3].
    params: `PARAM_KEYS` -> [B].
    cfg: the config the parameters were drawn with (static).

  Returns:
    uint8 [B, H, W, 3], the augmented pixels before normalisation.
  """
  images = jnp.asarray(images)
  _check_images(images.shape, images.dtype, 4)
  _, h, w, _ = images.shape
  x = images
  if cfg.pad > 0:
    p = cfg.pad
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=np.uint8(cfg.pad_fill))

    def crop(img: jax.Array, cy: jax.Array, cx: jax.Array) -> jax.Array:
      return jax.lax.dynamic_slice(img, (cy, cx, jnp.int32(0)), (h, w, 3))

    x = jax.vmap(crop)(padded, jnp.asarray(params["crop_y"], jnp.int32),
                       jnp.asarray(params["crop_x"], jnp.int32))
  if cfg.flip_p > 0:
    x = jnp.where(_per_sample(params, "flip")[..., None], x[:, :, ::-1], x)
  if cfg.gray_p > 0:
    x = jnp.where(_per_sample(params, "gray")[..., None], _pil_gray(x, jnp), x)
  return x


def apply_jax_tensor(pixels: jax.Array, params: dict[str, jax.Array],
                     cfg: AugmentConfig) -> jax.Array:
  """The tensor half of `apply_jax`: normalise, random erasing, channel operation.

  Args:
    pixels: [B, H, W, 3] on the 0..255 scale: uint8 from `apply_jax_pixels`, or float (e.g.
      the output of a learnable colour map, which must stay differentiable).
    params: `PARAM_KEYS` -> [B].
    cfg: the config the parameters were drawn with (static).

  Returns:
    float32 [B, H, W, 3].
  """
  if pixels.ndim != 4 or pixels.shape[-1] != 3:
    raise ValueError(f"expected pixels [B, H, W, 3], got {pixels.shape}")
  _, h, w, _ = pixels.shape
  y = _normalize_jnp(pixels, cfg.mean, cfg.std)
  if cfg.erase_p > 0:
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    ey, ex = _per_sample(params, "erase_y"), _per_sample(params, "erase_x")
    inside = ((rows >= ey) & (rows < ey + _per_sample(params, "erase_h"))
              & (cols >= ex) & (cols < ex + _per_sample(params, "erase_w")))
    mask = _per_sample(params, "erase") & inside
    y = jnp.where(mask[..., None], jnp.asarray(cfg.erase_fill, jnp.float32), y)
  if cfg.channel_mode != "none":
    k = _per_sample(params, "channel")
    single = jnp.where(k == 0, y[..., 0], jnp.where(k == 1, y[..., 1], y[..., 2]))
    single = jnp.where(k == 3, _caj_luma(y), single)
    y = jnp.where((k >= 0)[..., None], single[..., None], y)
  return y
