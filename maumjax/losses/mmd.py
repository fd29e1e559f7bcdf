"""MMM's Inter term: a 5-kernel Gaussian MMD^2 between two equal-sized sets (mmm.md §7.5).

The transfer-learning MMD of the released code (DAN style): stack x and y (n = 2b rows), take
the squared L2 distances d2, a base bandwidth sum(d2) / (n^2 - n) under stop-gradient divided
by 2^floor(5 / 2) = 4, the kernel K = sum_{k=0..4} exp(-d2 / (bw 2^k)), and

    MMD^2 = mean(K_xx + K_yy - K_xy - K_yx)       (the four b x b blocks, elementwise)

The caller stops the gradient of the target (MMM: D(x_rgb, sg x_ir) + D(x_ir, sg x_rgb)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KERNEL_MUL = 2.0
KERNEL_NUM = 5


def mmd_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """MMD^2 of two sets of b samples each with the 5-kernel Gaussian mixture (module docstring).

  Args:
    x: [b, D].
    y: [b, D], the same b (the code's blocks are 4 x 4).

  Returns:
    Scalar float32.
  """
  if x.ndim != 2 or x.shape != y.shape:
    raise ValueError(f"x and y must both be [b, D] with the same b; got {x.shape} and {y.shape}")
  b = x.shape[0]
  z = jnp.concatenate([x, y]).astype(jnp.float32)
  n = 2 * b
  sq = jnp.sum(jnp.square(z[:, None, :] - z[None, :, :]), axis=-1)  # [n, n]
  bandwidth = jax.lax.stop_gradient(jnp.sum(sq) / (n * n - n))
  bandwidth = bandwidth / (KERNEL_MUL ** (KERNEL_NUM // 2))
  kernel = sum(jnp.exp(-sq / (bandwidth * KERNEL_MUL ** k)) for k in range(KERNEL_NUM))
  xx, yy = kernel[:b, :b], kernel[b:, b:]
  xy, yx = kernel[:b, b:], kernel[b:, :b]
  return jnp.mean(xx + yy - xy - yx)
