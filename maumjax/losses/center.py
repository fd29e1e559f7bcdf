"""MPANet's center-cluster loss on the pre-BN features (spec `mpanet.md` §4.2).

Source: MPANet (Wu et al., CVPR 2021), Eq. 13, and the released code's
`layers/loss/local_center_loss.py`; paper and code agree. Both modalities of an identity share
one centre. Shapes are static under jit whatever the labels: every sample gets the centre of its
label through a B×B same-label matrix, and each identity is represented once by the first
sample that carries it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SQ_EPS = 1e-12  # the code's clamp(min=1e-12) on squared centre distances
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes: distances of 14,336-d features


def _safe_norm(x: jax.Array) -> jax.Array:
  """‖x‖₂ over the last axis with gradient 0 (not NaN) where x = 0."""
  sq = jnp.sum(jnp.square(x), axis=-1)
  nonzero = sq > 0.0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _clamped_distances(x: jax.Array) -> jax.Array:
  """[N, D] -> [N, N] sqrt(max(‖x_i − x_j‖², 1e-12)), finite gradient (0 below the clamp)."""
  sq_norm = jnp.sum(jnp.square(x), axis=-1)
  sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * jnp.matmul(x, x.T, precision=_HIGHEST)
  above = sq > _SQ_EPS
  return jnp.where(above, jnp.sqrt(jnp.where(above, sq, 1.0)), jnp.sqrt(_SQ_EPS))


def center_cluster_loss(
  feats: jax.Array,
  labels: jax.Array,
  *,
  margin: float = 0.7,
) -> jax.Array:
  """Center-cluster loss L_cc = pull + push over the batch identities.

    h_c  = mean of f_i over the batch samples with y_i = c      (both modalities pooled)
    pull = (1/B) Σ_i ‖f_i − h_{y_i}‖₂                           (Euclidean, not squared)
    push = 1/(P(P−1)) Σ_{c ≠ c'} [ρ − ‖h_c − h_{c'}‖₂]_+         (ordered pairs of batch ids)

  with P the number of distinct labels in the batch and ρ = `margin`. Centre distances are
  sqrt(max(‖·‖², 1e-12)) as in the code; a batch with one identity has push = 0.

  Paper versus code: they agree (spec §4.2). The code takes one anchor per K-block and
  averages the hinge over all negative *samples*; every other centre then appears K times, so
  with equal counts per identity (the sampler's batches) that is the uniform average over
  ordered pairs of centres computed here. With unequal counts this function keeps the pairwise
  form, each ordered pair of identities weighted once (engineering default).

  Numerics (engineering defaults): computed in at least float32 (bfloat16/float16 inputs are
  upcast, float64 is kept); matmuls at HIGHEST precision, and the features are shifted by the
  batch mean first (the loss is translation invariant) to limit cancellation in the centre sums
  and the squared-norm expansion of centre distances on large unnormalised features. The pull
  norm has gradient 0 at zero distance (a singleton identity, whose feature is its centre).

  Args:
    feats: [B, D] pre-BN features.
    labels: [B] int identity ids; any values, in any order.
    margin: ρ (MPANet: 0.7).

  Returns:
    Scalar loss.

  Raises:
    ValueError: bad shapes.
  """
  feats, labels = jnp.asarray(feats), jnp.asarray(labels)
  if feats.ndim != 2 or labels.shape != feats.shape[:1]:
    raise ValueError(
      f"feats must be [B, D] and labels [B]; got {feats.shape} and {labels.shape}."
    )
  feats = feats.astype(jnp.promote_types(feats.dtype, jnp.float32))
  # Everything below is translation invariant: work relative to the batch mean.
  feats = feats - jnp.mean(feats, axis=0, keepdims=True)
  same = labels[:, None] == labels[None, :]  # [B, B], diagonal True
  weights = same.astype(feats.dtype)
  centres = jnp.matmul(weights, feats, precision=_HIGHEST) / jnp.sum(weights, axis=1)[:, None]
  pull = jnp.mean(_safe_norm(feats - centres))

  # A sample represents its identity if no earlier sample has the same label.
  idx = jnp.arange(labels.shape[0])
  first = ~jnp.any(same & (idx[None, :] < idx[:, None]), axis=1)
  pairs = first[:, None] & first[None, :] & ~same  # each ordered pair of distinct ids once
  hinge = jax.nn.relu(margin - _clamped_distances(centres))
  n_pairs = jnp.sum(pairs)
  push = jnp.sum(jnp.where(pairs, hinge, 0.0)) / jnp.maximum(n_pairs, 1).astype(feats.dtype)
  return pull + push
