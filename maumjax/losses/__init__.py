"""Loss functions: pure, typed with jax.Array, keyword-only hyperparameters.

Modules:
  metric    base metrics: Circle loss and normalised softmax, per row and against proxies.
  proxy     the MAUM terms built on them (shared, MS-proxy, unidirectional with memory).
  triplet   AGW batch-hard triplet loss; its directional form over groups (BDF's MML / MDL).
  identity  label-smoothed softmax cross-entropy.
  center    MPANet's center-cluster loss (pull to identity centres, push centres apart).
  pattern   MPANet's pattern-separation loss on the PAM maps.
  distill   MPANet's mutual mean learning KL (student against a stop-gradient teacher).
  cluster_nce  MMM's ClusterNCE against a cluster memory.
  mmd       MMM's 5-kernel Gaussian MMD (the Inter term's distance).
  sca       MMM's soft cluster-level alignment: Intra (self-mimic) and Inter (per-identity MMD).
  bdf       BDF's DID, MML and MDL over the [V; I; V^; I^] batch.
"""

from maumjax.losses.bdf import (
  DID_MODES,
  FAMILIES,
  MDL_PAIRS,
  MML_PAIRS,
  did_loss,
  mdl_loss,
  mml_loss,
  mml_mdl_losses,
)
from maumjax.losses.center import center_cluster_loss
from maumjax.losses.cluster_nce import cluster_nce_loss
from maumjax.losses.distill import KL_DIRECTIONS, mutual_mean_kl
from maumjax.losses.identity import softmax_cross_entropy
from maumjax.losses.metric import (
  METRICS,
  circle_loss,
  head_proxy_metric,
  l2_normalize,
  norm_softmax_loss,
  proxy_metric,
)
from maumjax.losses.mmd import mmd_loss
from maumjax.losses.pattern import pattern_separation_loss
from maumjax.losses.sca import INTER_NORMS, INTRA_FORMS, inter_modality_mmd, self_mimic_loss
from maumjax.losses.proxy import (
  memory_refs,
  ms_proxy_loss,
  shared_proxy_loss,
  unidirectional_loss,
)
from maumjax.losses.triplet import (
  DISTANCES,
  batch_hard_triplet,
  batch_hard_triplet_per_anchor,
  batch_hard_triplet_with_stats,
  cosine_distances,
  cross_modal_center_triplet_per_pair,
  cross_modal_triplet,
  cross_modal_triplet_per_pair,
  euclidean_distances,
  hardest_pairs,
)

__all__ = [
  "DID_MODES",
  "DISTANCES",
  "FAMILIES",
  "KL_DIRECTIONS",
  "MDL_PAIRS",
  "METRICS",
  "MML_PAIRS",
  "mml_mdl_losses",
  "batch_hard_triplet",
  "cluster_nce_loss",
  "batch_hard_triplet_per_anchor",
  "batch_hard_triplet_with_stats",
  "center_cluster_loss",
  "circle_loss",
  "cosine_distances",
  "cross_modal_center_triplet_per_pair",
  "cross_modal_triplet",
  "cross_modal_triplet_per_pair",
  "did_loss",
  "euclidean_distances",
  "hardest_pairs",
  "head_proxy_metric",
  "l2_normalize",
  "mmd_loss",
  "self_mimic_loss",
  "inter_modality_mmd",
  "INTER_NORMS",
  "INTRA_FORMS",
  "mdl_loss",
  "memory_refs",
  "mml_loss",
  "ms_proxy_loss",
  "mutual_mean_kl",
  "norm_softmax_loss",
  "pattern_separation_loss",
  "proxy_metric",
  "shared_proxy_loss",
  "softmax_cross_entropy",
  "unidirectional_loss",
]
