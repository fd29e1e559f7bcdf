"""Base metrics of the proxy losses: Circle loss and normalised softmax, row- and proxy-level.

* Row metrics on a similarity matrix: `circle_loss` and `norm_softmax_loss` take `sim: [N, R]`
  (N features against R references) and a positive mask, and return one loss per row.
* `proxy_metric` builds the cosine similarities and the mask from features and labelled
  references; `head_proxy_metric` does the same for every head of a part model with `vmap`.

The MAUM terms built on them are in `maumjax.losses.proxy`.

Masked rows and entries: masked logits are filled with a large negative *finite* value, not
-inf, so a row whose mask is empty still has a finite log-sum-exp and finite gradients (§12).
A row with no positive reference (for Circle loss also: no negative) has loss 0 by definition
and contributes no gradient; it still counts in the sample mean. Labels outside [0, C), e.g.
-1 padding, therefore give zero-loss rows.

Similarities are computed in at least float32, whatever the input dtype (engineering default:
γ = 64 multiplies a similarity error by 64).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

# Finite stand-in for -inf in masked log-sum-exp. Logits here are bounded by
# γ·max(α)·max|s − Δ| ≈ 128 · 2.25 · 2 < 1e3, so 1e9 below them is exact zero weight in float32
# and float64, while 2 · 1e9 (both sides of Circle loss empty) is still finite.
_MASK_FILL = -1e9


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Scales `x` to unit L2 norm along `axis`: x / max(‖x‖, eps).

  Same value as `torch.nn.functional.normalize`; written with `rsqrt(max(‖x‖², eps²))` so the
  gradient at x = 0 is finite (zero) instead of NaN. Engineering default.

  Args:
    x: array of any shape.
    axis: the axis to normalise.
    eps: lower bound on the norm.

  Returns:
    An array of the same shape and dtype as `x`.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.asarray(eps * eps, sq.dtype)))


def _as_float(x: jax.Array) -> jax.Array:
  """Promotes to at least float32 (bfloat16/float16 inputs are upcast; float64 is kept)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_logsumexp(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """log Σ_{mask} e^{logits} over the last axis; an empty row gives about -1e9, not -inf."""
  return jax.nn.logsumexp(jnp.where(mask, logits, _MASK_FILL), axis=-1)


def _check_sim(sim: jax.Array, pos_mask: jax.Array, valid: jax.Array | None) -> jax.Array:
  if sim.ndim != 2:
    raise ValueError(f"sim must be [N, R], got shape {sim.shape}; add or flatten axes first.")
  if pos_mask.shape != sim.shape:
    raise ValueError(
      f"pos_mask shape {pos_mask.shape} != sim shape {sim.shape}; build it as "
      "ref_labels[None, :] == labels[:, None]."
    )
  if valid is None:
    return jnp.ones(sim.shape, dtype=bool)
  if valid.shape != sim.shape:
    raise ValueError(
      f"valid shape {valid.shape} != sim shape {sim.shape}; broadcast a per-reference mask "
      "with jnp.broadcast_to(ref_valid[None, :], sim.shape)."
    )
  return valid.astype(bool)


def circle_loss(
  sim: jax.Array,
  pos_mask: jax.Array,
  *,
  gamma: float = 64.0,
  margin: float = 0.25,
  valid: jax.Array | None = None,
) -> jax.Array:
  """Pair-wise Circle loss of each row against its positive and negative references.

  For one row with positive similarities {s_p} and negative similarities {s_n}:

    α_p = [1 + m − s_p]_+,  α_n = [s_n + m]_+   (both under stop-gradient)
    Δ_p = 1 − m,            Δ_n = m
    ℓ   = softplus(LSE_n(γ α_n (s_n − Δ_n)) + LSE_p(−γ α_p (s_p − Δ_p)))

  With one positive per row this is the class-level (proxy) Circle loss; with several it is the
  multi-positive form used by the memory terms. Source: Sun et al., "Circle Loss", CVPR 2020,
  Eq. (6) with the pair-wise softplus form, as in MAUM, CVPR 2022, §4 of our spec.

  A row with no valid positive or no valid negative has loss 0 (engineering default: the
  formula has no defined value there); its gradient is zero and finite.

  Args:
    sim: [N, R] similarities (cosine, in [-1, 1]).
    pos_mask: [N, R] bool, True where reference r is a positive of row n.
    gamma: scale γ.
    margin: relaxation margin m.
    valid: optional [N, R] bool; entries with False are ignored (neither positive nor negative).

  Returns:
    [N] loss per row, in at least float32.
  """
  valid = _check_sim(sim, pos_mask, valid)
  sim = _as_float(sim)
  pos = pos_mask.astype(bool) & valid
  neg = ~pos_mask.astype(bool) & valid
  sim_sg = jax.lax.stop_gradient(sim)
  alpha_p = jax.nn.relu(1.0 + margin - sim_sg)
  alpha_n = jax.nn.relu(sim_sg + margin)
  logits_p = -gamma * alpha_p * (sim - (1.0 - margin))
  logits_n = gamma * alpha_n * (sim - margin)
  z = _masked_logsumexp(logits_n, neg) + _masked_logsumexp(logits_p, pos)
  has_both = jnp.any(pos, axis=-1) & jnp.any(neg, axis=-1)
  return jnp.where(has_both, jax.nn.softplus(z), 0.0)


def norm_softmax_loss(
  sim: jax.Array,
  pos_mask: jax.Array,
  *,
  scale: float = 16.0,
  valid: jax.Array | None = None,
) -> jax.Array:
  """Normalised-softmax loss, multi-positive (InfoNCE) form.

    ℓ = −log( Σ_{p ∈ R⁺} e^{s·s_p} / Σ_{r ∈ R⁺ ∪ R⁻} e^{s·s_r} )

  With one positive per row this is the cross-entropy of the logits `scale · sim` (a
  CosFace-style classifier without margin). Source: MAUM, CVPR 2022, §4 of our spec (the
  `norm_softmax` fallback is an engineering default, not from the paper).

  A row with no valid positive has loss 0 (engineering default); gradients stay finite.

  Args:
    sim: [N, R] similarities.
    pos_mask: [N, R] bool, True where reference r is a positive of row n.
    scale: inverse temperature s.
    valid: optional [N, R] bool; entries with False are left out of both sums.

  Returns:
    [N] loss per row, in at least float32.
  """
  valid = _check_sim(sim, pos_mask, valid)
  logits = scale * _as_float(sim)
  pos = pos_mask.astype(bool) & valid
  loss = _masked_logsumexp(logits, valid) - _masked_logsumexp(logits, pos)
  return jnp.where(jnp.any(pos, axis=-1), loss, 0.0)


METRICS: dict[str, Callable[..., jax.Array]] = {
  "circle": circle_loss,
  "norm_softmax": norm_softmax_loss,
}
# Which of proxy_metric's hyperparameters each metric takes.
_METRIC_HPARAMS: Mapping[str, tuple[str, ...]] = {
  "circle": ("gamma", "margin"),
  "norm_softmax": ("scale",),
}


def _metric_fn(metric: str, **hparams: float) -> Callable[..., jax.Array]:
  if metric not in METRICS:
    raise ValueError(f"Unknown proxy metric {metric!r}; valid names: {sorted(METRICS)}.")
  fn = METRICS[metric]
  kwargs = {k: hparams[k] for k in _METRIC_HPARAMS[metric]}
  return lambda sim, pos, valid: fn(sim, pos, valid=valid, **kwargs)


def proxy_metric(
  feats: jax.Array,
  labels: jax.Array,
  refs: jax.Array,
  ref_labels: jax.Array,
  *,
  metric: str = "circle",
  gamma: float = 64.0,
  margin: float = 0.25,
  scale: float = 16.0,
  ref_valid: jax.Array | None = None,
) -> jax.Array:
  """Proxy metric ℓ(f; R⁺, R⁻) of each feature against labelled references.

  Features and references are L2-normalised and compared by cosine (MAUM, CVPR 2022, §3 of our
  spec); R⁺ are the references with the feature's label, R⁻ all others.

  Args:
    feats: [N, D] features.
    labels: [N] int class ids.
    refs: [R, D] references (proxies, possibly with bank copies).
    ref_labels: [R] int class id of each reference.
    metric: a key of `METRICS`.
    gamma: Circle loss scale (metric 'circle').
    margin: Circle loss margin (metric 'circle').
    scale: softmax scale (metric 'norm_softmax').
    ref_valid: optional [R] bool; references with False are ignored.

  Returns:
    [N] loss per feature.

  Raises:
    ValueError: unknown metric or mismatched shapes.
  """
  fn = _metric_fn(metric, gamma=gamma, margin=margin, scale=scale)
  if feats.ndim != 2 or refs.ndim != 2 or feats.shape[1] != refs.shape[1]:
    raise ValueError(
      f"feats must be [N, D] and refs [R, D] with the same D; got {feats.shape} and "
      f"{refs.shape}."
    )
  if labels.shape != feats.shape[:1] or ref_labels.shape != refs.shape[:1]:
    raise ValueError(
      f"labels {labels.shape} / ref_labels {ref_labels.shape} must be [N] = "
      f"{feats.shape[:1]} / [R] = {refs.shape[:1]}."
    )
  sim = l2_normalize(_as_float(feats)) @ l2_normalize(_as_float(refs)).T
  pos = ref_labels[None, :] == labels[:, None]
  valid = None
  if ref_valid is not None:
    if ref_valid.shape != refs.shape[:1]:
      raise ValueError(f"ref_valid must be [R] = {refs.shape[:1]}, got {ref_valid.shape}.")
    valid = jnp.broadcast_to(ref_valid.astype(bool)[None, :], sim.shape)
  return fn(sim, pos, valid)


_HEAD_REDUCE: dict[str, Callable[..., jax.Array]] = {"sum": jnp.sum, "mean": jnp.mean}


def head_proxy_metric(
  feats: jax.Array,
  labels: jax.Array,
  refs: jax.Array,
  ref_labels: jax.Array,
  *,
  metric: str = "circle",
  gamma: float = 64.0,
  margin: float = 0.25,
  scale: float = 16.0,
  ref_valid: jax.Array | None = None,
  head_reduce: str = "sum",
) -> jax.Array:
  """`proxy_metric` for every head (`vmap` over H), reduced over heads.

  Per-head terms are summed over the parts by default (MAUM, CVPR 2022, §5.6 of our spec;
  'mean' is the switch).

  Args:
    feats: [N, H, D] features of H heads (parts, or one global head).
    labels: [N] int class ids.
    refs: [H, R, D] references of each head.
    ref_labels: [R] int class id of each reference (shared by all heads).
    metric, gamma, margin, scale, ref_valid: as for `proxy_metric`.
    head_reduce: 'sum' or 'mean' over heads.

  Returns:
    [N] loss per feature.
  """
  if head_reduce not in _HEAD_REDUCE:
    raise ValueError(f"Unknown head_reduce {head_reduce!r}; valid: {sorted(_HEAD_REDUCE)}.")
  if (
    feats.ndim != 3 or refs.ndim != 3 or feats.shape[1] != refs.shape[0]
    or feats.shape[2] != refs.shape[2]
  ):
    raise ValueError(
      f"feats must be [N, H, D] and refs [H, R, D] with the same H and D; got {feats.shape} "
      f"and {refs.shape}. For a single global head add an axis: feats[:, None]."
    )

  def one_head(f: jax.Array, r: jax.Array) -> jax.Array:
    return proxy_metric(
      f, labels, r, ref_labels, metric=metric, gamma=gamma, margin=margin, scale=scale,
      ref_valid=ref_valid,
    )

  per_head = jax.vmap(one_head, in_axes=(1, 0))(feats, refs)  # [H, N]
  return _HEAD_REDUCE[head_reduce](per_head, axis=0)
