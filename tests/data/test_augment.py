"""Tests for maumjax.data.augment: hand-worked cases, naive references, draw statistics, parity.

Statistical checks use fixed seeds and bounds of about 4-5 standard errors, so they are
deterministic and fail only if the drawn distribution is wrong.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from PIL import Image

from maumjax.data import augment

_apply_jax = jax.jit(augment.apply_jax, static_argnames="cfg")
# Only the operation under test is on: no pad, no flip, nothing else.
_BARE = augment.AugmentConfig(pad=0, flip_p=0.0)
# Everything on, including a non-zero pad fill and CAJ+ style channel probability.
_ALL_ON = augment.AugmentConfig(
    pad=3, pad_fill=127, flip_p=0.5, gray_p=0.5, erase_p=0.7, channel_mode="adaptive",
    channel_p=0.8)


def _neutral(**overrides: object) -> dict[str, np.ndarray]:
  """One sample's params with every operation neutral, then the given overrides."""
  params = {"crop_y": 0, "crop_x": 0, "flip": False, "gray": False, "erase": False,
            "erase_y": 0, "erase_x": 0, "erase_h": 0, "erase_w": 0, "channel": -1}
  params.update(overrides)
  return {k: np.asarray(v, augment.PARAM_DTYPES[k]) for k, v in params.items()}


def _random_image(seed: int, h: int = 32, w: int = 16) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _within(count: int, n: int, p: float, k: float = 4.5) -> bool:
  return abs(count / n - p) <= k * np.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------- pad, crop, flip, grey, normalise


def test_pad_crop_hand_worked_2x2():
  # pad 1 around [[a, b], [c, d]] gives a 4x4 canvas; offset (0, 0) keeps its top-left 2x2,
  # i.e. [[F, F], [F, a]]; offset (2, 2) keeps [[d, F], [F, F]].
  img = np.array([[[10] * 3, [20] * 3], [[30] * 3, [40] * 3]], np.uint8)
  cfg = dataclasses.replace(_BARE, pad=1, pad_fill=127)
  f = 127
  got = augment.apply_numpy(img, _neutral(crop_y=0, crop_x=0), cfg)
  want = np.array([[[f] * 3, [f] * 3], [[f] * 3, [10] * 3]], np.uint8)
  np.testing.assert_array_equal(got, augment.normalize_numpy(want))
  got = augment.apply_numpy(img, _neutral(crop_y=2, crop_x=2), cfg)
  want = np.array([[[40] * 3, [f] * 3], [[f] * 3, [f] * 3]], np.uint8)
  np.testing.assert_array_equal(got, augment.normalize_numpy(want))


@pytest.mark.parametrize("pad_fill", [0, 127])
@pytest.mark.parametrize("offset", ["zero", "max", "centre"])
def test_pad_crop_matches_pixel_loop(pad_fill, offset):
  h, w, p = 7, 5, 2
  # Distinct values per pixel and channel: 10*y + x + 80*c (all < 255 and != 127).
  yy, xx, cc = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
  img = (10 * yy + xx + 80 * cc).astype(np.uint8)
  dy, dx = {"zero": (0, 0), "max": (2 * p, 2 * p), "centre": (p, p)}[offset]
  want = np.empty_like(img)
  for y in range(h):
    for x in range(w):
      sy, sx = y + dy - p, x + dx - p
      want[y, x] = img[sy, sx] if 0 <= sy < h and 0 <= sx < w else pad_fill
  cfg = dataclasses.replace(_BARE, pad=p, pad_fill=pad_fill)
  got = augment.apply_numpy(img, _neutral(crop_y=dy, crop_x=dx), cfg)
  np.testing.assert_array_equal(got, augment.normalize_numpy(want))
  if offset == "centre":
    np.testing.assert_array_equal(want, img)


def test_flip_reverses_columns():
  img = _random_image(0)
  cfg = dataclasses.replace(_BARE, flip_p=0.5)
  np.testing.assert_array_equal(augment.apply_numpy(img, _neutral(flip=True), cfg),
                                augment.normalize_numpy(img[:, ::-1]))
  np.testing.assert_array_equal(augment.apply_numpy(img, _neutral(flip=False), cfg),
                                augment.normalize_numpy(img))


def test_flip_before_crop_equals_crop_then_flip_at_mirrored_offset():
  # Why MPANet's flip-then-pad/crop order is equivalent in distribution to ours.
  img, p = _random_image(1), 4
  padded = np.pad(img, ((p, p), (p, p), (0, 0)), constant_values=127)
  h, w, _ = img.shape
  cfg = dataclasses.replace(_BARE, pad=p, pad_fill=127, flip_p=0.5)
  for dy, dx in [(0, 0), (3, 1), (8, 8), (2, 7)]:
    flipped_first = padded[:, ::-1][dy:dy + h, dx:dx + w]
    ours = augment.apply_numpy(img, _neutral(crop_y=dy, crop_x=2 * p - dx, flip=True), cfg)
    np.testing.assert_array_equal(ours, augment.normalize_numpy(flipped_first))


def test_gray_hand_worked_pixels():
  # PIL luma (R*19595 + G*38470 + B*7471 + 32768) >> 16:
  #   red   255*19595 + 32768 = 5029493 -> 76;  green 255*38470 + 32768 = 9842618 -> 150;
  #   blue  255*7471 + 32768 = 1937873 -> 29;   (100, 150, 200): 9224200 + 32768 -> 141;
  #   (127, 127, 127) -> 127 (weights sum to 65536).
  img = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [100, 150, 200], [127] * 3]], np.uint8)
  want = np.array([76, 150, 29, 141, 127], np.uint8)
  cfg = dataclasses.replace(_BARE, gray_p=0.5)
  got = augment.apply_numpy(img, _neutral(gray=True), cfg)
  np.testing.assert_array_equal(got, augment.normalize_numpy(np.repeat(want[None, :, None], 3, -1)))


def test_gray_matches_pil_convert_l():
  img = _random_image(2, 24, 20)
  pil = np.asarray(Image.fromarray(img).convert("L").convert("RGB"))
  cfg = dataclasses.replace(_BARE, gray_p=1.0)
  np.testing.assert_array_equal(augment.apply_numpy(img, _neutral(gray=True), cfg),
                                augment.normalize_numpy(pil))


def test_normalize_hand_worked_pixel():
  # (255, 0, 51): ((1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225)
  #             = (2.2489083, -2.0357143, -0.9155556).
  img = np.array([[[255, 0, 51]]], np.uint8)
  want = np.array([[[2.2489083, -2.0357143, -0.9155556]]], np.float32)
  np.testing.assert_allclose(augment.normalize_numpy(img), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(augment.normalize_jax(img[None]), want[None], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(augment.apply_numpy(img, _neutral(), augment.preset("none")), want,
                             rtol=1e-6, atol=1e-6)
  assert augment.normalize_numpy(img).dtype == np.float32


# ---------------------------------------------------------------------------------- erasing


@pytest.mark.parametrize("variant", sorted(augment.ERASE_VARIANTS))
def test_erase_writes_fill_inside_rectangle_only(variant):
  img = _random_image(3)
  cfg = dataclasses.replace(_BARE, erase_p=0.5, **augment.ERASE_VARIANTS[variant])
  got = augment.apply_numpy(
      img, _neutral(erase=True, erase_y=5, erase_x=2, erase_h=10, erase_w=7), cfg)
  want = augment.normalize_numpy(img)
  inside = np.zeros(img.shape[:2], bool)
  inside[5:15, 2:9] = True
  np.testing.assert_array_equal(got[inside], np.broadcast_to(
      np.float32(cfg.erase_fill), (inside.sum(), 3)))
  np.testing.assert_array_equal(got[~inside], want[~inside])
  no_erase = _neutral(erase=False, erase_y=5, erase_x=2, erase_h=10, erase_w=7)
  np.testing.assert_array_equal(augment.apply_numpy(img, no_erase, cfg), want)


@pytest.mark.parametrize("name", ["caj_visible", "mpanet", "deen", "deen_sysu"])
def test_erase_draws_within_bounds_and_rate(name):
  cfg, n, h, w = augment.preset(name), 4000, 288, 144
  params = augment.draw_params_batch(np.random.default_rng(4), cfg, n, h, w)
  on = params["erase"]
  assert _within(on.sum(), n, cfg.erase_p)
  eh, ew, ey, ex = (params[k][on] for k in ("erase_h", "erase_w", "erase_y", "erase_x"))
  assert (eh >= 1).all() and (eh < h).all() and (ew >= 1).all() and (ew < w).all()
  assert (ey >= 0).all() and (ey + eh <= h).all() and (ex >= 0).all() and (ex + ew <= w).all()
  # Positions reach both inclusive ends for some rectangle size.
  assert (ey == 0).any() and (ey + eh == h).any() and (ex == 0).any() and (ex + ew == w).any()
  # Rounding h and w moves the area by a few per cent at most at this size.
  frac = eh * ew / (h * w)
  lo, hi = cfg.erase_area
  assert frac.min() >= 0.9 * lo and frac.max() <= 1.1 * hi
  assert frac.min() <= 1.5 * lo
  ratio = eh / ew
  assert ratio.min() >= 0.85 * cfg.erase_aspect[0] and ratio.max() <= 1.15 * cfg.erase_aspect[1]
  for k in ("erase_h", "erase_w", "erase_y", "erase_x"):
    assert (params[k][~on] == 0).all()


def test_erase_area_and_aspect_laws_without_rejection():
  # Small areas on a square image are always accepted, so the draws show the raw laws:
  # area ~ U(0.02, 0.1) (mean 0.06); uniform aspect has median (0.3 + 3.3) / 2 = 1.8.
  n, side = 4000, 256
  cfg = augment.AugmentConfig(erase_p=1.0, erase_area=(0.02, 0.1), erase_aspect=(0.3, 3.3))
  params = augment.draw_params_batch(np.random.default_rng(5), cfg, n, side, side)
  assert params["erase"].all()
  frac = params["erase_h"] * params["erase_w"] / side**2
  assert abs(frac.mean() - 0.06) < 0.003
  assert abs(np.median(params["erase_h"] / params["erase_w"]) - 1.8) < 0.12


def test_torchvision_aspect_is_log_uniform():
  # Log-uniform on (0.3, 3.3): median = sqrt(0.3 * 3.3) = 0.995, against 1.8 if uniform. On a
  # square image the rejection region is symmetric in log(aspect), so the median is kept.
  n, side = 4000, 256
  params = augment.draw_params_batch(
      np.random.default_rng(6), augment.preset("mpanet"), n, side, side)
  on = params["erase"]
  log_ratio = np.log(params["erase_h"][on] / params["erase_w"][on])
  assert abs(np.median(log_ratio) - np.log(np.sqrt(0.3 * 3.3))) < 0.08
  # Log-uniform puts as much mass below 1 as above it.
  assert _within((log_ratio < 0).sum(), on.sum(), 0.5, k=5)


def test_erase_gives_up_when_nothing_fits():
  # A 4x4 image cannot hold h < 4, w < 4 with area >= 0.99 * 16.
  cfg = augment.AugmentConfig(erase_p=1.0, erase_area=(0.99, 1.0), erase_attempts=5)
  params = augment.draw_params_batch(np.random.default_rng(7), cfg, 50, 4, 4)
  assert not params["erase"].any()
  assert all((params[k] == 0).all() for k in ("erase_h", "erase_w", "erase_y", "erase_x"))


# ------------------------------------------------------------------------------ channel ops


@pytest.mark.parametrize("k", [0, 1, 2])
def test_channel_copy(k):
  img = _random_image(8)
  cfg = dataclasses.replace(_BARE, channel_mode="exchange")
  got = augment.apply_numpy(img, _neutral(channel=k), cfg)
  norm = augment.normalize_numpy(img)
  for c in range(3):
    np.testing.assert_array_equal(got[..., c], norm[..., k])


def test_channel_luma_hand_worked():
  # Normalised (255, 0, 51) = (2.2489083, -2.0357143, -0.9155556);
  # 0.2989 * 2.2489083 + 0.5870 * -2.0357143 + 0.1140 * -0.9155556 = -0.6271389.
  img = np.array([[[255, 0, 51]]], np.uint8)
  cfg = dataclasses.replace(_BARE, channel_mode="adaptive")
  got = augment.apply_numpy(img, _neutral(channel=3), cfg)
  np.testing.assert_allclose(got, np.full((1, 1, 3), -0.6271389, np.float32), atol=1e-6)
  unchanged = augment.apply_numpy(img, _neutral(channel=-1), cfg)
  np.testing.assert_array_equal(unchanged, augment.normalize_numpy(img))


@pytest.mark.parametrize("channel_p", [1.0, 0.6])
def test_adaptive_outcome_frequencies(channel_p):
  # Runs with probability p; then R, G, B 1/4 each, luma 1/8, unchanged 1/8.
  n = 8000
  cfg = augment.AugmentConfig(channel_mode="adaptive", channel_p=channel_p)
  ch = augment.draw_params_batch(np.random.default_rng(9), cfg, n, 8, 8)["channel"]
  want = {0: channel_p / 4, 1: channel_p / 4, 2: channel_p / 4, 3: channel_p / 8,
          -1: 1 - channel_p + channel_p / 8}
  assert set(np.unique(ch)) == set(want)
  for value, p in want.items():
    assert _within((ch == value).sum(), n, p), (value, (ch == value).mean(), p)


def test_exchange_outcome_frequencies():
  n = 6000
  ch = augment.draw_params_batch(
      np.random.default_rng(10), augment.preset("caj_visible_exchange"), n, 8, 8)["channel"]
  assert set(np.unique(ch)) == {0, 1, 2}
  for value in range(3):
    assert _within((ch == value).sum(), n, 1 / 3)


# ------------------------------------------------------------------------------- draw_params


def test_draw_params_deterministic():
  cfg = _ALL_ON
  a = augment.draw_params(np.random.default_rng(11), cfg, 32, 16)
  b = augment.draw_params(np.random.default_rng(11), cfg, 32, 16)
  assert all(np.array_equal(a[k], b[k]) for k in augment.PARAM_KEYS)
  a = augment.draw_params_batch(np.random.default_rng(12), cfg, 20, 32, 16)
  b = augment.draw_params_batch(np.random.default_rng(12), cfg, 20, 32, 16)
  c = augment.draw_params_batch(np.random.default_rng(13), cfg, 20, 32, 16)
  assert all(np.array_equal(a[k], b[k]) for k in augment.PARAM_KEYS)
  assert not all(np.array_equal(a[k], c[k]) for k in augment.PARAM_KEYS)


@pytest.mark.parametrize("name", sorted(augment.PRESETS))
def test_param_keys_and_dtypes_fixed(name):
  cfg = augment.preset(name)
  one = augment.draw_params(np.random.default_rng(14), cfg, 32, 16)
  batch = augment.draw_params_batch(np.random.default_rng(14), cfg, 5, 32, 16)
  assert tuple(one) == augment.PARAM_KEYS == tuple(batch)
  for k in augment.PARAM_KEYS:
    assert one[k].shape == () and one[k].dtype == augment.PARAM_DTYPES[k]
    assert batch[k].shape == (5,) and batch[k].dtype == augment.PARAM_DTYPES[k]


def test_neutral_params_for_disabled_ops():
  params = augment.draw_params_batch(np.random.default_rng(15), augment.preset("none"), 50, 8, 8)
  assert all((params[k] == v).all() for k, v in _neutral().items())


def test_crop_offsets_uniform_and_flip_rate():
  n, p = 8400, 10
  params = augment.draw_params_batch(np.random.default_rng(16), augment.preset("agw"), n, 32, 16)
  for key in ("crop_y", "crop_x"):
    counts = np.bincount(params[key], minlength=2 * p + 1)
    assert counts.size == 2 * p + 1 and params[key].min() == 0
    expected = n / (2 * p + 1)
    # Chi-square with 20 degrees of freedom: its 99.9% quantile is 45.3.
    assert ((counts - expected) ** 2 / expected).sum() < 45.3
  assert _within(params["flip"].sum(), n, 0.5)
  assert not params["gray"].any() and not params["erase"].any()


# ------------------------------------------------------------------ numpy vs jax, shapes, config


@pytest.mark.parametrize("name", sorted(augment.PRESETS) + ["_all_on"])
def test_numpy_and_jax_agree(name):
  cfg = _ALL_ON if name == "_all_on" else augment.preset(name)
  rng = np.random.default_rng(17)
  b, h, w = 24, 32, 16
  images = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
  params = augment.draw_params_batch(rng, cfg, b, h, w)
  got = np.asarray(_apply_jax(images, params, cfg=cfg))
  want = np.stack([augment.apply_numpy(images[i], {k: v[i] for k, v in params.items()}, cfg)
                   for i in range(b)])
  assert got.dtype == np.float32 and got.shape == (b, h, w, 3)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_jax_handles_every_channel_value_and_erase_edges():
  # Hand-set params reach cases random draws may miss: luma in exchange mode, full-edge boxes.
  cfg = dataclasses.replace(_ALL_ON, channel_mode="exchange")
  images = np.stack([_random_image(18 + i, 12, 8) for i in range(5)])
  rows = [_neutral(channel=c, erase=True, erase_y=12 - 3, erase_x=0, erase_h=3, erase_w=7,
                   crop_y=6, crop_x=0, gray=c == 1, flip=c == 2) for c in (-1, 0, 1, 2, 3)]
  params = {k: np.stack([r[k] for r in rows]) for k in augment.PARAM_KEYS}
  got = np.asarray(_apply_jax(images, params, cfg=cfg))
  want = np.stack([augment.apply_numpy(images[i], rows[i], cfg) for i in range(5)])
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_training_size_shapes():
  cfg, h, w = augment.preset("caj_thermal"), 288, 144
  rng = np.random.default_rng(19)
  images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
  params = augment.draw_params_batch(rng, cfg, 2, h, w)
  out = _apply_jax(images, params, cfg=cfg)
  assert out.shape == (2, h, w, 3) and out.dtype == np.float32
  one = augment.apply_numpy(images[0], augment.draw_params(rng, cfg, h, w), cfg)
  assert one.shape == (h, w, 3) and one.dtype == np.float32


def test_rejects_float_images():
  with pytest.raises(ValueError, match="uint8"):
    augment.apply_numpy(np.zeros((4, 4, 3), np.float32), _neutral(), _BARE)
  with pytest.raises(ValueError, match="uint8"):
    augment.apply_jax(np.zeros((4, 4, 3), np.uint8), _neutral(), _BARE)
  with pytest.raises(ValueError, match="uint8"):
    augment.normalize_numpy(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("field, value, message", [
    ("flip_p", 1.5, r"flip_p.*\[0, 1\].*1\.5"),
    ("erase_p", -0.1, r"erase_p.*-0\.1"),
    ("pad", -1, r"pad.*>= 0.*-1"),
    ("pad_fill", 300, r"pad_fill.*300"),
    ("channel_mode", "swap", r"channel_mode.*'none'.*'exchange'.*'adaptive'.*'swap'"),
    ("erase_area", (0.5, 0.2), r"erase_area.*\(0\.5, 0\.2\)"),
    ("erase_aspect", (0.0, 2.0), r"erase_aspect.*\(0\.0, 2\.0\)"),
    ("erase_attempts", 0, r"erase_attempts.*0"),
])
def test_config_validation_names_field_and_value(field, value, message):
  with pytest.raises(ValueError, match=message):
    augment.AugmentConfig(**{field: value})


def test_config_hashable_and_lists_become_tuples():
  cfg = augment.AugmentConfig(erase_area=[0.1, 0.2], mean=[0.5, 0.5, 0.5])
  assert cfg.erase_area == (0.1, 0.2) and cfg.mean == (0.5, 0.5, 0.5)
  assert hash(cfg) == hash(augment.AugmentConfig(erase_area=(0.1, 0.2), mean=(0.5, 0.5, 0.5)))
  assert len({augment.preset(n) for n in augment.PRESETS}) == len(augment.PRESETS)


def test_unknown_preset_lists_valid_names():
  with pytest.raises(ValueError, match=r"'caj_thermal'.*'mpanet'"):
    augment.preset("cajj")


def test_mpanet_nopad_is_the_mpanet_recipe_without_pad_and_crop():
  """mpanet.md §9 row 5: the paper's reading drops only the pad + crop."""
  full, nopad = augment.preset("mpanet"), augment.preset("mpanet_nopad")
  assert full.pad == 10 and full.pad_fill == 127 and nopad.pad == 0
  assert dataclasses.replace(full, pad=0) == nopad
  params = augment.draw_params_batch(np.random.default_rng(7), nopad, 200, 32, 16)
  assert (params["crop_y"] == 0).all() and (params["crop_x"] == 0).all()
  assert 0 < params["flip"].mean() < 1 and 0 < params["erase"].mean() < 1
