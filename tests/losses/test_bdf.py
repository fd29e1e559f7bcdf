"""BDF's DID / MML / MDL against NumPy computations of bdf.md §4 written here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maumjax import losses
from tests.losses.test_cross_modal_triplet import _batch, _numpy_direction


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_did_is_the_mean_of_four_modality_ce_means():
  rng = np.random.default_rng(0)
  n, c = 5, 7
  logits = rng.normal(size=(4 * n, c)).astype(np.float32)
  labels = np.tile(rng.integers(0, c, n), 4)
  lp = _log_softmax(logits.astype(np.float64))
  ce = -lp[np.arange(4 * n), labels]
  want = np.mean([ce[m * n:(m + 1) * n].mean() for m in range(4)])
  np.testing.assert_allclose(float(jax.jit(losses.did_loss)(logits, labels)), want, rtol=1e-5)
  # The consistency reading adds KL(p(x) || p(x^)) + KL(p(x^) || p(x)) for x in V and I.
  p = np.exp(lp)
  kl = lambda a, b: np.mean(np.sum(p[a] * (lp[a] - lp[b]), -1))  # noqa: E731
  v, i, vd, idv = (slice(m * n, (m + 1) * n) for m in range(4))
  cons = ((kl(v, vd) + kl(vd, v)) + (kl(i, idv) + kl(idv, i))) / 2
  got = losses.did_loss(logits, labels, mode="ce_plus_consistency")
  np.testing.assert_allclose(float(got), want + cons, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown DID mode"):
    losses.did_loss(logits, labels, mode="kl")
  with pytest.raises(ValueError, match=r"\[V; I; V\^; I\^\] layout"):
    losses.did_loss(logits[:-1], labels[:-1])


def test_consistency_gradient_flows_through_each_side_as_the_distribution_only():
  """KL(p || sg q): the gradient w.r.t. the logits of q's rows comes only from its own term."""
  rng = np.random.default_rng(1)
  n, c = 3, 4
  logits = jnp.asarray(rng.normal(size=(4 * n, c)), jnp.float32)
  labels = jnp.asarray(np.tile(rng.integers(0, c, n), 4))
  g = jax.grad(lambda z: losses.did_loss(z, labels, mode="ce_plus_consistency")
               - losses.did_loss(z, labels))(logits)
  # d/dz_x of KL(p_x || sg p_y) only (the other term's p_x is under stop_gradient): check
  # against finite differences of that one-sided function.
  def one_sided(z):
    lp = jax.nn.log_softmax(z)
    sg = jax.lax.stop_gradient(lp)
    tot = 0.0
    for b in (0, 1):
      x, y = slice(b * n, (b + 1) * n), slice((b + 2) * n, (b + 3) * n)
      tot += jnp.mean(jnp.sum(jnp.exp(lp[x]) * (lp[x] - sg[y]), -1))
      tot += jnp.mean(jnp.sum(jnp.exp(lp[y]) * (lp[y] - sg[x]), -1))
    return tot / 2
  np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(one_sided)(logits)),
                             rtol=1e-5, atol=1e-6)


def test_mml_and_mdl_are_the_means_of_their_directions():
  feats, labels, groups = _batch(3)
  f64 = feats.astype(np.float64)
  for fn, pairs in ((losses.mml_loss, losses.MML_PAIRS), (losses.mdl_loss, losses.MDL_PAIRS)):
    want = np.mean([_numpy_direction(f64, labels, groups, a, b, 0.3) for a, b in pairs])
    np.testing.assert_allclose(float(jax.jit(fn)(feats, labels)), want, rtol=1e-4, atol=1e-5)
  assert len(losses.MDL_PAIRS) == 8 and not set(losses.MDL_PAIRS) & set(losses.MML_PAIRS)
  # No MDL direction pairs a mode with itself or its own derivative (groups m and m + 2).
  assert all(a != b and abs(a - b) != 2 for a, b in losses.MDL_PAIRS)


def test_mml_and_mdl_from_one_matrix_equal_the_separate_losses():
  feats, labels, groups = _batch(4)
  f64 = feats.astype(np.float64)
  fn = jax.jit(losses.mml_mdl_losses, static_argnames=("mml_pairs", "mdl_pairs"))
  mml, mdl = fn(feats, labels)
  np.testing.assert_allclose(mml, losses.mml_loss(feats, labels), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(mdl, losses.mdl_loss(feats, labels), rtol=1e-6, atol=1e-7)
  # Switching one MDL direction off changes only MDL, to the mean of the seven left.
  seven = losses.MDL_PAIRS[1:]
  mml2, mdl2 = fn(feats, labels, mdl_pairs=seven)
  np.testing.assert_allclose(mml2, mml, rtol=1e-6)
  want = np.mean([_numpy_direction(f64, labels, groups, a, b, 0.3) for a, b in seven])
  np.testing.assert_allclose(mdl2, want, rtol=1e-4, atol=1e-5)
  # An empty set gives 0 for that loss; the other is unchanged.
  mml3, mdl3 = fn(feats, labels, mdl_pairs=())
  assert float(mdl3) == 0.0
  np.testing.assert_allclose(mml3, mml, rtol=1e-6)
