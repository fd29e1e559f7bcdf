"""MPANet's pattern-separation loss on the PAM maps (spec `mpanet.md` §4.3).

Source: MPANet (Wu et al., CVPR 2021), Eq. 7, as coded in the released `models/baseline.py`;
the spec records no difference between paper and code. The maps are channels-last here
(`[B, H, W, l]`); the code's are `[B, l, H, W]`, which gives the same value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pattern_separation_loss(maps: jax.Array) -> jax.Array:
  """Mean off-diagonal overlap of the l pattern maps of each sample.

  Each sample's maps are flattened to M_b ∈ R^{l×HW} and G_b = M_b M_bᵀ (l×l):

    L_sep = Σ_b Σ_{i<j} (G_b)_ij / (B · l(l−1)/2)

  i.e. the mean over samples and unordered pairs of distinct maps of their inner product over
  the H·W positions (the diagonal, each map with itself, is left out). MPANet weights it by
  λ1 = 0.5 in the total loss (not applied here).

  Computed in at least float32 (engineering default), the Gram matrices at HIGHEST precision.

  Args:
    maps: [B, H, W, l] pattern maps after the sigmoid, l >= 2.

  Returns:
    Scalar loss.

  Raises:
    ValueError: `maps` not 4-D, or fewer than two maps.
  """
  if maps.ndim != 4 or maps.shape[-1] < 2:
    raise ValueError(
      f"maps must be [B, H, W, l] with l >= 2 pattern maps, got shape {maps.shape}."
    )
  b, h, w, n_maps = maps.shape
  flat = maps.astype(jnp.promote_types(maps.dtype, jnp.float32)).reshape(b, h * w, n_maps)
  gram = jnp.einsum("bpi,bpj->bij", flat, flat, precision=jax.lax.Precision.HIGHEST)
  upper = jnp.triu(jnp.ones((n_maps, n_maps), dtype=bool), k=1)
  total = jnp.sum(jnp.where(upper, gram, 0.0))
  return total / (b * n_maps * (n_maps - 1) / 2)
