"""Loss functions: pure, typed with jax.Array, keyword-only hyperparameters.

Modules:
  proxy     Circle / normalised-softmax proxy metrics and the MAUM terms (shared, MS, uni).
  triplet   AGW batch-hard triplet loss.
  identity  label-smoothed softmax cross-entropy.
"""

from maumjax.losses.identity import softmax_cross_entropy
from maumjax.losses.proxy import (
  METRICS,
  circle_loss,
  head_proxy_metric,
  l2_normalize,
  memory_refs,
  ms_proxy_loss,
  norm_softmax_loss,
  proxy_metric,
  shared_proxy_loss,
  unidirectional_loss,
)
from maumjax.losses.triplet import (
  DISTANCES,
  batch_hard_triplet,
  batch_hard_triplet_per_anchor,
  batch_hard_triplet_with_stats,
  cosine_distances,
  euclidean_distances,
  hardest_pairs,
)

__all__ = [
  "DISTANCES",
  "METRICS",
  "batch_hard_triplet",
  "batch_hard_triplet_per_anchor",
  "batch_hard_triplet_with_stats",
  "circle_loss",
  "cosine_distances",
  "euclidean_distances",
  "hardest_pairs",
  "head_proxy_metric",
  "l2_normalize",
  "memory_refs",
  "ms_proxy_loss",
  "norm_softmax_loss",
  "proxy_metric",
  "shared_proxy_loss",
  "softmax_cross_entropy",
  "unidirectional_loss",
]
