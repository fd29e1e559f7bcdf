"""Heads: GeM against its formula, stripe splitting, BN-neck without bias, per-part weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maumjax.models.heads import (
  BNNeck,
  GlobalHead,
  PartHead,
  avg_pool,
  gem_pool,
  l2_normalize,
  pool_stripes,
  stripe_bounds,
)


def test_gem_matches_numpy_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(0.5, 1.0, (2, 5, 3, 4)).astype(np.float32)  # negatives exercise the clamp
  for p in (3.0, 2.5):
    expected = np.mean(np.maximum(x.astype(np.float64), 1e-6) ** p, axis=(1, 2)) ** (1 / p)
    np.testing.assert_allclose(gem_pool(jnp.asarray(x), p), expected, rtol=1e-5)


def test_gem_with_p1_is_average_and_large_p_approaches_max():
  x = jnp.asarray(np.random.default_rng(1).uniform(0.1, 2.0, (3, 4, 4, 6)), jnp.float32)
  np.testing.assert_allclose(gem_pool(x, 1.0), avg_pool(x), rtol=1e-6)
  np.testing.assert_allclose(avg_pool(x), np.asarray(x).mean(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_allclose(gem_pool(x, 60.0), np.asarray(x).max(axis=(1, 2)), rtol=0.05)
  assert gem_pool(x.astype(jnp.bfloat16)).dtype == jnp.float32


def test_stripe_bounds():
  assert stripe_bounds(18, 6) == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15), (15, 18)]
  # Not divisible: torch AdaptiveAvgPool2d bins; every row is covered, stripes may overlap.
  assert stripe_bounds(9, 6) == [(0, 2), (1, 3), (3, 5), (4, 6), (6, 8), (7, 9)]
  assert stripe_bounds(7, 3) == [(0, 3), (2, 5), (4, 7)]
  with pytest.raises(ValueError, match="height 4 is smaller than num_parts=6"):
    stripe_bounds(4, 6)


@pytest.mark.parametrize("pool", ["gem", "avg"])
def test_each_stripe_pools_its_own_rows(pool):
  values = np.arange(1.0, 7.0, dtype=np.float32)  # stripe i is filled with i + 1
  fmap = np.repeat(values, 3)[None, :, None, None] * np.ones((2, 18, 5, 4), np.float32)
  stripes = pool_stripes(jnp.asarray(fmap), 6, pool)
  assert stripes.shape == (2, 6, 4)
  np.testing.assert_allclose(stripes, np.broadcast_to(values[None, :, None], (2, 6, 4)),
                             rtol=1e-5)


def test_part_head_uses_per_part_stripes_and_weights():
  head = PartHead(num_parts=3, dim=4, pool="avg")
  fmap = jnp.asarray(np.random.default_rng(2).normal(size=(5, 6, 2, 4)), jnp.float32)
  variables = head.init(jax.random.key(0), fmap, train=False)
  kernel = variables["params"]["reduce_kernel"]
  assert kernel.shape == (3, 4, 4)
  assert not np.allclose(kernel[0], kernel[1])  # independent initialisation per part
  # Identity reductions make 'pre' the pooled stripes themselves.
  eye = {**variables, "params": {**variables["params"],
                                 "reduce_kernel": jnp.broadcast_to(jnp.eye(4), (3, 4, 4))}}
  out = head.apply(eye, fmap, train=False)
  expected = np.asarray(fmap).reshape(5, 3, 2, 2, 4).mean(axis=(2, 3))
  np.testing.assert_allclose(out["pre"], expected, rtol=1e-5, atol=1e-6)
  # Zeroing part 1's kernel zeroes only part 1.
  zeroed = {**variables, "params": {**variables["params"],
                                    "reduce_kernel": kernel.at[1].set(0.0)}}
  pre = head.apply(zeroed, fmap, train=False)["pre"]
  base = head.apply(variables, fmap, train=False)["pre"]
  assert float(jnp.max(jnp.abs(pre[:, 1]))) == 0.0
  np.testing.assert_allclose(pre[:, [0, 2]], base[:, [0, 2]], rtol=1e-6)


def test_part_head_shapes_and_bn():
  head = PartHead(num_parts=6, dim=8)
  fmap = jax.nn.relu(jax.random.normal(jax.random.key(3), (6, 18, 9, 16)))
  variables = head.init(jax.random.key(0), fmap, train=False)
  assert set(variables["params"]["bnneck"]["bn"]) == {"scale"}
  assert variables["params"]["bnneck"]["bn"]["scale"].shape == (6, 8)
  out, state = head.apply(variables, fmap, train=True, mutable=["batch_stats"])
  assert out["pre"].shape == out["bn"].shape == (6, 6, 8)
  assert out["bn"].dtype == jnp.float32
  # Train-mode BN with scale 1 and no bias: every (part, dim) is standardised over the batch.
  pre = np.asarray(out["pre"], np.float64)
  expected = (pre - pre.mean(axis=0)) / np.sqrt(pre.var(axis=0) + 1e-5)
  np.testing.assert_allclose(out["bn"], expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(state["batch_stats"]["bnneck"]["bn"]["mean"],
                             0.1 * np.asarray(out["pre"]).mean(axis=0), rtol=1e-4, atol=1e-6)


def test_bnneck_has_no_bias_and_unit_scale():
  neck = BNNeck()
  x = jax.random.normal(jax.random.key(4), (7, 10)) * 3.0 + 2.0
  variables = neck.init(jax.random.key(0), x, train=False)
  assert jax.tree.map(jnp.shape, variables) == {
      "params": {"bn": {"scale": (10,)}},
      "batch_stats": {"bn": {"mean": (10,), "var": (10,)}}}
  np.testing.assert_array_equal(variables["params"]["bn"]["scale"], np.ones(10))
  # Eval mode with fresh statistics (mean 0, var 1) only rescales by 1/sqrt(1 + eps).
  y = neck.apply(variables, x.astype(jnp.bfloat16), train=False)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, x.astype(jnp.bfloat16).astype(jnp.float32) / np.sqrt(1 + 1e-5),
                             rtol=1e-6)


def test_global_head():
  head = GlobalHead(pool="gem")
  fmap = jax.nn.relu(jax.random.normal(jax.random.key(5), (4, 6, 3, 12)))
  variables = head.init(jax.random.key(0), fmap, train=False)
  out = head.apply(variables, fmap, train=False)
  assert out["pre"].shape == out["bn"].shape == (4, 1, 12)
  np.testing.assert_allclose(out["pre"][:, 0], gem_pool(fmap, 3.0), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown pool 'max'"):
    GlobalHead(pool="max").init(jax.random.key(0), fmap, train=False)


def test_l2_normalize():
  x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])
