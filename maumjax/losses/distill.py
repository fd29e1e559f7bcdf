"""MPANet's mutual mean learning term: KL between student and mean-teacher classifiers.

Source: MPANet (Wu et al., CVPR 2021), Eq. 10–11, and the released code (spec `mpanet.md`
§4.5, switch 2 of §9). The teacher logits come from the other modality's EMA ("mean")
classifier; building them, and the EMA update, belong to the model and train step. Here only
the divergence: the teacher side never receives a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_DIRECTIONS = ("student_teacher", "teacher_student")


def mutual_mean_kl(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  *,
  direction: str = "student_teacher",
) -> jax.Array:
  """KL divergence between the student and the (stop-gradient) teacher, mean over the batch.

  With p^s = softmax(student_logits), p^t = softmax(sg(teacher_logits)):

    'student_teacher' (code):  L = (1/B) Σ_i Σ_c p^s_ic (log p^s_ic − log p^t_ic)
    'teacher_student' (paper): L = (1/B) Σ_i Σ_c p^t_ic (log p^t_ic − log p^s_ic)

  Paper versus code: the released code computes KL(student ‖ teacher) (PyTorch `kl_div` with the
  no-grad teacher log-probabilities as input and p^s as target, "batchmean"); the gradient flows
  through p^s in both places it appears, as it does here (with p^s under stop-gradient the
  term's gradient would be zero). Paper Eq. 10 is KL(teacher ‖ student), whose gradient with
  respect to the student logits is (p^s − p^t)/B per row. The paper also sums a mean over the
  RGB and a mean over the IR samples, twice this single batch mean for a balanced batch; that
  normalisation is the caller's choice.

  Logits are computed in at least float32 (engineering default).

  Args:
    student_logits: [B, C] modality-specific classifier logits (RGB rows from C_v, IR from C_r).
    teacher_logits: [B, C] logits of the other modality's mean classifier; no gradient.
    direction: 'student_teacher' (code, default) or 'teacher_student' (paper).

  Returns:
    Scalar loss.

  Raises:
    ValueError: unknown direction or mismatched shapes.
  """
  if direction not in KL_DIRECTIONS:
    raise ValueError(f"Unknown KL direction {direction!r}; valid: {list(KL_DIRECTIONS)}.")
  if student_logits.ndim != 2 or teacher_logits.shape != student_logits.shape:
    raise ValueError(
      f"student_logits and teacher_logits must both be [B, C]; got {student_logits.shape} "
      f"and {teacher_logits.shape}."
    )
  student = student_logits.astype(jnp.promote_types(student_logits.dtype, jnp.float32))
  teacher = teacher_logits.astype(jnp.promote_types(teacher_logits.dtype, jnp.float32))
  log_ps = jax.nn.log_softmax(student, axis=-1)
  log_pt = jax.nn.log_softmax(jax.lax.stop_gradient(teacher), axis=-1)
  if direction == "student_teacher":
    per_row = jnp.sum(jnp.exp(log_ps) * (log_ps - log_pt), axis=-1)
  else:
    per_row = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return jnp.mean(per_row)
