"""MMM's clustering: the Jaccard distance against a brute-force NumPy transcription of mmm.md §5.2
(per modality and the modality-aware joint version), DBSCAN on a hand-made set, cluster
memories (plain and modality-balanced)."""

from __future__ import annotations

import numpy as np
import pytest

from maumjax import cluster


def _brute_jaccard(feats, k1, k2, modality=None):
  """The spec's steps, row by row, with dense matrices and sets (small N only)."""
  feats = feats.astype(np.float64)
  n = len(feats)
  sq = ((feats[:, None] - feats[None]) ** 2).sum(-1)
  rank = np.argsort(sq, axis=1, kind="stable")[:, :k1]  # the k1-column neighbour list

  def recip(i, k):
    fwd = rank[i, :k + 1]  # cut to k1 columns by the list's width
    return [j for j in fwd if i in rank[j, :k + 1]]

  half = int(np.around(k1 / 2))
  v = np.zeros((n, n))
  for i in range(n):
    r = recip(i, k1)
    exp = list(r)
    for c in r:
      rc = recip(c, half)
      if len(set(rc) & set(r)) > 2 / 3 * len(rc):
        exp += rc
    exp = sorted(set(exp))
    d = 2 - 2 * feats[exp] @ feats[i]
    w = np.exp(-d)
    v[i, exp] = w / w.sum()
  if k2 > 1:  # V' = A V, A averaging the k2 nearest rows (per modality, then the modalities)
    a = np.zeros((n, n))
    for i in range(n):
      groups = [rank[i, :k2]] if modality is None else [
          [j for j in rank[i, :k2] if modality[j] == m] for m in (False, True)]
      groups = [g for g in groups if len(g)]
      for g in groups:
        a[i, g] += 1.0 / (len(g) * len(groups))
    v = a @ v
  out = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      m = np.minimum(v[i], v[j]).sum()
      out[i, j] = max(1 - m / (2 - m), 0.0)
  return out


def _clustered(seed=0, ids=8, per=7, dim=16, spread=0.35):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(ids, dim))
  feats = np.repeat(centres, per, axis=0) + spread * rng.normal(size=(ids * per, dim))
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  return feats.astype(np.float32), np.repeat(np.arange(ids), per)


@pytest.mark.parametrize("k1,k2,joint", [(11, 4, False), (9, 1, False), (12, 6, True)])
def test_jaccard_equals_the_brute_force_steps(k1, k2, joint):
  feats, _ = _clustered(1)
  modality = (np.arange(len(feats)) % 3 == 0) if joint else None
  got = cluster.jaccard_distance(feats, k1=k1, k2=k2, modality=modality)
  want = _brute_jaccard(feats, k1, k2, modality)
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=2e-6)
  np.testing.assert_allclose(np.diag(got), 0.0, atol=1e-6)
  assert got.min() >= 0.0 and got.max() <= 1.0
  # Symmetric: V' is per row, but sum_k min(V'[i, k], V'[j, k]) is symmetric in i and j.
  np.testing.assert_allclose(got, got.T, atol=1e-6)


def test_modality_aware_expansion_changes_the_distance():
  feats, _ = _clustered(2)
  modality = np.arange(len(feats)) % 2 == 0
  plain = cluster.jaccard_distance(feats, k1=12, k2=6)
  joint = cluster.jaccard_distance(feats, k1=12, k2=6, modality=modality)
  assert np.abs(plain - joint).max() > 1e-3
  # One modality only: the modality-aware mean is the plain mean.
  same = cluster.jaccard_distance(feats, k1=12, k2=6, modality=np.zeros(len(feats), bool))
  np.testing.assert_allclose(same, plain, atol=1e-6)


def test_knn_is_blockwise_exact():
  feats, _ = _clustered(3, ids=10, per=9)
  feats[40] = feats[10]  # a tie across blocks: the lower index first, as a stable sort
  sq = ((feats[:, None].astype(np.float64) - feats[None]) ** 2).sum(-1)
  # 90 rows in 6 blocks (the last padded), k above the block size, one block.
  for block, k in ((16, 7), (4, 7), (128, 11)):
    got = cluster.knn(feats, k, block=block)
    np.testing.assert_array_equal(got, np.argsort(sq, axis=1, kind="stable")[:, :k])


def test_dbscan_labels_a_hand_made_set():
  # Two tight groups of 4 and 5 points and one far point, on a line.
  x = np.array([0.0, 0.1, 0.2, 0.3, 5.0, 5.1, 5.2, 5.3, 5.4, 20.0])
  dist = np.abs(x[:, None] - x[None])
  labels = cluster.pseudo_labels(dist, eps=0.25, min_samples=4)
  np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1, 1, 1, 1, -1])
  # min_samples counts the point itself: with 5 a group of 4 is noise.
  np.testing.assert_array_equal(cluster.pseudo_labels(dist, eps=0.25, min_samples=5),
                                [-1] * 4 + [0] * 5 + [-1])
  with pytest.raises(ValueError, match="square"):
    cluster.pseudo_labels(dist[:3], eps=0.2)


def test_clusters_of_clustered_features_recover_the_groups():
  feats, ids = _clustered(4, ids=6, per=8, spread=0.2)
  labels = cluster.pseudo_labels(cluster.jaccard_distance(feats, k1=10, k2=4), eps=0.6)
  from sklearn.metrics import adjusted_rand_score

  assert adjusted_rand_score(ids, labels) > 0.9


def test_cluster_memory_means_plain_and_modality_balanced():
  feats = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 3], [5, 5]], np.float32)
  labels = np.array([0, 0, 0, 0, 1, -1])
  modality = np.array([False, False, False, True, True, False])
  plain = cluster.init_cluster_memory(feats, labels)
  np.testing.assert_allclose(plain[0], np.array([3, 1]) / np.sqrt(10), rtol=1e-6)
  np.testing.assert_allclose(plain[1], [0, 1], rtol=1e-6)
  # Balanced: (mean of the 3 visible (1, 0) + the infrared (0, 1)) / 2 -> (1, 1) / sqrt 2.
  balanced = cluster.init_cluster_memory(feats, labels, modality=modality)
  np.testing.assert_allclose(balanced[0], np.array([1, 1]) / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(balanced[1], [0, 1], rtol=1e-6)  # infrared only
  with pytest.raises(ValueError, match="no cluster"):
    cluster.init_cluster_memory(feats, -np.ones(6, int))


def test_bad_input_is_refused():
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    cluster.jaccard_distance(np.zeros(5), k1=2, k2=1)
  with pytest.raises(ValueError, match="NaN"):
    cluster.jaccard_distance(np.full((4, 2), np.nan), k1=2, k2=1)
  with pytest.raises(ValueError, match="modality must be bool"):
    cluster.jaccard_distance(np.eye(4), k1=2, k2=1, modality=np.zeros(4, int))
  with pytest.raises(ValueError, match="k2 <= k1 <= N"):
    cluster.jaccard_distance(np.eye(4), k1=5, k2=1)


def _subs(points):
  """Sub-centres [C, 1, 2] from 2-D points (n = 1 sub-memory keeps the costs readable)."""
  return np.asarray(points, np.float32)[:, None, :]


def test_greedy_is_many_to_one_and_hungarian_one_to_one():
  # Visible clusters at x = 0, 0.1, 5; infrared at x = 0.05, 5.2: costs are |x_a - x_b|.
  rgb = _subs([[0, 0], [0.1, 0], [5, 0]])
  ir = _subs([[0.05, 0], [5.2, 0]])
  np.testing.assert_allclose(cluster.cluster_costs(rgb, ir),
                             [[0.05, 5.2], [0.05, 5.1], [4.95, 0.2]], atol=1e-6)
  np.testing.assert_array_equal(cluster.match_clusters(rgb, ir), [0, 0, 1])
  hung = cluster.match_clusters(rgb, ir, method="hungarian")
  assert sorted(hung[hung >= 0]) == [0, 1] and hung[2] == 1 and np.sum(hung < 0) == 1
  labels = np.array([0, 1, 2, -1, 2])
  unmatched = int(np.flatnonzero(hung < 0)[0])
  for policy, value in (("nearest", 0), ("keep_own_label", unmatched), ("drop", -1)):
    got = cluster.mmlm_labels(labels, rgb, ir, method="hungarian", unmatched=policy)
    assert got[unmatched] == value and got[3] == -1, policy
  # The off-by-one switch changes exactly the last visible cluster (it keeps its number 2
  # instead of taking infrared cluster 1), and hides the last infrared cluster.
  fixed = cluster.mmlm_labels(labels, rgb, ir)
  bug = cluster.mmlm_labels(labels, rgb, ir, off_by_one=True)
  np.testing.assert_array_equal(fixed, [0, 0, 1, -1, 1])
  np.testing.assert_array_equal(bug, [0, 0, 2, -1, 2])


def test_cost_direction_and_sub_memories():
  # Two sub-centres each: the sum runs over the named side's sub-centres.
  rgb = np.array([[[0, 0], [0, 3]]], np.float32)
  ir = np.array([[[0, 0], [0, 1]]], np.float32)
  assert cluster.cluster_costs(rgb, ir, cost_sum_over="ir")[0, 0] == pytest.approx(0 + 1)
  assert cluster.cluster_costs(rgb, ir, cost_sum_over="visible")[0, 0] == pytest.approx(0 + 2)
  feats, ids = _clustered(6, ids=3, per=9, dim=4)
  labels = ids.copy()
  labels[-7:] = -1  # cluster 2 keeps 2 members (< n = 4): the mean, 4 times
  subs = cluster.sub_memories(feats, labels, n=4)
  assert subs.shape == (3, 4, 4)
  np.testing.assert_allclose(subs[2], np.repeat(feats[labels == 2].mean(0)[None], 4, 0),
                             atol=1e-6)
  assert np.unique(subs[0].round(5), axis=0).shape[0] == 4  # four distinct k-means centres


def test_sparse_handover_gives_dense_dbscan_labels():
  from sklearn.cluster import DBSCAN

  # Pairs exactly eps apart count as neighbours (scikit-learn's d <= eps), as on the dense matrix.
  x = np.array([0.0, 0.25, 0.5, 0.75, 3.0, 3.25, 9.0])
  dist = np.abs(x[:, None] - x[None])
  for eps, k in ((0.25, 3), (0.2, 2), (0.25, 2)):
    want = DBSCAN(eps=eps, min_samples=k, metric="precomputed").fit_predict(dist)
    np.testing.assert_array_equal(cluster.pseudo_labels(dist, eps=eps, min_samples=k), want)
  feats, _ = _clustered(7, ids=12, per=6, spread=0.5)
  jac = cluster.jaccard_distance(feats, k1=10, k2=4)
  for eps in (0.4, 0.6, 0.8):
    want = DBSCAN(eps=eps, min_samples=4, metric="precomputed").fit_predict(jac)
    np.testing.assert_array_equal(cluster.pseudo_labels(jac, eps=eps), want)


def test_the_parallel_kernels_equal_the_serial_ones(monkeypatch):
  """Large inputs use numba's parallel compilations (row loops split over threads); they give
  the same distances as the serial ones the other tests run."""
  feats, modality = _clustered(5, ids=12, per=8)
  modality = np.arange(len(feats)) % 2 == 1
  serial = cluster.jaccard_distance(feats, k1=12, k2=6, modality=modality)
  monkeypatch.setattr(cluster, "PARALLEL_ROWS", 1)
  parallel = cluster.jaccard_distance(feats, k1=12, k2=6, modality=modality)
  np.testing.assert_allclose(parallel, serial, atol=1e-6)
