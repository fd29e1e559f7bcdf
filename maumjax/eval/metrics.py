"""CMC, mAP and mINP for cross-modality re-ID, vectorised over queries in JAX.

Semantics (protocol.md §3), identical to the AGW reference evaluation:

* Ranking: ascending distance with a *stable* order (ties go to the earlier gallery item).
* SYSU-MM01: a query from camera 3 ignores every gallery image from camera 2, whatever its
  identity (the same-location rule, §1.7); the CMC is identity-deduplicated (each gallery
  identity counts once, at its best rank). RegDB: nothing is excluded and the CMC is plain.
* A query is valid if at least one positive remains; invalid queries are left out of every
  average. AP is non-interpolated over the whole filtered list; INP = G / rank of the last
  positive (Ye et al., TPAMI 2021).

The algorithm needs no sort (XLA's sort is slow on CPU: a [3803, 3010] argsort takes 2 s on two
cores). A `lax.scan` walks the gallery a chunk of items at a time and counts, for every query
and each of its kept positives, the kept items at a smaller distance (rank = count + 1); AP,
INP and the plain CMC follow from those ranks. For the deduplicated CMC the same scan keeps
each identity's best distance per query (or, when a chunk holds many identities, one more
pass marks the items ahead of the best positive): the CMC position is 1 + the number of
identities ahead of the query's best positive. Work is O(G x Q x P), P the most positives of
a query (40 on SYSU multi-shot), fused elementwise. Ties: an item at exactly a positive's
distance ranks before it only if it comes earlier in the gallery (a stable sort); the count
also finds such ties and only they are recounted. `rank_metrics_batch` evaluates all trials
of a protocol setting together: one compiled program, two trial streams run concurrently.
"""

from __future__ import annotations

import concurrent.futures
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


_STREAMS = 2  # trial groups of a batch evaluated concurrently
_CHUNK = 16  # gallery items per scan step (fastest measured; fewer pay more per-step cost)
_BIG = np.iinfo(np.int32).max
_MAX_RUNS = 4  # identity runs per chunk up to which the scan keeps per-run minima
_MAX_TIES = 32  # tied positives corrected one by one before a full stable recount
_LE_SHIFT = 16  # the tie probe keeps the <= count in the high bits of the < count's int32


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Host-side bookkeeping for T trial galleries of equal size G (all arrays numpy).

  The gallery is visited in schedule order: grouped by identity, inside an identity the items
  every query keeps before the excluded ones, then by gallery position. A query's kept
  positives are then the consecutive slots start .. start + count - 1 of its trial's schedule.
  The schedule is padded to whole chunks with slots that every query ignores.
  """

  rows: np.ndarray  # int32 [T, C, K] distance row of each slot
  position: np.ndarray  # int32 [T, C, K] gallery position (decides ties)
  kind: np.ndarray  # int8 [T, C, K] 0 kept, 1 excluded for flagged queries, 2 padding
  identity: np.ndarray  # int32 [T, C * K] identity index, sorted; padding num_ids
  run: np.ndarray  # int32 [T, C, K] index of the slot's identity run inside its chunk
  run_id: np.ndarray  # int32 [T, C * R] identity of each run, sorted (R: most runs a chunk has)
  start: np.ndarray  # int32 [T, Q] first schedule slot of the query's positives
  count: np.ndarray  # int32 [T, Q] number of kept positives (0: invalid query)
  num_ids: int


def _plan(rows: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray, q_excl: np.ndarray,
          g_excl: np.ndarray) -> _Plan:
  """Schedules T galleries ([T, G] rows, identities, excluded flags): O(T G log G + T Q)."""
  num_t, num_g = rows.shape
  uniq, inverse = np.unique(np.concatenate([g_ids.ravel(), q_ids]), return_inverse=True)
  num_ids = len(uniq)
  g_index = inverse[:g_ids.size].reshape(num_t, num_g)
  q_index = inverse[g_ids.size:]
  trial = np.repeat(np.arange(num_t), num_g).reshape(num_t, num_g)
  position = np.broadcast_to(np.arange(num_g), (num_t, num_g))
  # One lexsort for every trial: the trial is the primary key, so each row stays in place.
  order = np.lexsort((position.ravel(), g_excl.ravel(), g_index.ravel(), trial.ravel()))
  order = order.reshape(num_t, num_g) - trial * num_g
  flat = (trial * num_ids + g_index).ravel()
  n_all = np.bincount(flat, minlength=num_t * num_ids).reshape(num_t, num_ids)
  n_kept = np.bincount(flat[~g_excl.ravel()], minlength=num_t * num_ids).reshape(num_t,
                                                                                  num_ids)
  first_slot = np.cumsum(n_all, axis=1) - n_all
  count = np.where(q_excl[None, :], n_kept[:, q_index], n_all[:, q_index])
  num_c = -(-num_g // _CHUNK)
  pad = ((0, 0), (0, num_c * _CHUNK - num_g))

  def chunked(a, fill, dtype):
    return np.pad(a, pad, constant_values=fill).astype(dtype).reshape(num_t, num_c, _CHUNK)

  identity = np.pad(np.take_along_axis(g_index, order, 1), pad,
                    constant_values=num_ids).reshape(num_t, num_c, _CHUNK)
  # Runs: maximal stretches of one identity inside a chunk (the schedule is sorted by identity).
  new_run = np.concatenate([np.zeros((num_t, num_c, 1), bool),
                            identity[:, :, 1:] != identity[:, :, :-1]], axis=2)
  run = np.cumsum(new_run, axis=2)
  num_runs = int(run.max()) + 1
  # Identity of each run, from its first slot; a chunk with fewer runs repeats its last
  # identity (those runs hold no slot, so their minima stay +inf).
  run_start = np.sum(run[:, :, None, :] < np.arange(num_runs)[:, None], axis=3)
  run_id = np.take_along_axis(identity, np.minimum(run_start, _CHUNK - 1), 2)
  return _Plan(rows=chunked(np.take_along_axis(rows, order, 1), 0, np.int32),
               position=chunked(order, num_g, np.int32),
               kind=chunked(np.take_along_axis(g_excl, order, 1).astype(np.int8), 2, np.int8),
               identity=identity.reshape(num_t, -1).astype(np.int32),
               run=run.astype(np.int32), run_id=run_id.reshape(num_t, -1).astype(np.int32),
               start=first_slot[:, q_index].astype(np.int32), count=count.astype(np.int32),
               num_ids=num_ids)


def _untie(dist_rows, q_excl, slot_rows, slot_pos, slot_kind, pos_d, pos_g, lt, tied):
  """Stable counts from the < counts `lt` [Q, P] and the (at most _MAX_TIES) `tied` positives.

  A tied positive also ranks after the kept items at its distance that come earlier in the
  gallery; they are counted in its query's distance column, one column per tied positive.
  """
  num_pos = lt.shape[1]
  flat = jnp.nonzero(tied.reshape(-1), size=_MAX_TIES, fill_value=0)[0]
  live = jnp.arange(_MAX_TIES) < jnp.sum(tied)
  q, p = flat // num_pos, flat % num_pos
  d = dist_rows[slot_rows[None, :], q[:, None]]  # [M, slots]
  hide = (slot_kind[None, :] == 2) | ((slot_kind[None, :] == 1) & q_excl[q][:, None])
  same = ~hide & (d == pos_d[q, p][:, None]) & (slot_pos[None, :] < pos_g[q, p][:, None])
  extra = jnp.where(live, jnp.sum(same, axis=1, dtype=jnp.int32), 0)
  return lt.reshape(-1).at[flat].add(extra).reshape(lt.shape)


def _trial_stats(dist_rows, q_excl, rows, position, kind, identity, run, run_id, start, count,
                 *, num_pos: int, num_ids: int, num_runs: int, dedup: bool):
  """Per-query statistics of one trial gallery (the arrays of `_Plan` for that trial).

  A scan walks the schedule a chunk of K items at a time and counts, for every query and
  each of its kept positives, the kept items ranked before it (rank = count + 1); AP, INP and
  the plain CMC follow from those ranks. For the deduplicated CMC the scan also keeps, per
  query, the smallest distance of each identity run of a chunk: their minimum over an
  identity is its best distance, and the identities whose best distance is below the query's
  best positive precede the query's identity in the deduplicated list.

  Returns:
    (valid [Q] bool, ap [Q], inp [Q], cmc_rank [Q] int: the 1-based CMC position).
  """
  num_q = dist_rows.shape[1]
  slot_rows, slot_pos, slot_kind = rows.reshape(-1), position.reshape(-1), kind.reshape(-1)
  kept = jnp.arange(num_pos) < count[:, None]  # [Q, P]
  slot = jnp.where(kept, start[:, None] + jnp.arange(num_pos), 0)
  # Distances and gallery positions of each query's kept positives: the thresholds.
  pos_d = jnp.where(kept, dist_rows[slot_rows[slot], jnp.arange(num_q)[:, None]], jnp.inf)
  pos_g = jnp.where(kept, slot_pos[slot], _BIG)
  # Few identity runs per chunk (multi-shot galleries): their minima come out of the scan.
  run_minima = dedup and num_runs <= _MAX_RUNS

  def hidden(k):
    """[K, Q] excluded pairs and padding: at +inf, never ahead of a kept positive."""
    return (k[:, None] == 2) | ((k[:, None] == 1) & q_excl[None, :])

  def count_scan(exact: bool):
    def step(carry, x):
      acc, id_min = carry
      r, g, k, run_of, run_ids = x
      # The barrier keeps the gather and select out of the [Q, P] loop below (XLA would
      # otherwise fuse them into it and redo them P times per item for some chunk sizes).
      c = jax.lax.optimization_barrier(jnp.where(hidden(k), jnp.inf, dist_rows[r]))
      for i in range(c.shape[0]):
        ci = c[i][:, None]
        if exact:  # the stable order: an equal distance is ahead iff earlier in the gallery
          acc = acc + ((ci < pos_d) | ((ci == pos_d) & (g[i] < pos_g))).astype(jnp.int32)
        else:  # < count in the low bits, <= count in the high bits: one pass finds ties
          acc = acc + jnp.where(ci < pos_d, 1, 0) + jnp.where(ci <= pos_d, 1 << _LE_SHIFT, 0)
      if not run_minima:
        return (acc, id_min), None
      # [R, Q] the smallest distance of each identity run of the chunk, into its identity's.
      runs = jnp.stack([
          functools.reduce(jnp.minimum, [jnp.where(run_of[i] == j, c[i], jnp.inf)
                                         for i in range(c.shape[0])])
          for j in range(num_runs)])
      return (acc, id_min.at[run_ids].min(runs, indices_are_sorted=True)), None

    id_min = jnp.full((num_ids + 1, num_q) if run_minima else (0,), jnp.inf)
    return jax.lax.scan(step, (jnp.zeros((num_q, num_pos), jnp.int32), id_min),
                        (rows, position, kind, run, run_id.reshape(rows.shape[0], -1)))[0]

  if slot_rows.size < 1 << (31 - _LE_SHIFT):
    acc, id_min = count_scan(exact=False)
    lt, le = acc & ((1 << _LE_SHIFT) - 1), acc >> _LE_SHIFT
    # A positive whose <= count exceeds its < count by more than itself shares its distance
    # with another kept item. float32 distances do tie now and then (about one positive per
    # SYSU multi-shot trial), so a few such positives are corrected one by one; only many
    # (integer-valued test distances) need the slower stable count over everything.
    tied = kept & (le - lt > 1)
    num_tied = jnp.sum(tied)
    ahead = jax.lax.cond(
        num_tied == 0, lambda: lt,
        lambda: jax.lax.cond(num_tied <= _MAX_TIES,
                             lambda: _untie(dist_rows, q_excl, slot_rows, slot_pos, slot_kind,
                                            pos_d, pos_g, lt, tied),
                             lambda: count_scan(exact=True)[0]))
  else:  # too many items for the packed counts
    ahead, id_min = count_scan(exact=True)

  ranks = jnp.where(kept, ahead + 1, _BIG)  # distinct among a query's kept positives
  valid = count > 0

  # 1-based position of each positive among the positives, for AP.
  def among(i, k):
    return k + (jax.lax.dynamic_slice_in_dim(ranks, i, 1, axis=1) < ranks).astype(jnp.int32)

  k = jax.lax.fori_loop(0, num_pos, among, jnp.ones_like(ranks), unroll=min(num_pos, 8))
  ap = jnp.sum(jnp.where(kept, k / ranks, 0.0), axis=1) / jnp.maximum(count, 1)
  inp = count / jnp.maximum(jnp.max(jnp.where(kept, ranks, 0), axis=1), 1)
  if not dedup:
    return valid, ap, inp, jnp.min(ranks, axis=1)
  # Deduplicated CMC: 1 + the number of identities with a kept item ranked before the
  # query's best positive (its own identity has none: the best positive is its first).
  # The best positive: smallest distance, the earliest gallery position among equals.
  best_d = jnp.min(pos_d, axis=1)
  best_g = jnp.min(jnp.where(pos_d == best_d[:, None], pos_g, _BIG), axis=1)

  def marked_ids():
    """[Q] identities with a kept item ranked before the best positive, item by item."""
    c = dist_rows[slot_rows]  # [slots, Q], one fused pass with the comparison
    before = ~hidden(slot_kind) & ((c < best_d) | ((c == best_d) &
                                                  (slot_pos[:, None] < best_g)))
    per_id = jax.ops.segment_max(before, identity, num_segments=num_ids + 1,
                                 indices_are_sorted=True)
    return jnp.sum(per_id[:num_ids], axis=0, dtype=jnp.int32)

  if not run_minima:
    return valid, ap, inp, 1 + marked_ids()
  id_min = id_min[:num_ids]  # [J, Q] each identity's best distance
  # An identity whose best distance equals the best positive's (the query's own identity
  # always does) precedes it only if that item comes earlier in the gallery: when another
  # identity ties, mark the items instead.
  id_tied = jnp.any(valid & (jnp.sum(id_min == best_d, axis=0) > 1))
  ids_before = jax.lax.cond(id_tied, marked_ids,
                            lambda: jnp.sum(id_min < best_d, axis=0, dtype=jnp.int32))
  return valid, ap, inp, 1 + ids_before


@functools.partial(jax.jit, static_argnames=("num_pos", "num_ids", "num_runs", "dedup"))
def _batch_stats(dist_rows, q_excl, plan_arrays, *, num_pos: int, num_ids: int, num_runs: int,
                 dedup: bool):
  """`_trial_stats` for T trials in one call: [T, Q] arrays (one dispatch, one compile)."""
  def one(trial):
    return _trial_stats(dist_rows, q_excl, *trial, num_pos=num_pos, num_ids=num_ids,
                        num_runs=num_runs, dedup=dedup)

  return jax.lax.map(one, plan_arrays)


def _summarise(valid, ap, inp, cmc_rank, num_gallery: int, max_rank: int) -> Metrics:
  num_valid = int(valid.sum())
  if num_valid == 0:
    raise ValueError("no query has a matching gallery image after filtering; check that "
                     "query and gallery identities overlap")
  length = min(max_rank, num_gallery)
  ranks = cmc_rank[valid]
  cmc = (ranks[:, None] <= np.arange(1, length + 1)[None, :]).mean(axis=0)
  return Metrics(cmc=cmc, mAP=float(ap[valid].astype(np.float64).mean()),
                 mINP=float(inp[valid].astype(np.float64).mean()), num_valid=num_valid)


def rank_metrics_batch(dist_rows, rows, query_ids, gallery_ids, *, query_excluded=None,
                       gallery_excluded=None, dedup: bool,
                       max_rank: int = 20) -> list[Metrics]:
  """`rank_metrics` for T galleries of equal size (a protocol's trials), evaluated together.

  Args:
    dist_rows: [N, Q] distances of N candidate gallery items to the queries.
    rows: int [T, G] per trial, the gallery: position i (which decides ties) is rows[t, i].
    query_ids: [Q] query identities, shared by the trials.
    gallery_ids: [T, G] identities of the gallery positions.
    query_excluded: bool [Q]; gallery_excluded: bool [T, G]; as in `rank_metrics`.
    dedup: identity-deduplicated CMC (SYSU) or plain (RegDB).
    max_rank: CMC length, capped by the gallery size.

  Returns:
    One Metrics per trial, in trial order.

  Raises:
    ValueError: shape mismatches, or a trial without a valid query.
  """
  rows = np.asarray(rows)
  q_ids = np.asarray(query_ids)
  g_ids = np.asarray(gallery_ids)
  num_q = q_ids.shape[0]
  if rows.ndim != 2 or g_ids.shape != rows.shape or dist_rows.shape[1] != num_q:
    raise ValueError(f"distances {tuple(dist_rows.shape)} (candidates x queries) do not fit "
                     f"{num_q} query ids and galleries {rows.shape} ({g_ids.shape} ids)")
  num_t, num_g = rows.shape
  if num_t == 0:
    return []
  q_excl = np.zeros(num_q, bool) if query_excluded is None else np.asarray(query_excluded, bool)
  g_excl = (np.zeros(rows.shape, bool) if gallery_excluded is None
            else np.broadcast_to(np.asarray(gallery_excluded, bool), rows.shape))
  plan = _plan(rows, q_ids, g_ids, q_excl, g_excl)
  arrays = (plan.rows, plan.position, plan.kind, plan.identity, plan.run, plan.run_id,
            plan.start, plan.count)
  dist_rows, q_excl_dev = jnp.asarray(dist_rows), jnp.asarray(q_excl)
  # Positives padded to whole 8-lane vectors (the count loop's SIMD width).
  static = {"num_pos": -(-max(1, int(plan.count.max(initial=0))) // 8) * 8,
            "num_ids": plan.num_ids, "num_runs": int(plan.run.max()) + 1, "dedup": dedup}
  size = -(-num_t // _STREAMS)  # trials per stream; the last stream repeats its last trial

  def stream(lo: int) -> list[np.ndarray]:
    take = np.minimum(np.arange(lo, lo + size), num_t - 1)  # equal shapes: one compile
    stats = _batch_stats(dist_rows, q_excl_dev, tuple(a[take] for a in arrays), **static)
    return [np.asarray(a)[:num_t - lo] for a in stats]

  # Two trial streams at once keep both CPU cores busy where XLA runs one kernel at a time
  # (25% less time on SYSU multi-shot with two cores than one stream).
  starts = range(0, num_t, size)
  if len(starts) == 1:
    parts = [stream(0)]
  else:
    with concurrent.futures.ThreadPoolExecutor(len(starts)) as pool:
      parts = list(pool.map(stream, starts))
  valid, ap, inp, cmc_rank = (np.concatenate(a) for a in zip(*parts))
  return [_summarise(valid[t], ap[t], inp[t], cmc_rank[t], num_gallery=num_g,
                     max_rank=max_rank) for t in range(num_t)]


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
  rows = np.asarray(rows)
  g_ids = np.asarray(gallery_ids)
  if rows.ndim != 1 or g_ids.shape != rows.shape or dist_rows.shape[1] != len(query_ids):
    raise ValueError(f"distances {tuple(dist_rows.shape)} (candidates x queries) do not fit "
                     f"{len(query_ids)} query ids and {rows.shape[0]} gallery positions "
                     f"({g_ids.shape} ids)")
  g_excl = None if gallery_excluded is None else np.asarray(gallery_excluded, bool)[None]
  return rank_metrics_batch(dist_rows, rows[None], query_ids, g_ids[None],
                            query_excluded=query_excluded, gallery_excluded=g_excl,
                            dedup=dedup, max_rank=max_rank)[0]


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


DISTANCES = ("cosine", "euclidean")


@jax.jit
def cosine_distance_rows(gallery_feats: jax.Array, query_feats: jax.Array) -> jax.Array:
  """[G, Q] distance -cos(g, q) of L2-normalised features (AGW ranks by -(q . g)).

  Ranks exactly as the squared Euclidean distance of L2-normalised features (2 - 2 cos), the
  ranking of MPANet's SYSU-MM01 evaluation.
  """
  g = gallery_feats / jnp.linalg.norm(gallery_feats, axis=1, keepdims=True)
  q = query_feats / jnp.linalg.norm(query_feats, axis=1, keepdims=True)
  return -(g @ q.T)


@jax.jit
def euclidean_distance_rows(gallery_feats: jax.Array, query_feats: jax.Array) -> jax.Array:
  """[G, Q] squared Euclidean distance |g - q|^2 of the features as they are (not normalised).

  MPANet's RegDB evaluation (mpanet.md §6): |g|^2 + |q|^2 - 2 g.q, in float32 with full-precision
  products (no TF32 or bf16 passes on accelerators), so the norms' large terms cancel exactly
  enough to rank by.
  """
  g = gallery_feats.astype(jnp.float32)
  q = query_feats.astype(jnp.float32)
  dot = jnp.matmul(g, q.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(g * g, axis=1)[:, None] + jnp.sum(q * q, axis=1)[None, :] - 2.0 * dot


def distance_rows(gallery_feats, query_feats, distance: str = "cosine") -> jax.Array:
  """[G, Q] ranking distances: 'cosine' (L2-normalised features, every reference's SYSU
  ranking) or 'euclidean' (squared Euclidean of unnormalised features, MPANet's RegDB).

  Raises:
    ValueError: `distance` is not one of `DISTANCES`.
  """
  if distance not in DISTANCES:
    raise ValueError(f"distance {distance!r} is not one of {DISTANCES}: 'cosine' ranks "
                     "L2-normalised features, 'euclidean' unnormalised ones")
  fn = cosine_distance_rows if distance == "cosine" else euclidean_distance_rows
  return fn(jnp.asarray(gallery_feats), jnp.asarray(query_feats))


def evaluate_sysu(query_feats, query_ids, query_cams, gallery_feats, gallery_ids, gallery_cams,
                  *, max_rank: int = 20, distance: str = "cosine") -> Metrics:
  """`sysu_metrics` from features, ranked by `distance_rows(..., distance)` (default cosine)."""
  dist_rows = distance_rows(gallery_feats, query_feats, distance)
  q_cams, g_cams = np.asarray(query_cams), np.asarray(gallery_cams)
  return rank_metrics(dist_rows, np.arange(dist_rows.shape[0]), query_ids, gallery_ids,
                      query_excluded=q_cams == SYSU_EXCLUDED[0],
                      gallery_excluded=g_cams == SYSU_EXCLUDED[1], dedup=True,
                      max_rank=max_rank)


def evaluate_regdb(query_feats, query_ids, gallery_feats, gallery_ids, *,
                   max_rank: int = 20, distance: str = "cosine", dedup: bool = False) -> Metrics:
  """`regdb_metrics` from features, ranked by `distance_rows(..., distance)` (default cosine).

  `dedup`: the identity-deduplicated CMC (MPANet's released code evaluates RegDB with its SYSU
  CMC); False is AGW's plain CMC. mAP and mINP do not depend on it.
  """
  dist_rows = distance_rows(gallery_feats, query_feats, distance)
  return rank_metrics(dist_rows, np.arange(dist_rows.shape[0]), query_ids, gallery_ids,
                      dedup=dedup, max_rank=max_rank)
