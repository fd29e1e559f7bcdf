"""MPANet center-cluster loss against a hand-worked case and a NumPy loop (mpanet.md §4.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from maumjax import losses
from tests.losses import naive_mpanet as naive

_cc = jax.jit(losses.center_cluster_loss)


def _batch(seed, scale=0.3):
  """12 samples, shuffled, ids 7 (×4), 42 (×3), 1000 (×2), 5 (×2) and the singleton 13."""
  rng = np.random.default_rng(seed)
  labels = np.array([7] * 4 + [42] * 3 + [1000] * 2 + [5] * 2 + [13])[rng.permutation(12)]
  return (scale * rng.normal(size=(12, 8))).astype(np.float32), labels


def test_hand_worked_unequal_counts():
  # 1-D points (as 2-D rows): id 42 at -0.1, 0, 0.1 (centre 0), id 7 at 0.3, id 1000 at 1.2.
  # pull = (0.1 + 0 + 0.1 + 0 + 0) / 5 = 0.04.
  # Centre distances: 0.3 (42-7), 1.2 (42-1000), 0.9 (7-1000); ρ = 0.7 -> hinges 0.4, 0, 0.
  # Ordered pairs of ids: 2 · 0.4 / 6 = 0.133333 -> L = 0.173333.
  # Per-sample weighting would give (3 · 0.4/2 + 3 · 0.4/4 + 0) / 5 = 0.18 -> 0.22 instead.
  feats = np.array([[0.3, 0.0], [0.1, 0.0], [1.2, 0.0], [-0.1, 0.0], [0.0, 0.0]], np.float32)
  labels = np.array([7, 42, 1000, 42, 42])
  np.testing.assert_allclose(_cc(feats, labels, margin=0.7), 0.04 + 0.8 / 6, atol=1e-6)
  np.testing.assert_allclose(naive.center_cluster(feats, labels), 0.04 + 0.8 / 6, atol=1e-6)
  np.testing.assert_allclose(
    naive.center_cluster(feats, labels, push_weighting="samples"), 0.22, atol=1e-6
  )


@pytest.mark.parametrize("margin", [0.7, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_loop(margin, seed):
  feats, labels = _batch(seed)
  expected = naive.center_cluster(feats, labels, margin=margin)
  assert expected > naive.center_cluster(feats, labels, margin=0.0) + 1e-3  # push is active
  np.testing.assert_allclose(_cc(feats, labels, margin=margin), expected, rtol=1e-5)
  # Renaming the identities and reordering the samples changes nothing.
  order = np.random.default_rng(seed + 10).permutation(12)
  np.testing.assert_allclose(
    _cc(feats[order], 3 * labels[order] - 1, margin=margin), expected, rtol=1e-5
  )


def test_single_identity_batch_has_no_push():
  feats, _ = _batch(2)
  labels = np.full(12, 31)
  loss = _cc(feats, labels, margin=0.7)
  pull = np.mean(np.linalg.norm(feats - feats.mean(0), axis=1))
  np.testing.assert_allclose(loss, pull, rtol=1e-5)
  np.testing.assert_allclose(loss, naive.center_cluster(feats, labels), rtol=1e-5)


def test_all_singletons_is_push_only():
  feats, _ = _batch(3)
  labels = np.arange(12) * 5
  np.testing.assert_allclose(
    _cc(feats, labels, margin=3.0), naive.center_cluster(feats, labels, margin=3.0), rtol=1e-5
  )


def test_bfloat16_input_computed_in_float32():
  feats, labels = _batch(4)
  feats_bf16 = jnp.asarray(feats, jnp.bfloat16)
  loss = _cc(feats_bf16, labels, margin=0.7)
  assert loss.dtype == jnp.float32
  expected = naive.center_cluster(np.asarray(feats_bf16, np.float64), labels, margin=0.7)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_large_common_offset_is_accurate():
  # Shifting every feature by 50 leaves the loss unchanged; centre distances near ρ must not
  # lose their digits to the ‖h‖² expansion.
  feats, labels = _batch(5)
  expected = naive.center_cluster(feats, labels, margin=0.7)
  np.testing.assert_allclose(_cc(feats + np.float32(50.0), labels, margin=0.7), expected,
                             rtol=1e-4)


def test_grads_finite_with_singletons_and_coinciding_centres():
  feats, labels = _batch(6)
  grad = jax.jit(jax.grad(lambda x: _cc(x, labels)))(feats)
  assert np.all(np.isfinite(grad))
  # Every identity's samples equal: pull distances 0 and centre distances 0 (clamped).
  same = np.ones((12, 8), np.float32)
  grad = jax.jit(jax.grad(lambda x: _cc(x, labels)))(same)
  assert np.all(np.isfinite(grad))


def _loop_loss(feats, labels, margin):
  """Straightforward jnp version with Python loops over the (static) ids; singletons skipped in
  the pull, where their term is identically zero."""
  ids = sorted(set(labels.tolist()))
  members = {c: np.flatnonzero(labels == c) for c in ids}
  centre = {c: jnp.mean(feats[members[c]], axis=0) for c in ids}
  pull = sum(
    jnp.linalg.norm(feats[i] - centre[c]) for c in ids if len(members[c]) > 1 for i in members[c]
  ) / len(labels)
  hinges = [jax.nn.relu(margin - jnp.linalg.norm(centre[c] - centre[d]))
            for c in ids for d in ids if c != d]
  return pull + sum(hinges) / len(hinges)


def test_grad_matches_loop_implementation():
  feats, labels = _batch(7)
  grad = jax.jit(jax.grad(lambda x: _cc(x, labels, margin=0.7)))(feats)
  expected = jax.grad(lambda x: _loop_loss(x, labels, 0.7))(jnp.asarray(feats))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_check_grads_float64_with_singleton():
  feats, labels = _batch(8, scale=0.2)
  with jax.enable_x64(True):
    x = jnp.asarray(feats, jnp.float64)
    assert _cc(x, labels, margin=0.7).dtype == jnp.float64
    check_grads(jax.jit(lambda f: losses.center_cluster_loss(f, labels, margin=0.7)), (x,),
                order=1, modes=["rev"])


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    losses.center_cluster_loss(jnp.ones((4, 2, 3)), jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    losses.center_cluster_loss(jnp.ones((4, 3)), jnp.zeros(5, jnp.int32))
