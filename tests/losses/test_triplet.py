"""Batch-hard triplet loss against a hand-worked case and a NumPy loop (AGW `TripletLoss`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from maumjax import losses

_triplet = jax.jit(losses.batch_hard_triplet, static_argnames=("metric",))
_with_stats = jax.jit(losses.batch_hard_triplet_with_stats, static_argnames=("metric",))


def _np_triplet(feats, labels, *, margin=0.3, metric="euclidean"):
  """Loops over anchors; brute-force distances; AGW semantics (self is a positive)."""
  feats = np.asarray(feats, np.float64)
  n = len(labels)
  losses_, correct = [], []
  for a in range(n):
    d = []
    for b in range(n):
      if metric == "euclidean":
        d.append(np.sqrt(max(np.sum((feats[a] - feats[b]) ** 2), 1e-12)))
      else:
        u, v = feats[a] / np.linalg.norm(feats[a]), feats[b] / np.linalg.norm(feats[b])
        d.append(1.0 - u @ v)
    d_ap = max(d[b] for b in range(n) if labels[b] == labels[a])
    negs = [d[b] for b in range(n) if labels[b] != labels[a]]
    if not negs:
      losses_.append(0.0)
      correct.append(True)
      continue
    d_an = min(negs)
    losses_.append(max(d_ap - d_an + margin, 0.0))
    correct.append(d_an >= d_ap)
  return np.mean(losses_), np.mean(correct)


def test_hand_worked_four_points():
  # 1-D points 0, 1 (id 0) and 1.5, 4 (id 1), margin 0.3:
  #   x=0:   d_ap = 1   (to 1),   d_an = 1.5 (to 1.5) -> relu(1 - 1.5 + 0.3)   = 0
  #   x=1:   d_ap = 1   (to 0),   d_an = 0.5 (to 1.5) -> relu(1 - 0.5 + 0.3)   = 0.8
  #   x=1.5: d_ap = 2.5 (to 4),   d_an = 0.5 (to 1)   -> relu(2.5 - 0.5 + 0.3) = 2.3
  #   x=4:   d_ap = 2.5 (to 1.5), d_an = 3   (to 1)   -> relu(2.5 - 3 + 0.3)   = 0
  # loss = (0 + 0.8 + 2.3 + 0) / 4 = 0.775; d_an >= d_ap for x=0 and x=4: precision 0.5.
  feats = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.5, 0.0], [4.0, 0.0]])
  labels = jnp.array([0, 0, 1, 1])
  loss, precision = _with_stats(feats, labels, margin=0.3)
  np.testing.assert_allclose(loss, 0.775, atol=1e-5)
  np.testing.assert_allclose(precision, 0.5)


def test_tie_counts_as_correct_like_agw():
  # 1-D points 0, 1 (id 0) and 2 (id 1): for x=1, d_ap = d_an = 1 (AGW's torch.ge counts it).
  # Losses: relu(1 - 2 + 0.3) = 0, relu(1 - 1 + 0.3) = 0.3, relu(1e-6 - 1 + 0.3) = 0 -> 0.1.
  feats = jnp.array([[0.0], [1.0], [2.0]])
  loss, precision = _with_stats(feats, jnp.array([0, 0, 1]))
  np.testing.assert_allclose([loss, precision], [0.1, 1.0], atol=1e-6)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_matches_numpy_loop(metric):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(16, 12)).astype(np.float32)
  labels = np.repeat(np.arange(4), 4)
  loss, precision = _with_stats(feats, labels, margin=0.3, metric=metric)
  exp_loss, exp_precision = _np_triplet(feats, labels, margin=0.3, metric=metric)
  np.testing.assert_allclose(loss, exp_loss, rtol=1e-5)
  np.testing.assert_allclose(precision, exp_precision)
  # Permuting the samples and renaming the identities changes nothing.
  order, rename = rng.permutation(16), rng.permutation(4)
  np.testing.assert_allclose(
    _triplet(feats[order], rename[labels[order]], metric=metric), loss, rtol=1e-6
  )


def test_singleton_and_no_negative_anchors():
  feats = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
  # Label 9 is a singleton: its hardest positive is itself (distance 1e-6 after the clamp).
  labels = np.array([0, 0, 1, 1, 9])
  np.testing.assert_allclose(_triplet(feats, labels), _np_triplet(feats, labels)[0], rtol=1e-5)
  # One identity only: no negatives anywhere, loss 0.
  np.testing.assert_array_equal(_triplet(feats, np.zeros(5, int)), 0.0)


def test_grads_finite_when_features_coincide():
  f = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
  feats = np.stack([f[0], f[0], f[0], f[1], f[2], f[3]])  # same-id and cross-id duplicates
  labels = np.array([0, 0, 1, 1, 2, 2])
  for metric in ("euclidean", "cosine"):
    grad = jax.jit(jax.grad(lambda x: _triplet(x, labels, metric=metric)))(feats)  # noqa: B023
    assert np.all(np.isfinite(grad)), metric
  grad = jax.jit(jax.grad(lambda x: _triplet(x, labels)))(np.ones((6, 6), np.float32))
  assert np.all(np.isfinite(grad))


def test_check_grads_float64():
  feats = np.random.default_rng(3).normal(size=(8, 5))
  labels = np.repeat(np.arange(4), 2)
  with jax.enable_x64(True):
    check_grads(
      jax.jit(lambda x: losses.batch_hard_triplet(x, labels, margin=3.0)),
      (jnp.asarray(feats, jnp.float64),), order=1, modes=["rev"],
    )


def test_unknown_metric_raises():
  with pytest.raises(ValueError, match=r"'l1'.*\['cosine', 'euclidean'\]"):
    losses.batch_hard_triplet(jnp.ones((2, 3)), jnp.zeros(2, jnp.int32), metric="l1")
