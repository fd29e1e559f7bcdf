"""Batch-hard triplet loss with hard-example mining by masked max/min (no sort).

Matches AGW's `TripletLoss` (mangye16/Cross-Modal-Re-ID-baseline, `loss.py`): Euclidean
distances `sqrt(clamp(‖x‖² + ‖y‖² − 2x·y, min=1e-12))`, for each anchor the farthest positive
(same label, the anchor itself included) and the nearest negative, and
`MarginRankingLoss(d_an, d_ap, 1)` = mean relu(d_ap − d_an + margin). Used on the pre-BN features
of the joint [RGB; IR] batch (MAUM, CVPR 2022, §5.5 of our spec; the loss itself is an
engineering default taken from AGW).

Edge cases (engineering defaults): an anchor with no negative in the batch has loss 0 and counts
as correct; a singleton anchor's hardest positive is itself (distance about 1e-6, as in AGW).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from maumjax.losses.metric import l2_normalize

_SQ_EPS = 1e-12  # AGW's clamp(min=1e-12) on squared distances


def _safe_sqrt(sq: jax.Array) -> jax.Array:
  """sqrt(max(sq, 1e-12)) with a finite gradient everywhere (zero below the clamp)."""
  above = sq > _SQ_EPS
  return jnp.where(above, jnp.sqrt(jnp.where(above, sq, 1.0)), jnp.sqrt(_SQ_EPS))


def euclidean_distances(feats: jax.Array) -> jax.Array:
  """[N, D] -> [N, N] Euclidean distances, AGW's expansion with the 1e-12 clamp."""
  sq_norm = jnp.sum(jnp.square(feats), axis=-1)
  sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * feats @ feats.T
  return _safe_sqrt(sq)


def cosine_distances(feats: jax.Array) -> jax.Array:
  """[N, N] 1 − cosine similarity. Engineering default (an alternative to AGW's Euclidean)."""
  unit = l2_normalize(feats)
  return 1.0 - unit @ unit.T


DISTANCES: dict[str, Callable[[jax.Array], jax.Array]] = {
  "euclidean": euclidean_distances,
  "cosine": cosine_distances,
}


def _distance_fn(metric: str) -> Callable[[jax.Array], jax.Array]:
  """The `DISTANCES` entry of `metric`; ValueError naming the valid ones otherwise."""
  if metric not in DISTANCES:
    raise ValueError(f"Unknown triplet metric {metric!r}; valid names: {sorted(DISTANCES)}.")
  return DISTANCES[metric]


def hardest_pairs(dist: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Farthest positive and nearest negative distance of every anchor.

  Args:
    dist: [N, N] pairwise distances.
    labels: [N] int class ids.

  Returns:
    (d_ap, d_an), each [N]. d_an is the dtype's largest finite value for an anchor with no
    negative.
  """
  same = labels[:, None] == labels[None, :]  # includes the diagonal: at least one positive
  big = jnp.finfo(dist.dtype).max
  d_ap = jnp.max(jnp.where(same, dist, -big), axis=1)
  d_an = jnp.min(jnp.where(same, big, dist), axis=1)
  return d_ap, d_an


def batch_hard_triplet_per_anchor(
  feats: jax.Array,
  labels: jax.Array,
  *,
  margin: float = 0.3,
  metric: str = "euclidean",
) -> tuple[jax.Array, jax.Array]:
  """Per-anchor batch-hard triplet loss and correctness.

  Args:
    feats: [N, D] features.
    labels: [N] int class ids.
    margin: triplet margin.
    metric: a key of `DISTANCES`.

  Returns:
    (loss [N] = relu(d_ap − d_an + margin), correct [N] bool = d_an >= d_ap as AGW's torch.ge).

  Raises:
    ValueError: unknown metric or bad shapes.
  """
  distances = _distance_fn(metric)
  if feats.ndim != 2 or labels.shape != feats.shape[:1]:
    raise ValueError(
      f"feats must be [N, D] and labels [N]; got {feats.shape} and {labels.shape}. Flatten "
      "part features to [N, P*D] first (tri_on='concat')."
    )
  feats = feats.astype(jnp.promote_types(feats.dtype, jnp.float32))
  d_ap, d_an = hardest_pairs(distances(feats), labels)
  return jax.nn.relu(d_ap - d_an + margin), d_an >= d_ap


def batch_hard_triplet_with_stats(
  feats: jax.Array,
  labels: jax.Array,
  *,
  margin: float = 0.3,
  metric: str = "euclidean",
) -> tuple[jax.Array, jax.Array]:
  """Batch-hard triplet loss and AGW's precision statistic.

  Args:
    feats: [N, D] features.
    labels: [N] int class ids.
    margin: triplet margin (AGW: 0.3).
    metric: 'euclidean' (AGW) or 'cosine'.

  Returns:
    (loss, precision): scalars; precision is the fraction of anchors with d_an >= d_ap.
  """
  loss, correct = batch_hard_triplet_per_anchor(feats, labels, margin=margin, metric=metric)
  return jnp.mean(loss), jnp.mean(correct.astype(loss.dtype))


def batch_hard_triplet(
  feats: jax.Array,
  labels: jax.Array,
  *,
  margin: float = 0.3,
  metric: str = "euclidean",
) -> jax.Array:
  """Batch-hard triplet loss, mean over anchors (AGW `TripletLoss`).

  Args:
    feats: [N, D] features.
    labels: [N] int class ids.
    margin: triplet margin (AGW: 0.3).
    metric: 'euclidean' (AGW) or 'cosine'.

  Returns:
    Scalar loss.
  """
  return batch_hard_triplet_with_stats(feats, labels, margin=margin, metric=metric)[0]


def _check_grouped(feats: jax.Array, labels: jax.Array, groups: jax.Array) -> None:
  if feats.ndim != 2 or labels.shape != feats.shape[:1] or groups.shape != feats.shape[:1]:
    raise ValueError(f"feats must be [N, D], labels and groups [N]; got {feats.shape}, "
                     f"{labels.shape} and {groups.shape}")


def cross_modal_triplet_per_pair(
  feats: jax.Array,
  labels: jax.Array,
  groups: jax.Array,
  *,
  pairs: tuple[tuple[int, int], ...],
  margin: float = 0.3,
  metric: str = "euclidean",
) -> jax.Array:
  """Batch-hard triplet loss of each (anchor group -> target group) direction, from ONE
  distance matrix over the whole batch.

  For direction (a, b), every anchor i with groups[i] == a takes its hardest positive (the
  farthest j with groups[j] == b and labels[j] == labels[i]) and hardest negative (the nearest
  j with groups[j] == b and another label): loss_i = relu(d_ap - d_an + margin), as AGW's
  triplet restricted to the two groups. The direction's loss is the mean over its anchors that
  have a positive in b (an anchor without one is left out; one without a negative has loss 0).
  With a == b the anchor itself is among its positives (distance ~1e-6, as AGW).

  Args:
    feats: [N, D] features (e.g. the [V; I; V^; I^] batch of BDF, or [RGB; IR]).
    labels: [N] int identity labels (shared across groups).
    groups: [N] int group (modality) of each row.
    pairs: the directions, static (anchor group, target group) tuples.
    margin: triplet margin (AGW: 0.3).
    metric: a key of `DISTANCES`.

  Returns:
    [len(pairs)] float32, one loss per direction (0 for a direction with no anchor).

  References: bdf.md §4 (Tri(A; B)) and §8 (one matrix, block masks); AGW `TripletLoss`.
  """
  distances = _distance_fn(metric)
  _check_grouped(feats, labels, groups)
  if not pairs:
    raise ValueError("pairs is empty: give at least one (anchor group, target group)")
  feats = feats.astype(jnp.promote_types(feats.dtype, jnp.float32))
  dist = distances(feats)  # [N, N]
  big = jnp.finfo(dist.dtype).max
  anchor_g = jnp.asarray([a for a, _ in pairs])[:, None]  # [P, 1]
  target_g = jnp.asarray([b for _, b in pairs])[:, None]
  is_anchor = groups[None, :] == anchor_g  # [P, N]
  is_target = groups[None, :] == target_g  # [P, N]
  same = labels[:, None] == labels[None, :]  # [N, N]
  pos = is_target[:, None, :] & same[None]  # [P, N, N]: j a positive of anchor i in b
  neg = is_target[:, None, :] & ~same[None]
  d_ap = jnp.max(jnp.where(pos, dist[None], -big), axis=2)  # [P, N]
  d_an = jnp.min(jnp.where(neg, dist[None], big), axis=2)
  has_pos = is_anchor & jnp.any(pos, axis=2)
  loss = jnp.where(has_pos, jax.nn.relu(d_ap - jnp.minimum(d_an, big / 2) + margin), 0.0)
  count = jnp.sum(has_pos, axis=1)
  return jnp.sum(loss, axis=1) / jnp.maximum(count, 1)


def cross_modal_triplet(feats: jax.Array, labels: jax.Array, groups: jax.Array, *,
                        pairs: tuple[tuple[int, int], ...], margin: float = 0.3,
                        metric: str = "euclidean") -> jax.Array:
  """The mean over `pairs` of `cross_modal_triplet_per_pair`: a sum of directional triplet
  terms normalised by their number (bdf.md §4), so switching a direction off keeps the scale.

  Returns:
    Scalar loss.
  """
  return jnp.mean(cross_modal_triplet_per_pair(feats, labels, groups, pairs=pairs,
                                               margin=margin, metric=metric))


def cross_modal_center_triplet_per_pair(feats: jax.Array, labels: jax.Array, groups: jax.Array,
                                        *, pairs: tuple[tuple[int, int], ...],
                                        margin: float = 0.3,
                                        metric: str = "euclidean") -> jax.Array:
  """The center-based form of `cross_modal_triplet_per_pair`: the batch-hard triplet of each
  direction over identity centres instead of single images (the hetero-center triplet's idea,
  Liu et al. 2020, bdf.md §7 row 3's alternative).

  c_g(k) is the mean feature of identity k's rows in group g. For direction (a, b), each
  identity k present in both groups is an anchor: relu(d(c_a(k), c_b(k)) - min_{j != k}
  d(c_a(k), c_b(j)) + margin), the minimum over identities present in b. The direction's loss
  is the mean over its anchors, each identity weighted by its number of rows in the batch (equal
  weights under P x K sampling). Computed as `cross_modal_triplet_per_pair` on the stacked
  centres, so again from one distance matrix.

  Args and returns: as `cross_modal_triplet_per_pair`; `groups` values must be the group ids
  used in `pairs` (other rows are ignored).
  """
  _check_grouped(feats, labels, groups)
  feats = feats.astype(jnp.promote_types(feats.dtype, jnp.float32))
  used = sorted({g for pair in pairs for g in pair})
  same = labels[:, None] == labels[None, :]  # [N, N]
  centres, centre_groups = [], []
  for g in used:
    member = (same & (groups[None, :] == g)).astype(feats.dtype)  # [N, N]: row i's identity in g
    count = jnp.sum(member, axis=1, keepdims=True)
    centres.append((member @ feats) / jnp.maximum(count, 1.0))
    # A row whose identity has no image in g has no centre there: it takes part in nothing.
    centre_groups.append(jnp.where(count[:, 0] > 0, g, -1))
  n_used = len(used)
  return cross_modal_triplet_per_pair(
      jnp.concatenate(centres), jnp.tile(labels, n_used), jnp.concatenate(centre_groups),
      pairs=pairs, margin=margin, metric=metric)
