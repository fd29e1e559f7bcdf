"""CMC, mAP and mINP for cross-modality re-ID, vectorised over queries in JAX.

Semantics (protocol.md §3), identical to the AGW reference evaluation:

* Ranking: ascending distance with a *stable* order (ties go to the earlier gallery item).
* SYSU-MM01: a query from camera 3 ignores every gallery image from camera 2, whatever its
  identity (the same-location rule, §1.7); the CMC is identity-deduplicated (each gallery
  identity counts once, at its best rank). RegDB: nothing is excluded and the CMC is plain.
* A query is valid if at least one positive remains; invalid queries are left out of every
  average. AP is non-interpolated over the whole filtered list; INP = G / rank of the last
  positive (Ye et al., TPAMI 2021).

The algorithm needs no sort (XLA's sort is slow on CPU; a [3803, 3010] argsort takes 2 s on two
cores). One `lax.scan` walks the gallery in order; for every query it counts, per positive,
the kept items ranked before it (rank = count + 1) and keeps the best (distance, position) of
every identity for the deduplicated CMC. Work is O(G x Q x P) with P the largest number of
positives of a query (40 on SYSU multi-shot), all of it fused elementwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SYSU_EXCLUDED = (3, 2)  # (query camera, gallery camera): cam 3 queries ignore cam 2 gallery


@dataclasses.dataclass(frozen=True)
class Metrics:
  """Evaluation result; every value is a fraction in [0, 1].

  Attributes:
    cmc: [min(max_rank, num_gallery)] matching rate at ranks 1..len(cmc).
    mAP: mean average precision over valid queries.
    mINP: mean inverse negative penalty over valid queries.
    num_valid: queries with at least one positive after filtering.
  """

  cmc: np.ndarray
  mAP: float  # noqa: N815 (the field name users know)
  mINP: float  # noqa: N815
  num_valid: int

  def rank(self, k: int) -> float:
    """CMC at rank k; past the end of the curve the last value (all positives found)."""
    return float(self.cmc[min(k, len(self.cmc)) - 1])

  @property
  def r1(self) -> float:
    return self.rank(1)

  @property
  def r5(self) -> float:
    return self.rank(5)

  @property
  def r10(self) -> float:
    return self.rank(10)

  @property
  def r20(self) -> float:
    return self.rank(20)

  def as_dict(self) -> dict[str, Any]:
    return {"r1": self.r1, "r5": self.r5, "r10": self.r10, "r20": self.r20, "mAP": self.mAP,
            "mINP": self.mINP, "num_valid": self.num_valid, "cmc": self.cmc.tolist()}


@functools.partial(jax.jit, static_argnames=("dedup", "num_ids"))
def _query_stats(dist_rows: jax.Array, rows: jax.Array, g_ids: jax.Array, g_excl: jax.Array,
                 q_ids: jax.Array, q_excl: jax.Array, pos: jax.Array, *, dedup: bool,
                 num_ids: int):
  """Per-query rank statistics by one scan over the gallery.

  Args:
    dist_rows: [N, Q] distances of N candidate gallery items (rows) to Q queries.
    rows: int [G], the gallery in ranking-tie order: gallery position i is row rows[i].
    g_ids: int [G] identity index 0..num_ids-1 of each gallery position.
    g_excl: bool [G] gallery positions excluded for queries with q_excl (SYSU cam 2).
    q_ids: int [Q] identity index of each query, or -1 if absent from the gallery.
    q_excl: bool [Q] queries that ignore g_excl positions (SYSU cam 3).
    pos: int [Q, P] gallery positions of each query's positives, -1 padded.
    dedup: identity-deduplicated CMC (SYSU) or plain (RegDB).
    num_ids: number of gallery identities.

  Returns:
    (valid [Q] bool, ap [Q], inp [Q], cmc_rank [Q] int: the 1-based CMC position).
  """
  num_q = dist_rows.shape[1]
  has = pos >= 0
  pos_safe = jnp.where(has, pos, 0)
  pos_dist = dist_rows[rows[pos_safe], jnp.arange(num_q)[:, None]]  # [Q, P]
  pos_kept = has & ~(g_excl[pos_safe] & q_excl[:, None])
  pos_dist = jnp.where(pos_kept, pos_dist, jnp.inf)

  def step(carry, g):
    before, best_d, best_i = carry
    row = dist_rows[rows[g]]  # [Q]
    keep = ~(g_excl[g] & q_excl)
    ahead = (row[:, None] < pos_dist) | ((row[:, None] == pos_dist) & (g < pos))
    before = before + (ahead & keep[:, None]).astype(jnp.int32)
    if dedup:
      j = g_ids[g]
      cur_d, cur_i = best_d[j], best_i[j]
      better = keep & (row < cur_d)  # strict: the earliest position wins ties
      best_d = best_d.at[j].set(jnp.where(better, row, cur_d))
      best_i = best_i.at[j].set(jnp.where(better, g, cur_i))
    return (before, best_d, best_i), None

  num_g = rows.shape[0]
  init = (jnp.zeros(pos.shape, jnp.int32),
          jnp.full((num_ids if dedup else 1, num_q), jnp.inf, dist_rows.dtype),
          jnp.full((num_ids if dedup else 1, num_q), num_g, jnp.int32))
  (before, best_d, best_i), _ = jax.lax.scan(step, init, jnp.arange(num_g), unroll=8)

  ranks = before + 1  # [Q, P], distinct among kept positives
  n_pos = jnp.sum(pos_kept, axis=1)
  valid = n_pos > 0
  big = jnp.iinfo(jnp.int32).max
  r_kept = jnp.where(pos_kept, ranks, big)
  # Position of each positive among the positives (1-based) for AP.
  k = 1 + jnp.sum(r_kept[:, None, :] < r_kept[:, :, None], axis=2)
  ap = jnp.sum(jnp.where(pos_kept, k / ranks, 0.0), axis=1) / jnp.maximum(n_pos, 1)
  last = jnp.max(jnp.where(pos_kept, ranks, 0), axis=1)
  inp = n_pos / jnp.maximum(last, 1)
  first = jnp.min(r_kept, axis=1)
  if dedup:
    qid = jnp.maximum(q_ids, 0)
    own_d = best_d[qid, jnp.arange(num_q)]
    own_i = best_i[qid, jnp.arange(num_q)]
    earlier = (best_d < own_d) | ((best_d == own_d) & (best_i < own_i))
    cmc_rank = 1 + jnp.sum(earlier, axis=0)
  else:
    cmc_rank = first
  return valid, ap, inp, cmc_rank


def _positions(q_ids: np.ndarray, g_ids: np.ndarray):
  """Identity indices and the padded gallery positions of every query's positives."""
  uniq, g_index = np.unique(g_ids, return_inverse=True)
  q_index = np.searchsorted(uniq, q_ids)
  q_index = np.where((q_index < len(uniq)) & (uniq[np.minimum(q_index, len(uniq) - 1)] == q_ids),
                     q_index, -1)
  counts = np.bincount(g_index, minlength=len(uniq))
  width = max(1, int(counts.max()) if counts.size else 1)
  by_id = np.full((len(uniq) + 1, width), -1, np.int32)  # last row: absent identities
  order = np.argsort(g_index, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  slot = np.arange(len(order)) - starts[g_index[order]]
  by_id[g_index[order], slot] = order
  pos = by_id[np.where(q_index >= 0, q_index, len(uniq))]
  return g_index.astype(np.int32), q_index.astype(np.int32), pos, len(uniq)


def _summarise(valid, ap, inp, cmc_rank, num_gallery: int, max_rank: int) -> Metrics:
  valid = np.asarray(valid)
  num_valid = int(valid.sum())
  if num_valid == 0:
    raise ValueError("no query has a matching gallery image after filtering; check that "
                     "query and gallery identities overlap")
  length = min(max_rank, num_gallery)
  ranks = np.asarray(cmc_rank)[valid]
  cmc = (ranks[:, None] <= np.arange(1, length + 1)[None, :]).mean(axis=0)
  return Metrics(cmc=cmc, mAP=float(np.asarray(ap)[valid].mean()),
                 mINP=float(np.asarray(inp)[valid].mean()), num_valid=num_valid)


def rank_metrics(dist_rows, rows, query_ids, gallery_ids, *, query_excluded=None,
                 gallery_excluded=None, dedup: bool, max_rank: int = 20) -> Metrics:
  """Metrics for a gallery given as rows of a larger distance table (the protocol's pool).

  Args:
    dist_rows: [N, Q] distances of N candidate gallery items to the queries (smaller is
      closer). The SYSU protocol computes it once for the whole gallery pool.
    rows: int [G] the gallery: position i (which decides ties) is candidate rows[i].
    query_ids: [Q] query identities.
    gallery_ids: [G] identities of the gallery positions.
    query_excluded, gallery_excluded: bool [Q], [G]; queries flagged in the first ignore
      gallery positions flagged in the second (SYSU: cam-3 queries, cam-2 images).
    dedup: identity-deduplicated CMC (SYSU) or plain (RegDB).
    max_rank: CMC length, capped by the gallery size.

  Returns:
    Metrics over the valid queries.

  Raises:
    ValueError: shape mismatches, or no valid query.
  """
  rows = np.asarray(rows, np.int32)
  q_ids = np.asarray(query_ids)
  g_ids = np.asarray(gallery_ids)
  num_q, num_g = q_ids.shape[0], rows.shape[0]
  if dist_rows.shape[1] != num_q or g_ids.shape != (num_g,):
    raise ValueError(f"distances {tuple(dist_rows.shape)} (candidates x queries) do not fit "
                     f"{num_q} query ids and {num_g} gallery positions ({g_ids.shape} ids)")
  q_excl = np.zeros(num_q, bool) if query_excluded is None else np.asarray(query_excluded, bool)
  g_excl = np.zeros(num_g, bool) if gallery_excluded is None else np.asarray(gallery_excluded,
                                                                              bool)
  g_index, q_index, pos, num_ids = _positions(q_ids, g_ids)
  stats = _query_stats(jnp.asarray(dist_rows), jnp.asarray(rows), jnp.asarray(g_index),
                       jnp.asarray(g_excl), jnp.asarray(q_index), jnp.asarray(q_excl),
                       jnp.asarray(pos), dedup=dedup, num_ids=num_ids)
  return _summarise(*stats, num_gallery=num_g, max_rank=max_rank)


def sysu_metrics(distmat, query_ids, gallery_ids, query_cams, gallery_cams, *,
                 max_rank: int = 20, dedup: bool = True) -> Metrics:
  """SYSU-MM01 metrics from a distance matrix (AGW `eval_sysu` semantics).

  Args:
    distmat: [num_query, num_gallery], smaller is closer.
    query_ids, gallery_ids: person identities.
    query_cams, gallery_cams: SYSU camera numbers 1..6.
    max_rank: CMC length (capped by the gallery size).
    dedup: identity-deduplicated CMC (the SYSU convention; False gives the plain CMC).

  Returns:
    Metrics: for a camera-3 query every camera-2 gallery image is ignored; queries without a
    remaining positive are skipped.
  """
  distmat = jnp.asarray(distmat)
  q_cams, g_cams = np.asarray(query_cams), np.asarray(gallery_cams)
  return rank_metrics(distmat.T, np.arange(distmat.shape[1]), query_ids, gallery_ids,
                      query_excluded=q_cams == SYSU_EXCLUDED[0],
                      gallery_excluded=g_cams == SYSU_EXCLUDED[1], dedup=dedup,
                      max_rank=max_rank)


def regdb_metrics(distmat, query_ids, gallery_ids, *, max_rank: int = 20,
                  dedup: bool = False) -> Metrics:
  """RegDB metrics from a distance matrix (AGW `eval_regdb`: no camera rule, plain CMC)."""
  distmat = jnp.asarray(distmat)
  return rank_metrics(distmat.T, np.arange(distmat.shape[1]), query_ids, gallery_ids,
                      dedup=dedup, max_rank=max_rank)


@jax.jit
def cosine_distance_rows(gallery_feats: jax.Array, query_feats: jax.Array) -> jax.Array:
  """[G, Q] distance -cos(g, q) of L2-normalised features (AGW ranks by -(q . g))."""
  g = gallery_feats / jnp.linalg.norm(gallery_feats, axis=1, keepdims=True)
  q = query_feats / jnp.linalg.norm(query_feats, axis=1, keepdims=True)
  return -(g @ q.T)


def evaluate_sysu(query_feats, query_ids, query_cams, gallery_feats, gallery_ids, gallery_cams,
                  *, max_rank: int = 20) -> Metrics:
  """`sysu_metrics` from features, with cosine distance on L2-normalised features."""
  dist_rows = cosine_distance_rows(jnp.asarray(gallery_feats), jnp.asarray(query_feats))
  q_cams, g_cams = np.asarray(query_cams), np.asarray(gallery_cams)
  return rank_metrics(dist_rows, np.arange(dist_rows.shape[0]), query_ids, gallery_ids,
                      query_excluded=q_cams == SYSU_EXCLUDED[0],
                      gallery_excluded=g_cams == SYSU_EXCLUDED[1], dedup=True,
                      max_rank=max_rank)


def evaluate_regdb(query_feats, query_ids, gallery_feats, gallery_ids, *,
                   max_rank: int = 20) -> Metrics:
  """`regdb_metrics` from features, with cosine distance on L2-normalised features."""
  dist_rows = cosine_distance_rows(jnp.asarray(gallery_feats), jnp.asarray(query_feats))
  return rank_metrics(dist_rows, np.arange(dist_rows.shape[0]), query_ids, gallery_ids,
                      dedup=False, max_rank=max_rank)
