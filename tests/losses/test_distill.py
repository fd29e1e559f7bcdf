"""MPANet mutual mean KL against NumPy, and its gradients (mpanet.md §4.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maumjax import losses
from tests.losses import naive_mpanet as naive

_kl = jax.jit(losses.mutual_mean_kl, static_argnames=("direction",))
_grad = jax.jit(jax.grad(losses.mutual_mean_kl, argnums=(0, 1)), static_argnames=("direction",))


def _logits(seed, shape=(5, 7)):
  """Student and teacher logits [B, C], float32."""
  rng = np.random.default_rng(seed)
  return tuple((3 * rng.normal(size=shape)).astype(np.float32) for _ in range(2))


def _other(direction):
  return "teacher_student" if direction == "student_teacher" else "student_teacher"


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def test_hand_worked():
  # Student (0, ln 3) -> p^s = (1/4, 3/4); teacher (0, 0) -> p^t = (1/2, 1/2).
  # KL(s ‖ t) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812;
  # KL(t ‖ s) = 1/2 ln 2 + 1/2 ln(2/3) = 0.143841.
  s, t = np.array([[0.0, np.log(3.0)]], np.float32), np.zeros((1, 2), np.float32)
  np.testing.assert_allclose(_kl(s, t), 0.130812, atol=1e-6)
  np.testing.assert_allclose(_kl(s, t, direction="teacher_student"), 0.143841, atol=1e-6)


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
def test_matches_numpy(direction):
  s, t = _logits(0)
  expected = naive.mutual_mean_kl(s, t, direction)
  np.testing.assert_allclose(_kl(s, t, direction=direction), expected, rtol=1e-5)
  assert abs(expected - naive.mutual_mean_kl(s, t, _other(direction))) > 1e-2
  np.testing.assert_allclose(_kl(s, s, direction=direction), 0.0, atol=1e-6)


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
def test_no_gradient_reaches_the_teacher(direction):
  s, t = _logits(1)
  _, g_t = _grad(s, t, direction=direction)
  np.testing.assert_array_equal(g_t, 0.0)


def test_student_teacher_grad_flows_through_the_student_distribution():
  s, t = _logits(2)
  g_s, _ = _grad(s, t, direction="student_teacher")
  # d/dz_k of Σ_c p_c (log p_c − c_c), c = log p^t constant: p_k (log p_k − c_k − KL), per row.
  p, log_pt = _softmax(s), np.log(_softmax(t))
  log_p = np.log(p)
  kl_rows = np.sum(p * (log_p - log_pt), axis=1, keepdims=True)
  expected = p * (log_p - log_pt - kl_rows) / len(s)
  np.testing.assert_allclose(g_s, expected, rtol=1e-4, atol=1e-7)

  # With p^s under stop-gradient (only log p^s differentiated) the gradient is different (zero).
  def stopped(z):
    log_ps = jax.nn.log_softmax(z)
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(jnp.exp(log_ps)) * (log_ps - log_pt), axis=1))

  g_stopped = jax.grad(stopped)(jnp.asarray(s))
  assert np.max(np.abs(g_s - g_stopped)) > 1e-3


def test_teacher_student_grad_is_ps_minus_pt():
  s, t = _logits(3)
  g_s, _ = _grad(s, t, direction="teacher_student")
  np.testing.assert_allclose(g_s, (_softmax(s) - _softmax(t)) / len(s), rtol=1e-4, atol=1e-7)


def test_bfloat16_logits_computed_in_float32():
  s, t = _logits(4)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  loss = _kl(s16, t16)
  assert loss.dtype == jnp.float32
  expected = naive.mutual_mean_kl(np.asarray(s16, np.float64), np.asarray(t16, np.float64))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_unknown_direction_and_bad_shapes_raise():
  s, t = _logits(5)
  with pytest.raises(ValueError, match=r"'js'.*\['student_teacher', 'teacher_student'\]"):
    losses.mutual_mean_kl(s, t, direction="js")
  with pytest.raises(ValueError, match=r"\[B, C\]"):
    losses.mutual_mean_kl(s, t[:, :3])
