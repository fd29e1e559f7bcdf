"""MMM's ClusterNCE loss against a cluster memory (mmm.md §5.4, the cluster-contrast family).

    L_NCE = mean_i CE( normalise(x_i) . M^T / tau, y_i ),   tau = 0.05

x are the raw BN-neck features (normalised here, as the code does); M [C, D] holds unit-norm
cluster centres and is not differentiated (the memory is state, not a parameter). The memory
has a fixed number of rows so that the step compiles once (pad with zero rows up to a maximum
cluster count): an all-zero row is not a class, its logit is masked out of the softmax.
The update of the memory after the step is `maumjax.memory.update_cluster_memory`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maumjax.losses.metric import l2_normalize


def cluster_nce_loss(feats: jax.Array, labels: jax.Array, memory: jax.Array, *,
                     temperature: float = 0.05) -> jax.Array:
  """ClusterNCE: the mean cross-entropy of the normalised features against the memory.

  Args:
    feats: [B, D] raw BN-neck features (L2-normalised inside).
    labels: [B] int cluster ids in [0, C); rows with label -1 (outliers) are left out of the
      mean.
    memory: [C, D] unit-norm cluster centres; all-zero rows are padding (not classes). Under
      stop-gradient.
    temperature: tau (0.05).

  Returns:
    Scalar float32 (0 when no row has a label).
  """
  if feats.ndim != 2 or labels.shape != feats.shape[:1] or memory.ndim != 2 or (
      memory.shape[1] != feats.shape[1]):
    raise ValueError(f"feats [B, D], labels [B] and memory [C, D] expected; got {feats.shape}, "
                     f"{labels.shape} and {memory.shape}")
  x = l2_normalize(feats.astype(jnp.float32), axis=-1)
  mem = jax.lax.stop_gradient(memory.astype(jnp.float32))
  logits = jnp.matmul(x, mem.T, precision=jax.lax.Precision.HIGHEST) / temperature
  present = jnp.any(mem != 0, axis=1)
  logits = jnp.where(present[None, :], logits, -jnp.inf)
  valid = labels >= 0
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[:, None], axis=1)[:, 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
