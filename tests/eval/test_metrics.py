"""Metrics against hand-worked cases and a brute-force per-query implementation."""

from __future__ import annotations

import numpy as np
import pytest

from maumjax.eval import metrics


def _brute(distmat, q_ids, g_ids, q_cams=None, g_cams=None, *, dedup, max_rank=20):
  """Per-query reference written from the protocol text (protocol.md §3.7), stable sort."""
  cmcs, aps, inps = [], [], []
  for i in range(distmat.shape[0]):
    order = np.argsort(distmat[i], kind="stable")
    if q_cams is not None:
      order = order[~((q_cams[i] == 3) & (g_cams[order] == 2))]
    ids = g_ids[order]
    hit = ids == q_ids[i]
    if not hit.any():
      continue
    ranks = np.flatnonzero(hit) + 1
    aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    inps.append(len(ranks) / ranks[-1])
    if dedup:
      seen, dedup_ids = set(), []
      for x in ids.tolist():
        if x not in seen:
          seen.add(x)
          dedup_ids.append(x)
      p = dedup_ids.index(q_ids[i]) + 1
    else:
      p = ranks[0]
    length = min(max_rank, distmat.shape[1])
    cmcs.append((np.arange(1, length + 1) >= p).astype(float))
  return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(aps)


def _check(result, expected, atol=1e-6):
  cmc, m_ap, m_inp, n = expected
  np.testing.assert_allclose(result.cmc, cmc, atol=atol)
  np.testing.assert_allclose([result.mAP, result.mINP], [m_ap, m_inp], atol=atol)
  assert result.num_valid == n


def test_hand_worked_single_query():
  # Gallery by distance: id2 (0.1), id1 (0.2), id1 (0.3), id3 (0.4); query id 1, camera 6.
  # Positives at ranks 2 and 3: AP = (1/2 + 2/3) / 2 = 0.583333; INP = 2 / 3.
  d = np.array([[0.3, 0.1, 0.4, 0.2]])
  g_ids = np.array([1, 2, 3, 1])
  r = metrics.sysu_metrics(d, [1], g_ids, [6], [1, 1, 4, 5])
  np.testing.assert_allclose([r.mAP, r.mINP], [7 / 12, 2 / 3], atol=1e-7)
  np.testing.assert_array_equal(r.cmc, [0, 1, 1, 1])  # 4 gallery images: CMC length 4
  assert (r.r1, r.r5, r.r20) == (0.0, 1.0, 1.0)


def test_dedup_differs_from_plain_beyond_rank_1():
  # id2 twice, then id3, then the positive: plain rank 4, deduplicated rank 3.
  d = np.array([[0.1, 0.15, 0.2, 0.3]])
  g_ids = np.array([2, 2, 3, 1])
  sysu = metrics.sysu_metrics(d, [1], g_ids, [6], [1, 4, 5, 1])
  regdb = metrics.regdb_metrics(d, [1], g_ids)
  np.testing.assert_array_equal(sysu.cmc, [0, 0, 1, 1])
  np.testing.assert_array_equal(regdb.cmc, [0, 0, 0, 1])
  assert sysu.mAP == regdb.mAP == pytest.approx(0.25)  # AP is never deduplicated


def test_camera_rule_drops_cam2_for_cam3_queries_only():
  # Gallery: id2 cam2 (0.1), id1 cam2 (0.2), id1 cam1 (0.3).
  d = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
  g_ids, g_cams = np.array([2, 1, 1]), np.array([2, 2, 1])
  cam3 = metrics.sysu_metrics(d[:1], [1], g_ids, [3], g_cams)
  # Filtered list for the cam-3 query is just [id1 cam1]: rank 1, AP 1.
  assert (cam3.r1, cam3.mAP, cam3.mINP) == (1.0, 1.0, 1.0)
  assert len(cam3.cmc) == 3  # the CMC length follows the gallery size, as AGW's
  cam6 = metrics.sysu_metrics(d[1:], [1], g_ids, [6], g_cams)
  # Nothing filtered: positives at 2 and 3: AP = (1/2 + 2/3) / 2, INP = 2/3.
  np.testing.assert_allclose([cam6.r1, cam6.mAP, cam6.mINP], [0, 7 / 12, 2 / 3], atol=1e-7)


def test_queries_without_valid_match_are_skipped():
  # Query 0 (cam 3) has its only positive in cam 2: invalid. Query 1 matches at rank 1.
  d = np.array([[0.1, 0.5], [0.5, 0.1]])
  r = metrics.sysu_metrics(d, [1, 2], np.array([1, 2]), [3, 6], np.array([2, 1]))
  assert r.num_valid == 1 and r.r1 == 1.0 and r.mAP == 1.0
  # Query identity absent from the gallery: invalid as well.
  r = metrics.regdb_metrics(d, [1, 7], np.array([1, 2]))
  assert r.num_valid == 1 and r.mAP == 1.0


def test_all_invalid_raises():
  with pytest.raises(ValueError, match="no query has a matching"):
    metrics.sysu_metrics(np.zeros((1, 2)), [5], [1, 2], [3], [1, 1])


def test_ties_follow_stable_gallery_order():
  # Equal distances: the earlier gallery item ranks first.
  a = metrics.regdb_metrics(np.array([[0.2, 0.2]]), [1], np.array([2, 1]))
  b = metrics.regdb_metrics(np.array([[0.2, 0.2]]), [1], np.array([1, 2]))
  assert (a.r1, a.mAP) == (0.0, 0.5) and (b.r1, b.mAP) == (1.0, 1.0)
  # Dedup ties: id2 and id1 both at 0.2, id2 first -> the query's identity is second.
  c = metrics.sysu_metrics(np.array([[0.2, 0.2, 0.1]]), [1], np.array([2, 1, 3]), [6],
                           np.array([1, 4, 5]))
  np.testing.assert_array_equal(c.cmc, [0, 0, 1])


def _random_problem(rng, num_q, num_g, num_ids, *, ties=False):
  q_ids = rng.integers(0, num_ids, num_q)
  g_ids = rng.integers(0, num_ids, num_g)
  q_cams = rng.choice([3, 6], num_q)
  g_cams = rng.choice([1, 2, 4, 5], num_g)
  d = rng.integers(0, 6, (num_q, num_g)).astype(np.float32) if ties else \
      rng.standard_normal((num_q, num_g)).astype(np.float32)
  return d, q_ids, g_ids, q_cams, g_cams


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(40, 60, 7), (25, 300, 40), (5, 12, 3)])
def test_fast_path_equals_brute_force(shape, ties):
  rng = np.random.default_rng(sum(shape) + ties)
  d, q_ids, g_ids, q_cams, g_cams = _random_problem(rng, *shape, ties=ties)
  _check(metrics.sysu_metrics(d, q_ids, g_ids, q_cams, g_cams),
         _brute(d, q_ids, g_ids, q_cams, g_cams, dedup=True))
  _check(metrics.regdb_metrics(d, q_ids, g_ids), _brute(d, q_ids, g_ids, dedup=False))
  _check(metrics.sysu_metrics(d, q_ids, g_ids, q_cams, g_cams, max_rank=5),
         _brute(d, q_ids, g_ids, q_cams, g_cams, dedup=True, max_rank=5))


def test_invariant_to_gallery_order_without_ties():
  rng = np.random.default_rng(7)
  d, q_ids, g_ids, q_cams, g_cams = _random_problem(rng, 30, 80, 10)
  perm = rng.permutation(80)
  a = metrics.sysu_metrics(d, q_ids, g_ids, q_cams, g_cams)
  b = metrics.sysu_metrics(d[:, perm], q_ids, g_ids[perm], q_cams, g_cams[perm])
  np.testing.assert_allclose(a.cmc, b.cmc)
  np.testing.assert_allclose([a.mAP, a.mINP], [b.mAP, b.mINP], atol=1e-7)


def test_rows_of_a_pool_equal_the_gathered_matrix():
  # The protocol ranks trial galleries as rows of a pooled distance table.
  rng = np.random.default_rng(3)
  d, q_ids, g_ids, q_cams, g_cams = _random_problem(rng, 20, 50, 8, ties=True)
  rows = rng.permutation(50)[:30]
  pooled = metrics.rank_metrics(d.T, rows, q_ids, g_ids[rows], query_excluded=q_cams == 3,
                                gallery_excluded=g_cams[rows] == 2, dedup=True)
  _check(pooled, _brute(d[:, rows], q_ids, g_ids[rows], q_cams, g_cams[rows], dedup=True))


def test_evaluate_from_features_uses_cosine_distance():
  rng = np.random.default_rng(11)
  qf = rng.standard_normal((15, 8)) * rng.uniform(0.5, 3, (15, 1))  # unnormalised
  gf = rng.standard_normal((40, 8))
  q_ids, g_ids = rng.integers(0, 6, 15), rng.integers(0, 6, 40)
  q_cams, g_cams = rng.choice([3, 6], 15), rng.choice([1, 2, 4, 5], 40)
  qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
  gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
  d = -(qn @ gn.T)
  _check(metrics.evaluate_sysu(qf, q_ids, q_cams, gf, g_ids, g_cams),
         _brute(d, q_ids, g_ids, q_cams, g_cams, dedup=True), atol=1e-5)
  _check(metrics.evaluate_regdb(qf, q_ids, gf, g_ids), _brute(d, q_ids, g_ids, dedup=False),
         atol=1e-5)


def test_euclidean_distance_ranks_unnormalised_features():
  rng = np.random.default_rng(12)
  qf = rng.standard_normal((15, 8)) * rng.uniform(0.5, 3, (15, 1))
  gf = rng.standard_normal((40, 8)) * rng.uniform(0.5, 3, (40, 1))
  q_ids, g_ids = rng.integers(0, 6, 15), rng.integers(0, 6, 40)
  sq = ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)  # [Q, G], a loop-free brute force
  np.testing.assert_allclose(np.asarray(metrics.euclidean_distance_rows(gf, qf)), sq.T,
                             rtol=1e-5, atol=1e-4)
  for dedup in (False, True):
    _check(metrics.evaluate_regdb(qf, q_ids, gf, g_ids, distance="euclidean", dedup=dedup),
           _brute(sq, q_ids, g_ids, dedup=dedup), atol=1e-5)
  # Hand-worked: the query [1, 0]; the positive [3, 0] points its way but lies far, the
  # negative [0.5, 0.5] is close but 45 degrees off. Cosine ranks the positive first,
  # Euclidean the negative.
  q, g = np.array([[1.0, 0.0]]), np.array([[3.0, 0.0], [0.5, 0.5]])
  assert metrics.evaluate_regdb(q, [1], g, [1, 2]).r1 == 1.0
  assert metrics.evaluate_regdb(q, [1], g, [1, 2], distance="euclidean").r1 == 0.0
  with pytest.raises(ValueError, match="distance 'l2'"):
    metrics.distance_rows(g, q, "l2")


def test_metrics_record_and_errors():
  r = metrics.regdb_metrics(np.array([[0.1, 0.2, 0.3]]), [1], np.array([2, 1, 1]))
  out = r.as_dict()
  assert set(out) >= {"r1", "r5", "r10", "r20", "mAP", "mINP", "cmc", "num_valid"}
  assert out["r20"] == 1.0 and len(out["cmc"]) == 3
  with pytest.raises(ValueError, match="do not fit"):
    metrics.regdb_metrics(np.zeros((2, 3)), [1], [1, 2, 3])


def _pool_problem(rng, num_q, per_id, num_ids, num_trials, shots):
  """A pool with `per_id` images per identity and trial galleries of `shots` per identity."""
  pool_ids = np.repeat(np.arange(num_ids), per_id)
  pool_cams = rng.choice([1, 2, 4, 5], len(pool_ids))
  q_ids = rng.integers(0, num_ids, num_q)
  q_cams = rng.choice([3, 6], num_q)
  d = rng.standard_normal((num_q, len(pool_ids))).astype(np.float32)
  galleries = np.stack([
      rng.permutation(np.concatenate([rng.choice(np.flatnonzero(pool_ids == i), shots, False)
                                      for i in range(num_ids)]))
      for _ in range(num_trials)])
  return d, q_ids, q_cams, pool_ids, pool_cams, galleries


def _batch(d, q_ids, q_cams, pool_ids, pool_cams, galleries, *, dedup=True):
  return metrics.rank_metrics_batch(d.T, galleries, q_ids, pool_ids[galleries],
                                    query_excluded=q_cams == 3,
                                    gallery_excluded=pool_cams[galleries] == 2, dedup=dedup)


@pytest.mark.parametrize("shots", [1, 3, 12])
def test_batch_equals_brute_force_per_trial(shots):
  # shots=12: few identity runs per scan chunk (the in-scan identity minima); 1 and 3: many.
  # Three trials: two concurrent streams, the second padded with a repeated trial.
  rng = np.random.default_rng(shots)
  d, q_ids, q_cams, pool_ids, pool_cams, galleries = _pool_problem(rng, 30, 16, 9, 3, shots)
  for dedup in (True, False):
    got = _batch(d, q_ids, q_cams, pool_ids, pool_cams, galleries, dedup=dedup)
    assert len(got) == len(galleries)
    for rows, result in zip(galleries, got):
      _check(result, _brute(d[:, rows], q_ids, pool_ids[rows], q_cams, pool_cams[rows],
                            dedup=dedup))
      if dedup:
        single = metrics.rank_metrics(d.T, rows, q_ids, pool_ids[rows],
                                      query_excluded=q_cams == 3,
                                      gallery_excluded=pool_cams[rows] == 2, dedup=True)
        np.testing.assert_array_equal(single.cmc, result.cmc)
        assert (single.mAP, single.mINP) == (result.mAP, result.mINP)


@pytest.mark.parametrize("num_ties", [1, 5, 200])
def test_a_few_or_many_float_ties_follow_stable_order(num_ties):
  # Copy positives' distances onto other gallery items: a few ties are corrected one by one,
  # many take the full stable recount; both must match the stable sort.
  rng = np.random.default_rng(num_ties)
  d, q_ids, q_cams, pool_ids, pool_cams, galleries = _pool_problem(rng, 40, 12, 8, 2, 10)
  for rows in galleries:
    for _ in range(num_ties):
      q = rng.integers(len(q_ids))
      pos = rows[pool_ids[rows] == q_ids[q]]
      d[q, rng.choice(rows)] = d[q, rng.choice(pos)]
  for rows, result in zip(galleries, _batch(d, q_ids, q_cams, pool_ids, pool_cams, galleries)):
    _check(result, _brute(d[:, rows], q_ids, pool_ids[rows], q_cams, pool_cams[rows],
                          dedup=True))


def test_dedup_tie_with_another_identity_best_item():
  # Another identity's best item at exactly the query's best positive distance: it precedes
  # the query's identity only if it comes earlier in the gallery.
  rng = np.random.default_rng(5)
  d, q_ids, q_cams, pool_ids, pool_cams, galleries = _pool_problem(rng, 20, 12, 6, 1, 12)
  rows = galleries[0]
  for q in range(len(q_ids)):
    pos = rows[(pool_ids[rows] == q_ids[q]) & ~((q_cams[q] == 3) & (pool_cams[rows] == 2))]
    other = rows[pool_ids[rows] != q_ids[q]]
    if len(pos):
      d[q, rng.choice(other)] = d[q, pos].min() - (q % 2)  # half tie, half strictly ahead
  _check(_batch(d, q_ids, q_cams, pool_ids, pool_cams, galleries)[0],
         _brute(d[:, rows], q_ids, pool_ids[rows], q_cams, pool_cams[rows], dedup=True))


def test_gallery_too_large_for_packed_counts():
  # 2**15 gallery items and more: the counts no longer share an int32, the stable count runs.
  rng = np.random.default_rng(9)
  num_g = 1 << 15
  d = rng.integers(0, 50, (3, num_g)).astype(np.float32)
  q_ids, g_ids = np.array([1, 2, 3]), rng.integers(0, 400, num_g)
  q_cams, g_cams = np.array([3, 6, 3]), rng.choice([1, 2, 4, 5], num_g)
  _check(metrics.sysu_metrics(d, q_ids, g_ids, q_cams, g_cams),
         _brute(d, q_ids, g_ids, q_cams, g_cams, dedup=True))


def test_batch_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="do not fit"):
    metrics.rank_metrics_batch(np.zeros((5, 2)), np.zeros((2, 3), int), [1, 2], np.zeros((3, 2)),
                               dedup=True)
