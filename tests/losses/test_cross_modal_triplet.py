"""The directional triplet (BDF's MML / MDL form) against a NumPy loop over each direction and
against a naive JAX version that builds each direction's own distance matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maumjax import losses

# BDF's four groups V, I, V^, I^ and its directions (bdf.md §4).
MML = ((0, 0), (1, 1), (2, 2), (3, 3), (0, 2), (1, 3))
MDL = ((0, 1), (1, 0), (2, 1), (1, 2), (0, 3), (3, 0), (2, 3), (3, 2))


def _batch(seed=0, p=3, k=2, d=6):
  """[V; I; V^; I^] blocks of P x K rows each, the same labels in every block."""
  rng = np.random.default_rng(seed)
  labels = np.tile(np.repeat(rng.choice(20, p, replace=False), k), 4).astype(np.int32)
  groups = np.repeat(np.arange(4), p * k).astype(np.int32)
  feats = rng.normal(size=(4 * p * k, d)).astype(np.float32)
  return feats, labels, groups


def _numpy_direction(feats, labels, groups, a, b, margin):
  """One direction, anchor by anchor, with plain Euclidean distances."""
  losses_ = []
  for i in np.flatnonzero(groups == a):
    targets = np.flatnonzero(groups == b)
    d = np.sqrt(np.maximum(((feats[targets] - feats[i]) ** 2).sum(1), 1e-12))
    pos, neg = d[labels[targets] == labels[i]], d[labels[targets] != labels[i]]
    if not len(pos):
      continue
    d_an = neg.min() if len(neg) else np.inf
    losses_.append(max(pos.max() - d_an + margin, 0.0))
  return float(np.mean(losses_)) if losses_ else 0.0


@pytest.mark.parametrize("pairs", [MML, MDL, MML + MDL])
def test_each_direction_equals_a_numpy_loop(pairs):
  feats, labels, groups = _batch()
  got = jax.jit(lambda f: losses.cross_modal_triplet_per_pair(
      f, jnp.asarray(labels), jnp.asarray(groups), pairs=pairs, margin=0.3))(feats)
  want = [_numpy_direction(feats.astype(np.float64), labels, groups, a, b, 0.3)
          for a, b in pairs]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  total = losses.cross_modal_triplet(feats, labels, groups, pairs=pairs, margin=0.3)
  np.testing.assert_allclose(float(total), np.mean(want), rtol=1e-4, atol=1e-5)


def _naive_sum(feats, labels, groups, pairs, margin):
  """Separate JAX computations, one distance matrix per direction (what the masked single
  matrix must equal), summed and divided by the number of directions."""
  total = 0.0
  for a, b in pairs:
    fa, fb = feats[groups == a], feats[groups == b]
    la, lb = labels[groups == a], labels[groups == b]
    diff = fa[:, None, :] - fb[None, :, :]
    d = jnp.sqrt(jnp.maximum(jnp.sum(diff * diff, -1), 1e-12))
    same = la[:, None] == lb[None, :]
    d_ap = jnp.max(jnp.where(same, d, -1e30), axis=1)
    d_an = jnp.min(jnp.where(same, 1e30, d), axis=1)
    total = total + jnp.mean(jax.nn.relu(d_ap - d_an + margin))
  return total / len(pairs)


def test_gradients_equal_the_separate_directions():
  feats, labels, groups = _batch(1)
  pairs = MML + MDL
  g_one = jax.jit(jax.grad(lambda f: losses.cross_modal_triplet(
      f, jnp.asarray(labels), jnp.asarray(groups), pairs=pairs)))(jnp.asarray(feats))
  g_sep = jax.grad(lambda f: _naive_sum(f, labels, groups, pairs, 0.3))(jnp.asarray(feats))
  np.testing.assert_allclose(np.asarray(g_one), np.asarray(g_sep), rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(g_one)).sum() > 0


def test_switching_a_direction_off_changes_only_its_term():
  feats, labels, groups = _batch(2)
  full = np.asarray(losses.cross_modal_triplet_per_pair(feats, labels, groups, pairs=MDL))
  fewer = np.asarray(losses.cross_modal_triplet_per_pair(feats, labels, groups,
                                                         pairs=MDL[:3] + MDL[4:]))
  np.testing.assert_allclose(fewer, np.delete(full, 3), rtol=1e-6)
  # Moving only I^ rows changes the directions that read group 3, and no other.
  moved = feats.copy()
  moved[groups == 3] += 0.5
  after = np.asarray(losses.cross_modal_triplet_per_pair(moved, labels, groups, pairs=MDL))
  touches = np.array([3 in pair for pair in MDL])
  np.testing.assert_allclose(after[~touches], full[~touches], rtol=1e-5)
  assert np.all(np.abs(after[touches] - full[touches]) > 0)


def test_anchors_without_a_positive_are_left_out_and_bad_input_is_refused():
  # Group 1 holds only identity 9: anchors of group 0 (identities 1, 2) have no positive in it.
  feats = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  labels, groups = np.array([1, 2, 9]), np.array([0, 0, 1])
  got = losses.cross_modal_triplet_per_pair(feats, labels, groups, pairs=((0, 1), (0, 0)))
  # (0, 0): anchor 1 -> positive itself (~1e-6), negative at 1: relu(1e-6 - 1 + 0.3) = 0.
  np.testing.assert_allclose(np.asarray(got), [0.0, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="pairs is empty"):
    losses.cross_modal_triplet(feats, labels, groups, pairs=())
  with pytest.raises(ValueError, match="labels and groups"):
    losses.cross_modal_triplet(feats, labels, groups[:2], pairs=((0, 0),))


def _numpy_center_direction(feats, labels, groups, a, b, margin):
  """The center form of one direction, identity by identity (each weighted by its rows)."""
  ids_a = [k for k in np.unique(labels) if np.any((groups == a) & (labels == k))]
  ids_b = [k for k in np.unique(labels) if np.any((groups == b) & (labels == k))]
  centre = lambda g, k: feats[(groups == g) & (labels == k)].mean(0)  # noqa: E731
  dist = lambda x, y: np.sqrt(max(((x - y) ** 2).sum(), 1e-12))  # noqa: E731
  vals, weights = [], []
  for k in ids_a:
    if k not in ids_b:
      continue
    d_ap = dist(centre(a, k), centre(b, k))
    negs = [dist(centre(a, k), centre(b, j)) for j in ids_b if j != k]
    vals.append(max(d_ap - (min(negs) if negs else np.inf) + margin, 0.0))
    weights.append(np.sum(labels == k))  # rows of identity k in the whole batch
  return float(np.average(vals, weights=weights)) if vals else 0.0


def test_center_form_equals_a_numpy_loop_over_identity_centres():
  feats, labels, groups = _batch(5, p=4, k=2)
  # Uneven rows: drop identity labels[0] from group 3 (it is then no anchor of (3, *) and no
  # target of (*, 3)), so the 'present in both groups' rule is exercised.
  keep = ~((groups == 3) & (labels == labels[0]))
  feats, labels, groups = feats[keep], labels[keep], groups[keep]
  pairs = MML + MDL
  got = jax.jit(lambda f: losses.cross_modal_center_triplet_per_pair(
      f, jnp.asarray(labels), jnp.asarray(groups), pairs=pairs, margin=0.3))(feats)
  want = [_numpy_center_direction(feats.astype(np.float64), labels, groups, a, b, 0.3)
          for a, b in pairs]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  # The gradient of the centre form is finite and reaches every row.
  g = jax.grad(lambda f: jnp.sum(losses.cross_modal_center_triplet_per_pair(
      f, jnp.asarray(labels), jnp.asarray(groups), pairs=pairs, margin=1.0)))(feats)
  assert np.all(np.isfinite(g)) and np.all(np.abs(g).sum(1) > 0)
