"""Identity (classification) loss: softmax cross-entropy with optional label smoothing.

Engineering default, not part of MAUM's own loss (the shared classifier is off by default, spec
`maum.md` §5.5). Smoothing follows AGW / Szegedy et al. (CVPR 2016): the target is
(1 − ε)·onehot(y) + ε/C, the uniform part spread over all C classes, the true one included.
The arithmetic is optax's (`smooth_labels` + `softmax_cross_entropy`); this function adds the
integer-label interface, float32 promotion and argument checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  *,
  label_smoothing: float = 0.0,
) -> jax.Array:
  """Per-example softmax cross-entropy against integer labels.

    ℓ_n = −Σ_c q_nc log softmax(z_n)_c,   q_n = (1 − ε)·onehot(y_n) + ε/C

  Args:
    logits: [N, C] unnormalised scores.
    labels: [N] int class ids in [0, C).
    label_smoothing: ε in [0, 1).

  Returns:
    [N] losses, in at least float32.

  Raises:
    ValueError: ε outside [0, 1) or mismatched shapes.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}; AGW uses 0.1.")
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"logits must be [N, C] and labels [N]; got {logits.shape}, {labels.shape}.")
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if label_smoothing == 0.0:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)
