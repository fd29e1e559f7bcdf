"""MPANet pattern-separation loss against hand cases and a NumPy loop (mpanet.md §4.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maumjax import losses
from tests.losses import naive_mpanet as naive

_sep = jax.jit(losses.pattern_separation_loss)


@pytest.mark.parametrize("shape", [(3, 4, 3, 6), (2, 5, 2, 2)])
def test_matches_numpy_loop(shape):
  rng = np.random.default_rng(sum(shape))
  maps = jax.nn.sigmoid(rng.normal(size=shape)).astype(np.float32)
  np.testing.assert_allclose(_sep(maps), naive.pattern_separation(maps), rtol=1e-5)


def test_orthogonal_maps_give_zero():
  # Two maps with disjoint supports (left and right halves): G_01 = 0.
  maps = np.zeros((2, 3, 4, 2), np.float32)
  maps[:, :, :2, 0] = 0.9
  maps[:, :, 2:, 1] = 0.6
  np.testing.assert_array_equal(_sep(maps), 0.0)


def test_identical_maps_known_value():
  # l = 3 identical maps of 0.5 on 2×3 positions: every G_ij = 6 · 0.25 = 1.5, so the loss (a
  # mean over the 3 pairs i < j and the 2 samples) is 1.5. With the diagonal it would be 3.0.
  maps = np.full((2, 2, 3, 3), 0.5, np.float32)
  np.testing.assert_allclose(_sep(maps), 1.5, rtol=1e-6)


def test_per_sample_normalisation():
  # Sample 0: maps (1, 1) on one position -> G_01 = 1; sample 1: (1, 0) -> 0. Mean: 0.5.
  maps = np.array([[[[1.0, 1.0]]], [[[1.0, 0.0]]]], np.float32)
  np.testing.assert_allclose(_sep(maps), 0.5, rtol=1e-6)


def test_bfloat16_input_computed_in_float32():
  maps = jax.nn.sigmoid(np.random.default_rng(1).normal(size=(2, 3, 3, 4)))
  maps_bf16 = jnp.asarray(maps, jnp.bfloat16)
  loss = _sep(maps_bf16)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, naive.pattern_separation(np.asarray(maps_bf16, np.float64)),
                             rtol=1e-5)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match=r"\[B, H, W, l\]"):
    losses.pattern_separation_loss(jnp.ones((2, 3, 4)))
  with pytest.raises(ValueError, match=r"l >= 2"):
    losses.pattern_separation_loss(jnp.ones((2, 3, 4, 1)))
