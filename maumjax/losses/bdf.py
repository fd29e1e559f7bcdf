"""The Base-Derivative Framework's losses (ICPR 2020), reconstructed from their names (bdf.md §4,
all [I]): DID over the four modalities, MML inside each mode and base-own-derivative, MDL over
the eight heterogeneous directions.

Batch layout (static): [V; I; V^; I^], four blocks of n = P x K rows with the same labels in
each block (`GROUP_NAMES`, group ids 0..3). Each loss is a sum of terms divided by its number
of terms, so switching a term off keeps the scale (bdf.md §4, "Total").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maumjax.losses.identity import softmax_cross_entropy
from maumjax.losses.triplet import (
  cross_modal_center_triplet_per_pair,
  cross_modal_triplet_per_pair,
)

GROUP_NAMES = ("V", "I", "V^", "I^")  # group ids 0, 1, 2, 3 of the [V; I; V^; I^] blocks
# MML: Tri(f_m; f_m) for every mode, plus the homologous pairs V -> V^ and I -> I^.
MML_PAIRS = ((0, 0), (1, 1), (2, 2), (3, 3), (0, 2), (1, 3))
# MDL: the 8 ordered heterogeneous directions (no mode with itself or its own derivative).
MDL_PAIRS = ((0, 1), (1, 0), (2, 1), (1, 2), (0, 3), (3, 0), (2, 3), (3, 2))
DID_MODES = ("ce", "ce_plus_consistency")
# The triplet's form in MML / MDL (bdf.md §7 row 3): over single images (default) or over
# identity centres. (BDTR's bi-directional top-ranking loss is the batch-hard form per
# direction, so it is the default.)
FAMILIES = {"batch_hard": cross_modal_triplet_per_pair,
            "center": cross_modal_center_triplet_per_pair}


def block_groups(n: int) -> jax.Array:
  """[4n] int32 group id of each row of the [V; I; V^; I^] batch."""
  return jnp.repeat(jnp.arange(4, dtype=jnp.int32), n)


def _check_layout(rows: int, labels: jax.Array, what: str) -> int:
  if rows % 4 or labels.shape != (rows,):
    raise ValueError(f"{what}: expected the [V; I; V^; I^] layout, 4n rows with labels [4n]; "
                     f"got {rows} rows and labels {labels.shape}")
  return rows // 4


def did_loss(logits: jax.Array, labels: jax.Array, *, mode: str = "ce",
             label_smoothing: float = 0.0) -> jax.Array:
  """DID: identity cross-entropy over the four modalities, the mean of the four modality means.

      L_DID = 1/4 sum_{m in V, I, V^, I^} mean_i CE(softmax(logits_{m,i}), y_i)

  With `mode='ce_plus_consistency'` the symmetric base-derivative posterior consistency is
  added (weight 1, the mean of the two bases' terms):
  KL(p(x) || sg p(x^)) + KL(p(x^) || sg p(x)), mean over rows, for x in V and in I.

  Args:
    logits: [4n, C] float, the [V; I; V^; I^] rows.
    labels: [4n] int.
    mode: a key of `DID_MODES` ('ce' default).
    label_smoothing: epsilon of the CE (0 default; 0.1 optional, bdf.md §4).

  Returns:
    Scalar float32.
  """
  if mode not in DID_MODES:
    raise ValueError(f"unknown DID mode {mode!r}; use one of {DID_MODES}")
  n = _check_layout(logits.shape[0], labels, "did_loss")
  logits = logits.astype(jnp.float32)
  ce = softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing)
  loss = jnp.mean(ce.reshape(4, n).mean(axis=1))
  if mode == "ce":
    return loss
  logp = jax.nn.log_softmax(logits).reshape(4, n, -1)

  def kl(lp, lq):  # KL(p || sg q), mean over rows
    lq = jax.lax.stop_gradient(lq)
    return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))

  consistency = [kl(logp[b], logp[b + 2]) + kl(logp[b + 2], logp[b]) for b in (0, 1)]
  return loss + (consistency[0] + consistency[1]) / 2


def _check_pairs(pairs) -> None:
  if not pairs:
    raise ValueError("pairs is empty: give at least one (anchor group, target group)")


def mml_loss(feats: jax.Array, labels: jax.Array, *, margin: float = 0.3,
             pairs: tuple[tuple[int, int], ...] = MML_PAIRS) -> jax.Array:
  """MML: batch-hard triplet inside each mode and base -> own derivative, mean over `pairs`
  (feats [4n, D] pre-BN features of [V; I; V^; I^], labels [4n]; `mml_mdl_losses`' first
  half). Returns a float32 scalar."""
  _check_pairs(pairs)
  return mml_mdl_losses(feats, labels, margin=margin, mml_pairs=pairs, mdl_pairs=())[0]


def mdl_loss(feats: jax.Array, labels: jax.Array, *, margin: float = 0.3,
             pairs: tuple[tuple[int, int], ...] = MDL_PAIRS) -> jax.Array:
  """MDL: batch-hard triplet over the heterogeneous directions (default the eight of
  `MDL_PAIRS`), mean over `pairs`; as `mml_loss`, `mml_mdl_losses`' second half."""
  _check_pairs(pairs)
  return mml_mdl_losses(feats, labels, margin=margin, mml_pairs=(), mdl_pairs=pairs)[1]


def mml_mdl_losses(feats: jax.Array, labels: jax.Array, *, margin: float = 0.3,
                   mml_pairs: tuple[tuple[int, int], ...] = MML_PAIRS,
                   mdl_pairs: tuple[tuple[int, int], ...] = MDL_PAIRS,
                   groups: jax.Array | None = None,
                   family: str = "batch_hard") -> tuple[jax.Array, jax.Array]:
  """MML and MDL from ONE distance matrix over the batch (bdf.md §8): equal to
  `(mml_loss(feats, labels, pairs=mml_pairs), mdl_loss(feats, labels, pairs=mdl_pairs))`.

  Args:
    feats: [4n, D] pre-BN features, [V; I; V^; I^] (or any layout with `groups`).
    labels: [4n] int.
    margin: triplet margin (0.3).
    mml_pairs, mdl_pairs: the directions of each loss; an empty tuple gives 0 for that loss.
    groups: [N] group ids; default `block_groups(N // 4)`.
    family: 'batch_hard' (single images, default) or 'center' (identity centres,
      `cross_modal_center_triplet_per_pair`), a key of `FAMILIES`.

  Returns:
    (mml, mdl), scalars float32, each the mean over its directions.
  """
  if family not in FAMILIES:
    raise ValueError(f"unknown triplet family {family!r}; use one of {tuple(FAMILIES)}")
  if groups is None:
    groups = block_groups(_check_layout(feats.shape[0], labels, "mml_mdl_losses"))
  pairs = tuple(mml_pairs) + tuple(mdl_pairs)
  if not pairs:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero
  per_pair = FAMILIES[family](feats, labels, groups, pairs=pairs, margin=margin)
  k = len(mml_pairs)
  mean = lambda x: jnp.mean(x) if x.shape[0] else jnp.zeros((), jnp.float32)  # noqa: E731
  return mean(per_pair[:k]), mean(per_pair[k:])
