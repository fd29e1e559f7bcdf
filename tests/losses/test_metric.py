"""Base metrics (Circle loss, normalised softmax, proxy_metric) against hand-worked cases and
naive NumPy loops (maum.md §4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from maumjax import losses
from tests.losses import naive

RTOL, ATOL = 1e-5, 1e-6
# Jitted entry points: eager dispatch compiles every primitive separately and would dominate the
# test time on CPU.
_circle = jax.jit(losses.circle_loss)
_norm_softmax = jax.jit(losses.norm_softmax_loss)
_proxy_metric = jax.jit(losses.proxy_metric, static_argnames=("metric",))

# ---------------------------------------------------------------------------------------------
# Row metrics.


def test_circle_hand_worked():
  # γ = 2, m = 0.25; one positive s_p = 0.5, negatives s_n = 0.1 and -0.3.
  # Positive: α_p = 1.25 - 0.5 = 0.75, logit = -2 * 0.75 * (0.5 - 0.75) = 0.375.
  # Negative 0.1: α_n = 0.35, logit = 2 * 0.35 * (0.1 - 0.25) = -0.105.
  # Negative -0.3: α_n = [-0.05]_+ = 0, logit = 0 (still enters the LSE as e^0 = 1).
  # LSE_n = log(e^-0.105 + 1) = log(1.900325) = 0.642025; LSE_p = 0.375.
  # ℓ = softplus(1.017025) = log(1 + 2.764985) = 1.325736.
  sim = jnp.array([[0.5, 0.1, -0.3]])
  pos = jnp.array([[True, False, False]])
  out = _circle(sim, pos, gamma=2.0, margin=0.25)
  np.testing.assert_allclose(out, [1.325736], atol=1e-6)


@pytest.mark.parametrize("gamma,margin", [(64.0, 0.25), (32.0, 0.4)])
def test_circle_matches_numpy_loop(gamma, margin):
  rng = np.random.default_rng(1)
  sim = rng.uniform(-1, 1, size=(7, 12)).astype(np.float32)
  pos = rng.uniform(size=(7, 12)) < 0.3  # several positives per row
  pos[:, 0] = True
  pos[:, 1] = False
  valid = rng.uniform(size=(7, 12)) < 0.8
  valid[:, :2] = True
  fn = jax.jit(lambda s, p, v: _circle(s, p, gamma=gamma, margin=margin, valid=v))
  np.testing.assert_allclose(
    fn(sim, pos, valid), naive.circle(sim, pos, valid, gamma=gamma, margin=margin),
    rtol=RTOL, atol=ATOL,
  )
  no_mask = jax.jit(lambda s, p: _circle(s, p, gamma=gamma, margin=margin))
  np.testing.assert_allclose(
    no_mask(sim, pos), naive.circle(sim, pos, gamma=gamma, margin=margin), rtol=RTOL, atol=ATOL
  )


def test_circle_invalid_entries_are_ignored():
  rng = np.random.default_rng(2)
  sim = rng.uniform(-1, 1, size=(3, 6)).astype(np.float32)
  pos = np.zeros((3, 6), bool)
  pos[:, 0] = True
  valid = np.ones((3, 6), bool)
  valid[:, 4:] = False
  masked = _circle(jnp.asarray(sim), jnp.asarray(pos), valid=jnp.asarray(valid))
  dropped = _circle(jnp.asarray(sim[:, :4]), jnp.asarray(pos[:, :4]))
  np.testing.assert_allclose(masked, dropped, rtol=RTOL)


def test_empty_rows_are_zero_with_finite_zero_grads():
  sim = jnp.array([[0.3, -0.2, 0.1], [0.3, -0.2, 0.1], [0.9, 0.8, -0.5]])
  pos = jnp.array([[False, False, False], [True, True, True], [True, False, False]])
  valid = jnp.array([[True] * 3, [True] * 3, [False, True, True]])  # row 3: positive masked
  for fn in (_circle, lambda s, p, valid: _norm_softmax(s, p, valid=valid)):
    out = fn(sim, pos, valid=valid)
    grad = jax.jit(jax.grad(lambda s: fn(s, pos, valid=valid).sum()))(sim)  # noqa: B023
    assert np.all(np.isfinite(grad))
    if fn is _circle:  # Circle also needs a negative: row 2 has none
      np.testing.assert_array_equal(out, [0.0, 0.0, 0.0])
      np.testing.assert_array_equal(grad, np.zeros((3, 3)))
    else:  # norm_softmax: row 2 is all-positive, loss log(1) = 0 with zero gradient
      np.testing.assert_allclose(out, [0.0, 0.0, 0.0], atol=1e-6)
      np.testing.assert_allclose(grad, np.zeros((3, 3)), atol=1e-6)


def test_circle_grads_finite_at_ties_and_kinks():
  # Equal similarities (LSE ties), s_n = -m (α_n kink) and s = ±1.
  sim = jnp.array([[0.2, 0.2, 0.2, -0.25], [1.0, -1.0, -0.25, -0.25]])
  pos = jnp.array([[True, True, False, False], [True, False, False, False]])
  grad = jax.jit(jax.grad(lambda s: _circle(s, pos).sum()))(sim)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad[0, 0], grad[0, 1])  # tied positives share the gradient


def test_circle_grad_matches_finite_differences_with_frozen_alpha():
  # α is under stop-gradient, so the autodiff gradient is that of ℓ with α frozen at the
  # current similarities: compare with central differences of the NumPy reference.
  gamma, margin, eps = 4.0, 0.25, 1e-6
  rng = np.random.default_rng(3)
  sim0 = rng.uniform(-0.9, 0.9, size=(3, 5))
  pos = np.zeros((3, 5), bool)
  pos[:, :2] = True
  with jax.enable_x64(True):
    def loss(s):
      return _circle(s, jnp.asarray(pos), gamma=gamma, margin=margin).sum()

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(sim0, jnp.float64)))
  assert grad.dtype == np.float64
  numeric = np.zeros_like(sim0)
  for i in range(3):
    for j in range(5):
      up, down = sim0[i].copy(), sim0[i].copy()
      up[j] += eps
      down[j] -= eps
      numeric[i, j] = (
        naive.circle_row(up, pos[i], gamma, margin, alpha_sims=sim0[i])
        - naive.circle_row(down, pos[i], gamma, margin, alpha_sims=sim0[i])
      ) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_norm_softmax_matches_numpy_loop_and_check_grads():
  rng = np.random.default_rng(4)
  sim = rng.uniform(-1, 1, size=(6, 10)).astype(np.float32)
  pos = rng.uniform(size=(6, 10)) < 0.3
  pos[:, 0] = True
  valid = rng.uniform(size=(6, 10)) < 0.8
  valid[:, 0] = True
  fn = jax.jit(lambda s, p, v: _norm_softmax(s, p, scale=16.0, valid=v))
  np.testing.assert_allclose(
    fn(sim, pos, valid), naive.norm_softmax(sim, pos, valid, scale=16.0), rtol=RTOL, atol=ATOL
  )
  with jax.enable_x64(True):
    check_grads(
      jax.jit(lambda s: _norm_softmax(s, pos, scale=3.0, valid=valid)),
      (jnp.asarray(sim, jnp.float64),), order=2, modes=["rev"],
    )


def test_norm_softmax_single_positive_is_cross_entropy():
  rng = np.random.default_rng(5)
  sim = rng.uniform(-1, 1, size=(5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 5)
  pos = np.arange(7)[None] == labels[:, None]
  logits = 16.0 * sim.astype(np.float64)
  ce = -(logits[np.arange(5), labels] - np.log(np.exp(logits).sum(1)))
  np.testing.assert_allclose(
    _norm_softmax(jnp.asarray(sim), jnp.asarray(pos), scale=16.0), ce, rtol=RTOL
  )


# ---------------------------------------------------------------------------------------------
# proxy_metric.


def test_proxy_metric_is_cosine_circle():
  rng = np.random.default_rng(6)
  feats, refs = rng.normal(size=(5, 8)), rng.normal(size=(9, 8))
  labels, ref_labels = rng.integers(0, 3, 5), np.arange(9) % 3
  sim = naive.unit(feats) @ naive.unit(refs).T
  pos = ref_labels[None] == labels[:, None]
  out = _proxy_metric(*map(jnp.asarray, (feats, labels, refs, ref_labels)))
  np.testing.assert_allclose(out, naive.circle(sim, pos, gamma=64.0, margin=0.25),
                             rtol=RTOL, atol=ATOL)
  out = _proxy_metric(*map(jnp.asarray, (feats, labels, refs, ref_labels)),
                            metric="norm_softmax", scale=20.0)
  np.testing.assert_allclose(out, naive.norm_softmax(sim, pos, scale=20.0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("metric", ["circle", "norm_softmax"])
def test_proxy_metric_invariances(metric):
  rng = np.random.default_rng(7)
  feats = rng.normal(size=(6, 8)).astype(np.float32)
  refs = rng.normal(size=(10, 8)).astype(np.float32)
  labels, ref_labels = rng.integers(0, 5, 6), np.arange(10) % 5
  ref_valid = np.arange(10) != 3
  base = _proxy_metric(feats, labels, refs, ref_labels, metric=metric, ref_valid=ref_valid)
  # Positive rescaling of features and references (normalisation).
  scaled = _proxy_metric(
    feats * rng.uniform(0.1, 10, (6, 1)).astype(np.float32), labels,
    refs * rng.uniform(0.1, 10, (10, 1)).astype(np.float32), ref_labels, metric=metric,
    ref_valid=ref_valid,
  )
  np.testing.assert_allclose(scaled, base, rtol=1e-4, atol=1e-5)
  # Renaming the classes consistently, and reordering the references.
  perm, order = rng.permutation(5), rng.permutation(10)
  renamed = _proxy_metric(
    feats, perm[labels], refs[order], perm[ref_labels][order], metric=metric,
    ref_valid=ref_valid[order],
  )
  np.testing.assert_allclose(renamed, base, rtol=1e-5, atol=1e-6)


def test_proxy_metric_vmaps_over_problems():
  rng = np.random.default_rng(8)
  feats, refs = rng.normal(size=(3, 4, 8)), rng.normal(size=(3, 6, 8))
  labels, ref_labels = rng.integers(0, 3, (3, 4)), np.arange(6) % 3
  batched = jax.vmap(lambda f, y, r: _proxy_metric(f, y, r, jnp.asarray(ref_labels)))(
    feats, labels, refs
  )
  for b in range(3):
    np.testing.assert_allclose(
      batched[b], _proxy_metric(feats[b], labels[b], refs[b], ref_labels), rtol=1e-6
    )


def test_unknown_metric_and_bad_shapes_raise():
  f, y = jnp.ones((2, 4)), jnp.zeros(2, jnp.int32)
  with pytest.raises(ValueError, match=r"'cosface'.*\['circle', 'norm_softmax'\]"):
    losses.proxy_metric(f, y, f, y, metric="cosface")
  with pytest.raises(ValueError, match="head_reduce"):
    losses.head_proxy_metric(f[:, None], y, f[None], y, head_reduce="max")
  with pytest.raises(ValueError, match=r"\[N, H, D\]"):
    losses.head_proxy_metric(f, y, f[None], y)
  with pytest.raises(ValueError, match="bank"):
    losses.memory_refs(jnp.ones((2, 3, 4)), jnp.ones((1, 2, 3, 5)))
