"""BDF's derivations against NumPy references written from bdf.md §2 and hand-worked cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maumjax.data import derive


def _images(seed=0, b=3, h=6, w=5):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_grey_is_bt601_luma_replicated():
  x = _images()
  got = np.asarray(jax.jit(derive.grey)(x))
  y = 0.299 * x[..., 0].astype(np.float64) + 0.587 * x[..., 1] + 0.114 * x[..., 2]
  want = np.clip(np.round(y), 0, 255).astype(np.uint8)
  assert got.dtype == np.uint8 and got.shape == x.shape
  for c in range(3):
    # float32 products may land a rounding boundary on the other side: at most 1 apart.
    assert np.abs(got[..., c].astype(int) - want).max() <= 1
  assert np.mean(got[..., 0] == want) > 0.95
  # Hand case: pure red, green, blue and white.
  px = np.array([[[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]]], np.uint8)
  np.testing.assert_array_equal(np.asarray(derive.grey(px))[0, 0, :, 0], [76, 150, 29, 255])


def test_invert_is_an_involution():
  x = _images(1)
  np.testing.assert_array_equal(np.asarray(derive.invert(x)), 255 - x)
  np.testing.assert_array_equal(np.asarray(derive.invert(derive.invert(x))), x)


def _hist_eq_numpy(x):
  """Per image and channel, a loop over the 256 values (the docstring's formula)."""
  out = np.empty_like(x)
  n = x.shape[1] * x.shape[2]
  for b in range(x.shape[0]):
    for c in range(3):
      ch = x[b, :, :, c]
      counts = np.array([(ch == v).sum() for v in range(256)])
      cdf = np.cumsum(counts)
      cdf_min = cdf[ch.min()]
      if n == cdf_min:
        out[b, :, :, c] = ch
        continue
      lut = np.round(255.0 * (cdf - cdf_min) / (n - cdf_min))
      out[b, :, :, c] = lut[ch].astype(np.uint8)
  return out


def test_hist_eq_hand_case_and_numpy_loop():
  # One 2x2 channel with values 0, 0, 100, 200: cdf(0) = 2 = cdf_min, cdf(100) = 3, cdf(200)
  # = 4; 0 -> 0, 100 -> round(255 * 1 / 2) = 128 (half to even), 200 -> 255.
  ch = np.array([[0, 0], [100, 200]], np.uint8)
  x = np.stack([ch, ch, np.full((2, 2), 7, np.uint8)], axis=-1)[None]
  got = np.asarray(jax.jit(derive.hist_eq)(x))
  np.testing.assert_array_equal(got[0, :, :, 0], [[0, 0], [128, 255]])
  np.testing.assert_array_equal(got[0, :, :, 2], 7)  # a constant channel is left alone
  x = _images(2, b=4, h=7, w=9)
  np.testing.assert_array_equal(np.asarray(derive.hist_eq(x)), _hist_eq_numpy(x))


def test_contrast_gamma_follows_its_formula_per_image():
  x = _images(3, b=4)
  key = jax.random.PRNGKey(5)
  got = np.asarray(jax.jit(derive.contrast_gamma)(x, key))
  assert got.dtype == np.uint8 and got.shape == x.shape
  # The same draws, recomputed from the key as the docstring states them.
  k_gamma, k_contrast = jax.random.split(key)
  gamma = np.exp(np.asarray(jax.random.uniform(k_gamma, (4,), minval=np.log(0.5),
                                               maxval=np.log(2.0))))
  contrast = np.asarray(jax.random.uniform(k_contrast, (4,), minval=0.6, maxval=1.4))
  assert np.all((gamma >= 0.5) & (gamma <= 2.0)) and len(set(gamma.round(6))) == 4
  t = (x / 255.0) ** gamma[:, None, None, None]
  want = np.round(255 * np.clip(0.5 + contrast[:, None, None, None] * (t - 0.5), 0, 1))
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
  # Degenerate ranges: the identity.
  same = derive.contrast_gamma(x, key, gamma_range=(1.0, 1.0), contrast_range=(1.0, 1.0))
  np.testing.assert_array_equal(np.asarray(same), x)
  # Another key, other images.
  assert not np.array_equal(np.asarray(derive.contrast_gamma(x, jax.random.PRNGKey(6))), got)


def test_pseudocolor_is_the_jet_map_of_intensity():
  x = _images(4)
  got = np.asarray(jax.jit(derive.pseudocolor)(x)).astype(int)
  t = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]) / 255.0
  for c, centre in enumerate((3.0, 2.0, 1.0)):
    want = np.round(255 * np.clip(1.5 - np.abs(4 * t - centre), 0, 1))
    assert np.abs(got[..., c] - want).max() <= 1
  # Black is dark blue, white dark red, mid-grey green-ish.
  px = np.array([[[[0, 0, 0], [255, 255, 255]]]], np.uint8)
  np.testing.assert_array_equal(np.asarray(derive.pseudocolor(px))[0, 0],
                                [[0, 0, 128], [128, 0, 0]])


def test_derive_dispatch_and_pixel_alignment():
  x = jnp.asarray(_images(5))
  key = jax.random.PRNGKey(0)
  for name in ("grey", *derive.DERIVE_IR):
    out = np.asarray(derive.derive(x, key, name))
    assert out.shape == x.shape and out.dtype == np.uint8
  # Per-pixel maps commute with a flip (a spatial augmentation): derivative of the flipped
  # image = flipped derivative, so base and derivative stay pixel-aligned. (Histogram
  # equalisation is per image, and a flip keeps the histogram.)
  flipped = x[:, :, ::-1]
  for name in ("grey", *derive.DERIVE_IR):
    np.testing.assert_array_equal(np.asarray(derive.derive(flipped, key, name)),
                                  np.asarray(derive.derive(x, key, name))[:, :, ::-1])
  with pytest.raises(ValueError, match="learnable_1x1"):
    derive.derive(x, key, "learnable_1x1")
