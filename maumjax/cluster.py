"""Clustering for unsupervised VI-ReID (MMM, mmm.md §5.2): the k-reciprocal Jaccard distance,
DBSCAN pseudo-labels and cluster-memory initialisation.

`jaccard_distance(feats, *, k1, k2, modality=None)` is the k-reciprocal encoding of Zhong et
al. (CVPR 2017) as the cluster-contrast family of codes computes it for clustering (the
`compute_jaccard_distance` that MMM's `Baseline.py` calls), with its quirks kept:

1. kNN: the k1 nearest rows of every row by squared Euclidean distance of the features as
   given (flip-averaged, not re-normalised), the row itself included (normally first). The
   neighbour list has **k1 columns**, so the "k1 + 1" forward list below is cut to k1 entries.
2. R(i, k): the entries j of the first min(k + 1, k1) columns of row i whose own first
   min(k + 1, k1) columns contain i (the k-reciprocal neighbours).
3. Expansion: start from R(i, k1); add R(c, round(k1 / 2)) (numpy's round half to even) of each
   candidate c in R(i, k1) whose overlap with R(i, k1) is more than 2/3 of its size; keep the
   unique entries E(i).
4. V[i, j] = softmax over j in E(i) of -(2 - 2 <f_i, f_j>), zero elsewhere.
5. Query expansion (k2 > 1): V'[i] = mean of V[r] over the first k2 columns r of row i's
   neighbour list. With `modality` (the modality-aware joint version of MMM's stage 2): the
   mean of the visible rows among those k2 and the mean of the infrared rows, averaged (or the
   one present).
6. jaccard[i, j] = 1 - m / (2 - m), m = sum_k min(V'[i, k], V'[j, k]); negative values are
   clipped to 0.

Memory (mmm.md §12): the kNN runs blockwise on the JAX device (no faiss, no N x N distance
matrix anywhere), V and V' are scipy sparse matrices (a row holds tens to hundreds of entries),
and the min-sum of step 6 runs over the sparse rows, compiled with numba, so the only N x N
array on the host is the float32 result: at SYSU's joint size (34,167 images) 4.7 GB.

`pseudo_labels(dist, *, eps, min_samples=4)`: DBSCAN (scikit-learn, precomputed metric),
-1 = outlier. `init_cluster_memory(feats, labels, *, modality=None)`: L2-normalised cluster
means, modality-balanced (mean of the visible mean and the infrared mean) with `modality`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numba
import numpy as np
import scipy.sparse as sp

KNN_BLOCK = 1024  # query rows per kNN block on the device
MINSUM_BLOCK = 256  # rows per block of the expansion (step 3) and the final transform


def _check_feats(feats: np.ndarray, modality: np.ndarray | None) -> tuple[np.ndarray,
                                                                        np.ndarray | None]:
  feats = np.asarray(feats, np.float32)
  if feats.ndim != 2 or feats.shape[0] < 2:
    raise ValueError(f"feats must be [N, D] with N >= 2, got shape {feats.shape}")
  if not np.all(np.isfinite(feats)):
    raise ValueError("feats contain NaN or inf; check the feature extraction")
  if modality is not None:
    modality = np.asarray(modality)
    if modality.shape != feats.shape[:1] or modality.dtype != np.bool_:
      raise ValueError(f"modality must be bool [N] (True = infrared) for feats {feats.shape}, "
                       f"got {modality.dtype} {modality.shape}")
  return feats, modality


def _block_dist(qi: jax.Array, sqi: jax.Array, qj: jax.Array, sqj: jax.Array) -> jax.Array:
  """Squared Euclidean distances [B, B] between two row blocks (padding: sq = inf)."""
  return sqi[:, None] + sqj[None, :] - 2.0 * jnp.matmul(qi, qj.T,
                                                        precision=jax.lax.Precision.HIGHEST)


def _merge(best_d: jax.Array, best_i: jax.Array, d: jax.Array, offset: jax.Array,
           k: int) -> tuple[jax.Array, jax.Array]:
  """The k nearest of a row's running best (earlier column blocks) and a new block's columns.

  The running best comes first, so among equal distances the lower column index wins (the
  column blocks arrive in increasing order), as in one top-k over the whole row.
  """
  kk = min(k, d.shape[1])
  top_d, top_i = jax.lax.top_k(-d, kk)
  cand_d = jnp.concatenate([best_d, -top_d], axis=1)
  cand_i = jnp.concatenate([best_i, top_i + offset], axis=1)
  _, pick = jax.lax.top_k(-cand_d, k)
  return (jnp.take_along_axis(cand_d, pick, axis=1),
          jnp.take_along_axis(cand_i, pick, axis=1))


@functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(2, 3))
def _knn_diagonal(q, sq, best_d, best_i, offset, *, k: int):
  """Block (i, i): merges its columns into block i's rows."""
  return _merge(best_d, best_i, _block_dist(q, sq, q, sq), offset, k)


@functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(4, 5, 6, 7))
def _knn_pair(qi, sqi, qj, sqj, bi_d, bi_i, bj_d, bj_i, oi, oj, *, k: int):
  """Blocks i < j: one distance block serves both, block j's columns for block i's rows and
  its transpose (block i's columns) for block j's rows."""
  d = _block_dist(qi, sqi, qj, sqj)
  bi = _merge(bi_d, bi_i, d, oj, k)
  bj = _merge(bj_d, bj_i, d.T, oi, k)
  return bi[0], bi[1], bj[0], bj[1]


def knn(feats: np.ndarray, k: int, *, block: int = KNN_BLOCK) -> np.ndarray:
  """Exact k nearest neighbours by squared Euclidean distance, blockwise on the JAX device.

  The distance is symmetric, so each pair of row blocks (i <= j) is computed once and serves
  both blocks' rows: half the matrix products of a row-by-row search. Each row keeps a running
  top-k over the column blocks, visited in increasing order, so equal distances rank the lower
  index first (as a stable sort of the whole row would).

  Args:
    feats: [N, D] float32.
    k: neighbours per row (the row itself included), k <= N.
    block: rows per block (the last block is padded, so one compilation).

  Returns:
    int64 [N, k], nearest first.
  """
  feats = np.asarray(feats, np.float32)
  n, dim = feats.shape
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, N={n}]")
  block = min(block, n)
  blocks = -(-n // block)
  padded = np.zeros((blocks * block, dim), np.float32)
  padded[:n] = feats
  sq_all = np.sum(np.square(padded.astype(np.float64)), axis=1).astype(np.float32)
  sq_all[n:] = np.inf  # padding rows are never anyone's neighbour
  q = [jnp.asarray(padded[b * block:(b + 1) * block]) for b in range(blocks)]
  sq = [jnp.asarray(sq_all[b * block:(b + 1) * block]) for b in range(blocks)]
  best = [(jnp.full((block, k), jnp.inf, jnp.float32), jnp.zeros((block, k), jnp.int32))
          for _ in range(blocks)]
  offsets = [jnp.int32(b * block) for b in range(blocks)]
  for i in range(blocks):
    # Column blocks reach row block i in increasing order: j < i came through the pairs
    # (j, i) of earlier outer iterations, then (i, i), then (i, j > i).
    best[i] = _knn_diagonal(q[i], sq[i], *best[i], offsets[i], k=k)
    for j in range(i + 1, blocks):
      bi_d, bi_i, bj_d, bj_i = _knn_pair(q[i], sq[i], q[j], sq[j], *best[i], *best[j],
                                         offsets[i], offsets[j], k=k)
      best[i], best[j] = (bi_d, bi_i), (bj_d, bj_i)
  return np.concatenate([np.asarray(b[1]) for b in best])[:n].astype(np.int64)


def _reciprocal(rank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """R(i, k) for every row as a padded array: (indices [N, c], mask [N, c]), c = min(k+1, k1)."""
  cols = min(k + 1, rank.shape[1])
  forward = rank[:, :cols]  # [N, c]
  backward = rank[forward][:, :, :cols]  # [N, c, c]
  mask = np.any(backward == np.arange(rank.shape[0])[:, None, None], axis=2)
  return forward, mask


def _compiled(kernel):
  """(serial, parallel) numba compilations of `kernel` (its `numba.prange` loops run in order
  in the serial one). Compiling the parallel one takes several seconds, so inputs below
  `PARALLEL_ROWS` rows (tests, small datasets) use the serial one; both are cached on disk."""
  return (numba.njit(cache=True)(kernel), numba.njit(parallel=True, cache=True)(kernel))


PARALLEL_ROWS = 4096


def _expansion_kernel(feats, r_idx, r_mask, h_idx, h_mask, cols, vals, lengths):  # pragma: no cover
  # Compiled by numba (its coverage is not traced). Row i: E(i) (step 3) into cols[i], sorted
  # and unique, and its softmax weights (step 4) into vals[i]; lengths[i] = |E(i)|.
  n, c1 = r_idx.shape
  ch = h_idx.shape[1]
  for i in numba.prange(n):
    buf = np.empty(c1 + c1 * ch, np.int64)
    count = 0
    for t in range(c1):
      if r_mask[i, t]:
        buf[count] = r_idx[i, t]
        count += 1
    own = buf[:count].copy()
    for t in range(c1):
      if not r_mask[i, t]:
        continue
      c = r_idx[i, t]
      size = 0
      overlap = 0
      for s in range(ch):
        if h_mask[c, s]:
          size += 1
          for u in range(own.shape[0]):
            if own[u] == h_idx[c, s]:
              overlap += 1
              break
      if overlap > 2.0 / 3.0 * size:
        for s in range(ch):
          if h_mask[c, s]:
            buf[count] = h_idx[c, s]
            count += 1
    members = np.unique(buf[:count])
    m = members.shape[0]
    dist = np.empty(m, np.float32)
    for u in range(m):
      dist[u] = 2.0 - 2.0 * np.dot(feats[members[u]], feats[i])
    top = np.max(-dist)
    total = 0.0
    for u in range(m):
      w = np.exp(-dist[u] - top)
      vals[i, u] = w
      total += w
    for u in range(m):
      vals[i, u] = vals[i, u] / total
      cols[i, u] = members[u]
    lengths[i] = m


_EXPANSION = _compiled(_expansion_kernel)


def _expansion_rows(feats: np.ndarray, rank: np.ndarray, k1: int) -> sp.csr_matrix:
  """V of step 4 as a CSR matrix [N, N] (float32), row by row in parallel (numba)."""
  n = rank.shape[0]
  r_idx, r_mask = _reciprocal(rank, k1)
  h_idx, h_mask = _reciprocal(rank, int(np.around(k1 / 2)))
  width = r_idx.shape[1] * (1 + h_idx.shape[1])
  cols = np.zeros((n, width), np.int64)
  vals = np.zeros((n, width), np.float32)
  lengths = np.zeros(n, np.int64)
  kernel = _EXPANSION[n >= PARALLEL_ROWS]
  kernel(np.ascontiguousarray(feats, np.float32), r_idx, r_mask, h_idx, h_mask, cols, vals,
         lengths)
  used = np.arange(width)[None, :] < lengths[:, None]
  indptr = np.concatenate([[0], np.cumsum(lengths)])
  return sp.csr_matrix((vals[used], cols[used], indptr), shape=(n, n), dtype=np.float32)


def _query_expansion(v: sp.csr_matrix, rank: np.ndarray, k2: int,
                     modality: np.ndarray | None) -> sp.csr_matrix:
  """V' of step 5: a sparse averaging matrix A (k2 entries per row) times V."""
  n = rank.shape[0]
  nbrs = rank[:, :k2]
  if modality is None:
    weights = np.full(nbrs.shape, 1.0 / k2)
  else:
    ir = modality[nbrs]  # [N, k2]
    n_ir = ir.sum(axis=1, keepdims=True)
    n_vis = k2 - n_ir
    both = (n_ir > 0) & (n_vis > 0)
    per_ir = np.where(both, 0.5, 1.0) / np.maximum(n_ir, 1)
    per_vis = np.where(both, 0.5, 1.0) / np.maximum(n_vis, 1)
    weights = np.where(ir, per_ir, per_vis)
  a = sp.csr_matrix((weights.ravel().astype(np.float32),
                     (np.repeat(np.arange(n), k2), nbrs.ravel())), shape=(n, n))
  return (a @ v).tocsr()


def _min_sums_rows(indptr, indices, data, col_ptr, col_rows, col_vals, out):  # pragma: no cover
  # Compiled by numba (its coverage is not traced). Row i of `out` is filled in one place:
  # zeroed, the min-sums over the rows sharing a column with row i added column by column
  # (ascending, as a column-major loop would), then mapped to the distance.
  n = out.shape[0]
  for i in numba.prange(n):
    row = out[i]
    row[:] = 0.0
    for p in range(indptr[i], indptr[i + 1]):
      k = indices[p]
      a = data[p]
      for q in range(col_ptr[k], col_ptr[k + 1]):
        j = col_rows[q]
        b = col_vals[q]
        row[j] += a if a < b else b
    for j in range(n):
      m = row[j]
      d = 1.0 - m / (2.0 - m)
      row[j] = d if d > 0.0 else 0.0


_MIN_SUMS = _compiled(_min_sums_rows)


def _min_sums(v: sp.csr_matrix, out: np.ndarray) -> None:
  """out[i, j] = 1 - m / (2 - m) with m = sum_k min(V[i, k], V[j, k]), clipped at 0.

  Row by row (in parallel, compiled with numba): for each column k of row i, the rows R_k with
  V[:, k] != 0 (the inverted index, V in CSC form) add min(V[i, k], V[R_k, k]) to out[i, R_k].
  The work is sum_k |R_k|^2 (the pairs that share a column), every write stays inside one
  output row (cache-friendly), and the only N x N array is `out` itself.
  """
  v = v.tocsr()
  v.sort_indices()
  vt = v.tocsc()
  vt.sort_indices()
  kernel = _MIN_SUMS[v.shape[0] >= PARALLEL_ROWS]
  kernel(v.indptr, v.indices, v.data.astype(np.float32), vt.indptr, vt.indices,
         vt.data.astype(np.float32), out)


def jaccard_distance(feats: np.ndarray, *, k1: int, k2: int,
                     modality: np.ndarray | None = None) -> np.ndarray:
  """The k-reciprocal Jaccard distance of MMM's clustering (module docstring, steps 1-6).

  Args:
    feats: [N, D] features as the clustering receives them (flip-averaged L2-normalised
      BN-neck features, not re-normalised).
    k1: the k-reciprocal neighbourhood (MMM: 30 per modality; joint SYSU 40, RegDB 38).
    k2: the query-expansion neighbourhood (MMM: 6 per modality; joint SYSU 32, RegDB 18);
      1 turns it off.
    modality: bool [N], True = infrared; switches on the modality-aware joint version (the
      query expansion averages the two modalities' means).

  Returns:
    float32 [N, N]: 0 on the diagonal (up to rounding), in [0, 1].

  Raises:
    ValueError: feats not [N, D] or not finite, modality not bool [N], k1 or k2 out of
      [1, N].
  """
  feats, modality = _check_feats(feats, modality)
  n = feats.shape[0]
  if not (1 <= k1 <= n and 1 <= k2 <= k1):
    raise ValueError(f"need 1 <= k2 <= k1 <= N; got k1={k1}, k2={k2}, N={n}")
  rank = knn(feats, k1)
  v = _expansion_rows(feats, rank, k1)
  if k2 > 1:
    v = _query_expansion(v, rank, k2, modality)
  out = np.empty((n, n), np.float32)
  _min_sums(v, out)
  return out


def pseudo_labels(dist: np.ndarray, *, eps: float, min_samples: int = 4) -> np.ndarray:
  """DBSCAN on a precomputed distance (scikit-learn): int64 [N] labels, -1 = outlier.

  DBSCAN only needs the pairs closer than eps, so the matrix is handed over as a sparse one
  holding those pairs (built block by block, the diagonal included as explicit zeros); the
  labels are those of DBSCAN on the dense matrix (tested), without scikit-learn's dense
  neighbourhood search over N x N.

  Args:
    dist: [N, N] distances (e.g. `jaccard_distance`).
    eps: the neighbourhood radius (MMM: 0.6 SYSU, 0.3 RegDB).
    min_samples: DBSCAN's core-point count, the point itself included (MMM: 4).
  """
  from sklearn.cluster import DBSCAN

  dist = np.asarray(dist)
  if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
    raise ValueError(f"dist must be a square [N, N] matrix, got shape {dist.shape}")
  n = dist.shape[0]
  rows, cols, vals = [], [], []
  for start in range(0, n, MINSUM_BLOCK):
    block = dist[start:start + MINSUM_BLOCK]
    r, c = np.nonzero(block <= eps)  # sklearn's radius test is d <= eps
    rows.append(r + start)
    cols.append(c)
    vals.append(block[r, c].astype(np.float64))
  close = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(n, n))
  return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(
      close).astype(np.int64)


def init_cluster_memory(feats: np.ndarray, labels: np.ndarray, *,
                        modality: np.ndarray | None = None) -> np.ndarray:
  """Cluster memories: the L2-normalised mean feature of each cluster 0..max(labels).

  With `modality` (joint clusters, mmm.md §5.2 step 7): the mean of the cluster's visible
  members and the mean of its infrared members are averaged (a cluster with one modality uses
  that one's mean), then normalised. Outliers (-1) are ignored.

  Args:
    feats: [N, D].
    labels: int [N], -1 for outliers.
    modality: bool [N], True = infrared, or None.

  Returns:
    float32 [C, D], C = max(labels) + 1 (a label with no member would be a zero row; DBSCAN's
    labels are contiguous).
  """
  feats, modality = _check_feats(feats, modality)
  labels = np.asarray(labels)
  if labels.shape != feats.shape[:1]:
    raise ValueError(f"labels must be [N] for feats {feats.shape}, got {labels.shape}")
  num = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
  if num == 0:
    raise ValueError("no cluster: every label is -1 (outlier); loosen eps or check features")

  def means(select: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = select & (labels >= 0)
    sums = np.zeros((num, feats.shape[1]), np.float64)
    np.add.at(sums, labels[keep], feats[keep])
    counts = np.bincount(labels[keep], minlength=num).astype(np.float64)
    return sums / np.maximum(counts, 1)[:, None], counts

  if modality is None:
    centre, _ = means(np.ones(labels.shape, bool))
  else:
    vis, n_vis = means(~modality)
    ir, n_ir = means(modality)
    both = (n_vis > 0) & (n_ir > 0)
    centre = np.where(both[:, None], (vis + ir) / 2, np.where((n_vis > 0)[:, None], vis, ir))
  norm = np.linalg.norm(centre, axis=1, keepdims=True)
  return (centre / np.maximum(norm, 1e-12)).astype(np.float32)


# --- MMLM: multi-memory matching of visible to infrared clusters (mmm.md §6) ---------------

MATCHINGS = ("greedy", "hungarian")
COST_SUMS = ("ir", "visible")
UNMATCHED = ("nearest", "keep_own_label", "drop")


def sub_memories(feats: np.ndarray, labels: np.ndarray, *, n: int = 4,
                 seed: int = 0) -> np.ndarray:
  """k-means sub-centres ("multi-memory") of every cluster 0..max(labels) (mmm.md §6.1).

  Each cluster's members get scikit-learn's `KMeans(n, random_state=seed)` (its defaults
  otherwise); a cluster with fewer than n members, or where k-means fails, uses its mean n
  times (the code's fallback). Outliers (-1) are ignored.

  Returns:
    float32 [C, n, D].
  """
  from sklearn.cluster import KMeans

  feats = np.asarray(feats, np.float32)
  labels = np.asarray(labels)
  num = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
  out = np.zeros((num, n, feats.shape[1]), np.float32)
  for c in range(num):
    members = feats[labels == c]
    if len(members) == 0:
      continue
    try:
      if len(members) < n:
        raise ValueError("fewer members than sub-memories")
      out[c] = KMeans(n_clusters=n, random_state=seed).fit(members).cluster_centers_
    except ValueError:
      out[c] = members.mean(0)
  return out


def cluster_costs(sub_rgb: np.ndarray, sub_ir: np.ndarray, *,
                  cost_sum_over: str = "ir") -> np.ndarray:
  """cost[a, b] between visible cluster a and infrared cluster b from their sub-centres.

  'ir' (the code): sum over b's sub-centres t_i of min_j |t_i - r_j|; 'visible' (the paper):
  sum over a's sub-centres r_j of min_i |r_j - t_i|.

  Args:
    sub_rgb: [A, n, D]; sub_ir: [B, n', D].

  Returns:
    float64 [A, B].
  """
  if cost_sum_over not in COST_SUMS:
    raise ValueError(f"cost_sum_over={cost_sum_over!r}; choose one of {COST_SUMS}")
  r = np.asarray(sub_rgb, np.float64)
  t = np.asarray(sub_ir, np.float64)
  # d[a, b, j, i] = |r_aj - t_bi|
  d = np.sqrt(np.maximum(np.sum(r[:, None, :, None, :] ** 2, -1)
                         + np.sum(t[None, :, None, :, :] ** 2, -1)
                         - 2 * np.einsum("ajd,bid->abji", r, t), 0.0))
  return d.min(axis=2).sum(axis=2) if cost_sum_over == "ir" else d.min(axis=3).sum(axis=2)


def match_clusters(sub_rgb: np.ndarray, sub_ir: np.ndarray, *, method: str = "greedy",
                   cost_sum_over: str = "ir") -> np.ndarray:
  """The infrared cluster of each visible cluster (mmm.md §6).

  'greedy' (the code): each visible cluster takes its cheapest infrared cluster, several may
  take the same one. 'hungarian' (the paper): `scipy.optimize.linear_sum_assignment` on the
  cost, one-to-one; with more visible than infrared clusters the leftovers get -1 (the
  `unmatched` policy of `mmlm_labels` decides what they become).

  Args:
    sub_rgb: [A, n, D] visible sub-centres; sub_ir: [B, n, D] infrared sub-centres.
    method: a key of `MATCHINGS`.
    cost_sum_over: 'ir' (code) or 'visible' (paper), see `cluster_costs`.

  Returns:
    int64 [A]: the infrared cluster index, or -1.
  """
  if method not in MATCHINGS:
    raise ValueError(f"method={method!r}; choose one of {MATCHINGS}")
  cost = cluster_costs(sub_rgb, sub_ir, cost_sum_over=cost_sum_over)
  if method == "greedy":
    return np.argmin(cost, axis=1).astype(np.int64)
  from scipy.optimize import linear_sum_assignment

  rows, cols = linear_sum_assignment(cost)
  out = np.full(cost.shape[0], -1, np.int64)
  out[rows] = cols
  return out


def mmlm_labels(rgb_labels: np.ndarray, sub_rgb: np.ndarray, sub_ir: np.ndarray, *,
                method: str = "greedy", cost_sum_over: str = "ir",
                unmatched: str = "nearest", off_by_one: bool = False) -> np.ndarray:
  """The visible pseudo-labels moved into the infrared label space (mmm.md §6.1 step 4).

  Args:
    rgb_labels: int [N_rgb] visible cluster labels, -1 outliers (kept -1).
    sub_rgb, sub_ir: the clusters' sub-centres (`sub_memories`).
    method, cost_sum_over: as `match_clusters`.
    unmatched: what a visible cluster left unmatched by the Hungarian solution becomes:
      'nearest' (default: its cheapest infrared cluster, the greedy fallback),
      'keep_own_label' (its visible number) or 'drop' (-1).
    off_by_one: bug-compatible with the released code (mmm.md §9 row 4): the last visible
      cluster is not relabelled (keeps its visible number, which may collide with an unrelated
      infrared label) and the last infrared cluster is never a candidate. Default off (fixed).

  Returns:
    int64 [N_rgb] labels in the infrared label space (-1 for outliers and dropped clusters).
  """
  if unmatched not in UNMATCHED:
    raise ValueError(f"unmatched={unmatched!r}; choose one of {UNMATCHED}")
  a, b = len(sub_rgb), len(sub_ir)
  used_a, used_b = (a - 1, b - 1) if off_by_one else (a, b)
  match = np.arange(a, dtype=np.int64)  # clusters outside the loop keep their own number
  if used_a > 0 and used_b > 0:
    got = match_clusters(sub_rgb[:used_a], sub_ir[:used_b], method=method,
                         cost_sum_over=cost_sum_over)
    left = got < 0
    if np.any(left):
      if unmatched == "nearest":
        cost = cluster_costs(sub_rgb[:used_a], sub_ir[:used_b], cost_sum_over=cost_sum_over)
        got[left] = np.argmin(cost[left], axis=1)
      elif unmatched == "keep_own_label":
        got[left] = np.flatnonzero(left)
      # 'drop' keeps -1
    match[:used_a] = got
  labels = np.asarray(rgb_labels, np.int64)
  return np.where(labels >= 0, match[np.maximum(labels, 0)], -1)


def clean_probability(*loss_vectors: np.ndarray, seed: int = 0) -> list[np.ndarray]:
  """Per-sample "clean" probabilities from per-sample losses (mmm.md §7.3).

  Each vector is min-max normalised to [0, 1] on its own, the vectors are concatenated, a
  2-component 1-D Gaussian mixture is fitted (scikit-learn; max_iter 100, tol 1e-2,
  reg_covar 5e-4, as the code) and each sample's weight is the posterior of the component with
  the smaller mean. MMM calls it twice per epoch: once with the two visible views' losses,
  once with the infrared losses.

  Args:
    *loss_vectors: 1-D per-sample losses (e.g. the CE of visible view 1 and of view 2).
    seed: the mixture's random_state.

  Returns:
    One float32 weight vector per input, in [0, 1].
  """
  from sklearn.mixture import GaussianMixture

  if not loss_vectors:
    raise ValueError("give at least one loss vector")
  scaled = []
  for v in loss_vectors:
    v = np.asarray(v, np.float64).ravel()
    if v.size == 0 or not np.all(np.isfinite(v)):
      raise ValueError("loss vectors must be non-empty and finite")
    span = v.max() - v.min()
    scaled.append((v - v.min()) / span if span > 0 else np.zeros_like(v))
  x = np.concatenate(scaled)[:, None]
  gmm = GaussianMixture(n_components=2, max_iter=100, tol=1e-2, reg_covar=5e-4,
                        random_state=seed).fit(x)
  clean = int(np.argmin(gmm.means_[:, 0]))
  prob = gmm.predict_proba(x)[:, clean].astype(np.float32)
  return np.split(prob, np.cumsum([len(s) for s in scaled])[:-1])
