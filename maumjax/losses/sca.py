"""MMM's soft cluster-level alignment terms (mmm.md §7.5): Intra (self-mimic to
confidence-weighted prototypes) and Inter (MMD between the modalities of each pseudo-identity).

Both take the pre-BN GeM features x of one step's streams and stop the gradient of what they
pull towards (prototypes, the other modality). The method composes them as the code does:

    L_intra = 0.5 * ( 1/2 [self_mimic(x1, P1) + self_mimic(x2, P2)] + self_mimic(xI, Q) )
    L_inter = 0.05 * inter_modality_mmd([x1, x2], xI, num_ids=P)

(weights `sm_w` 0.5 and `md_w` 0.05 outside these functions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maumjax.losses.mmd import mmd_loss

INTRA_FORMS = ("l1_weighted", "l2sq")
INTER_NORMS = ("code", "paper")


def self_mimic_loss(feats: jax.Array, labels: jax.Array, prototypes: jax.Array,
                    weights: jax.Array, *, form: str = "l1_weighted") -> jax.Array:
  """Intra for one stream: the pull of each feature towards its label's prototype.

  'l1_weighted' (the code): mean_i w_i * mean_d |x_i - sg P[y_i]| (PyTorch's L1Loss, a mean
  over the D dimensions). 'l2sq' (the paper): mean_i sum_d (x_i - sg P[y_i])^2, unweighted.

  Args:
    feats: [B, D] pre-BN features of the stream.
    labels: [B] int pseudo-labels in [0, C).
    prototypes: [C, D] the stream's prototypes (zeros before the first prototype pass).
    weights: [B] the samples' clean probabilities (ignored by 'l2sq').
    form: a key of `INTRA_FORMS`.

  Returns:
    Scalar float32.
  """
  if form not in INTRA_FORMS:
    raise ValueError(f"intra form {form!r}; use one of {INTRA_FORMS}")
  target = jax.lax.stop_gradient(prototypes.astype(jnp.float32))[labels]
  diff = feats.astype(jnp.float32) - target
  if form == "l2sq":
    return jnp.mean(jnp.sum(jnp.square(diff), axis=-1))
  return jnp.mean(jnp.mean(jnp.abs(diff), axis=-1) * weights.astype(jnp.float32))


def inter_modality_mmd(visible_views: list[jax.Array] | tuple[jax.Array, ...],
                       infrared: jax.Array, *, num_ids: int, norm: str = "code") -> jax.Array:
  """Inter: MMD between the visible and infrared samples of each pseudo-identity of the step.

  The streams are identity-major (the identity sampler's layout): rows [c K, (c + 1) K) of
  every stream belong to the step's c-th pseudo-identity, K = rows / num_ids. Per identity c
  and visible view v: 'code' adds D(v_c, sg r_c) + D(r_c, sg v_c) over the views, sums over
  the identities and divides by their number (two views: four terms, about 4 x the paper's
  value); 'paper' takes 1/2 [D(v_c, sg r_c) + D(r_c, sg v_c)], averaged over the views and
  the identities. D is `mmd_loss`.

  Args:
    visible_views: the visible streams, each [num_ids * K, D].
    infrared: [num_ids * K, D].
    num_ids: pseudo-identities in the step (P).
    norm: a key of `INTER_NORMS`.

  Returns:
    Scalar float32.
  """
  if norm not in INTER_NORMS:
    raise ValueError(f"inter norm {norm!r}; use one of {INTER_NORMS}")
  rows = infrared.shape[0]
  if rows % num_ids or any(v.shape != infrared.shape for v in visible_views):
    raise ValueError(f"every stream must be [num_ids * K, D] with num_ids={num_ids}; got "
                     f"{[v.shape for v in visible_views]} and {infrared.shape}")
  k = rows // num_ids
  group = lambda x: x.reshape(num_ids, k, x.shape[-1])  # noqa: E731
  r = group(infrared)
  sg = jax.lax.stop_gradient
  per_view = []
  for view in visible_views:
    v = group(view)
    pair = jax.vmap(lambda a, b: mmd_loss(a, sg(b)) + mmd_loss(b, sg(a)))(v, r)  # [num_ids]
    per_view.append(jnp.mean(pair))
  total = sum(per_view)
  return total if norm == "code" else total / (2.0 * len(per_view))
