"""Label-smoothed softmax cross-entropy against NumPy and optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from maumjax import losses

_ce = jax.jit(losses.softmax_cross_entropy, static_argnames=("label_smoothing",))


def _np_ce(logits, labels, eps):
  logits = np.asarray(logits, np.float64)
  out = []
  for z, y in zip(logits, labels):
    log_p = z - z.max() - np.log(np.exp(z - z.max()).sum())
    q = np.full(len(z), eps / len(z))
    q[y] += 1.0 - eps
    out.append(-(q * log_p).sum())
  return np.array(out)


def test_hand_worked():
  # logits (0, ln 3): softmax (1/4, 3/4). Label 1, ε = 0: -ln(3/4) = 0.287682.
  # ε = 0.2: q = (0.1, 0.9): -(0.1 ln(1/4) + 0.9 ln(3/4)) = 0.138629 + 0.258914 = 0.397543.
  logits = jnp.array([[0.0, np.log(3.0)]])
  np.testing.assert_allclose(_ce(logits, jnp.array([1])), [0.287682], atol=1e-6)
  np.testing.assert_allclose(_ce(logits, jnp.array([1]), label_smoothing=0.2), [0.397543],
                             atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_numpy(eps):
  rng = np.random.default_rng(0)
  logits = (5 * rng.normal(size=(9, 7))).astype(np.float32)
  labels = rng.integers(0, 7, 9)
  np.testing.assert_allclose(_ce(logits, labels, label_smoothing=eps), _np_ce(logits, labels, eps),
                             rtol=1e-5, atol=1e-6)
  if eps == 0.0:
    np.testing.assert_allclose(
      _ce(logits, labels), optax.softmax_cross_entropy_with_integer_labels(logits, labels),
      rtol=1e-5, atol=1e-6,
    )


def test_check_grads_float64_and_bad_eps():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    check_grads(
      jax.jit(lambda z: losses.softmax_cross_entropy(z, jnp.array([0, 2, 1]), label_smoothing=0.1)),
      (jnp.asarray(rng.normal(size=(3, 4)), jnp.float64),), order=2, modes=["rev"],
    )
  with pytest.raises(ValueError, match=r"label_smoothing.*\[0, 1\)"):
    losses.softmax_cross_entropy(jnp.ones((2, 3)), jnp.zeros(2, jnp.int32), label_smoothing=1.0)
