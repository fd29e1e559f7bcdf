"""The MAUM loss terms (MAUM, CVPR 2022, §5 of our spec `maum.md`).

`shared_proxy_loss` (§5.1, the baseline), `ms_proxy_loss` (§5.2) and `unidirectional_loss`
(§5.3, and §5.4 with memory). They take head-grouped features `[N, H, D]`, proxies `[H, C, D]`
and banks `[K, H, C, D]`, sum (or average) the per-head losses and average over samples. The
base metric of every term (Circle loss or normalised softmax) is `maumjax.losses.metric`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maumjax.losses.metric import head_proxy_metric


def _class_refs(proxies: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Proxies [H, C, D] as references: themselves and labels arange(C)."""
  if proxies.ndim != 3:
    raise ValueError(f"proxies must be [H, C, D], got shape {proxies.shape}.")
  return proxies, jnp.arange(proxies.shape[1])


def shared_proxy_loss(
  feats_rgb: jax.Array,
  labels_rgb: jax.Array,
  feats_ir: jax.Array,
  labels_ir: jax.Array,
  proxies: jax.Array,
  *,
  metric: str = "circle",
  gamma: float = 64.0,
  margin: float = 0.25,
  scale: float = 16.0,
  head_reduce: str = "sum",
  ref_valid: jax.Array | None = None,
) -> jax.Array:
  """Shared-proxy baseline: both modalities against one proxy set.

    L_sh = mean_i ℓ(f^v_i; {w_{y_i}}, {w_c}_{c≠y_i})
         + mean_j ℓ(f^r_j; {w_{y_j}}, {w_c}_{c≠y_j})

  Source: MAUM, CVPR 2022, §5.1 of our spec (ablation baseline).

  Args:
    feats_rgb: [N_rgb, H, D] RGB features.
    labels_rgb: [N_rgb] int class ids.
    feats_ir: [N_ir, H, D] IR features.
    labels_ir: [N_ir] int class ids.
    proxies: [H, C, D] shared proxies (trainable).
    metric, gamma, margin, scale: as for `proxy_metric`.
    head_reduce: 'sum' (default) or 'mean' over heads.
    ref_valid: optional [C] bool; classes with False are not used as references.

  Returns:
    Scalar loss.
  """
  refs, ref_labels = _class_refs(proxies)
  kw = {
    "metric": metric, "gamma": gamma, "margin": margin, "scale": scale, "ref_valid": ref_valid,
    "head_reduce": head_reduce,
  }
  return (
    jnp.mean(head_proxy_metric(feats_rgb, labels_rgb, refs, ref_labels, **kw))
    + jnp.mean(head_proxy_metric(feats_ir, labels_ir, refs, ref_labels, **kw))
  )


def ms_proxy_loss(
  feats_rgb: jax.Array,
  labels_rgb: jax.Array,
  feats_ir: jax.Array,
  labels_ir: jax.Array,
  proxies_rgb: jax.Array,
  proxies_ir: jax.Array,
  *,
  metric: str = "circle",
  gamma: float = 64.0,
  margin: float = 0.25,
  scale: float = 16.0,
  head_reduce: str = "sum",
  ref_valid_rgb: jax.Array | None = None,
  ref_valid_ir: jax.Array | None = None,
) -> jax.Array:
  """Modality-specific proxy term: each modality against its own proxies only.

    L_ms = mean_i ℓ(f^v_i; {w^v_{y_i}}, {w^v_c}_{c≠y_i})
         + mean_j ℓ(f^r_j; {w^r_{y_j}}, {w^r_c}_{c≠y_j})

  W^V learns only from RGB features and W^I only from IR features. Source: MAUM, CVPR 2022,
  §5.2 of our spec.

  Args:
    feats_rgb: [N_rgb, H, D] RGB features.
    labels_rgb: [N_rgb] int class ids.
    feats_ir: [N_ir, H, D] IR features.
    labels_ir: [N_ir] int class ids.
    proxies_rgb: [H, C, D] RGB proxies W^V (trainable).
    proxies_ir: [H, C, D] IR proxies W^I (trainable).
    metric, gamma, margin, scale: as for `proxy_metric`.
    head_reduce: 'sum' (default) or 'mean' over heads.
    ref_valid_rgb: optional [C] bool mask of usable RGB proxies.
    ref_valid_ir: optional [C] bool mask of usable IR proxies (e.g. identities with IR images).

  Returns:
    Scalar loss.
  """
  kw = {
    "metric": metric, "gamma": gamma, "margin": margin, "scale": scale, "head_reduce": head_reduce
  }
  refs_rgb, ref_labels_rgb = _class_refs(proxies_rgb)
  refs_ir, ref_labels_ir = _class_refs(proxies_ir)
  loss_rgb = head_proxy_metric(
    feats_rgb, labels_rgb, refs_rgb, ref_labels_rgb, ref_valid=ref_valid_rgb, **kw
  )
  loss_ir = head_proxy_metric(
    feats_ir, labels_ir, refs_ir, ref_labels_ir, ref_valid=ref_valid_ir, **kw
  )
  return jnp.mean(loss_rgb) + jnp.mean(loss_ir)


def memory_refs(
  proxies: jax.Array,
  bank: jax.Array | None,
  *,
  stop_gradient: bool = True,
  ref_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """References of a unidirectional term: the current proxies plus every bank slot.

  Slot order is [current, bank[0], ..., bank[K-1]]; reference r = t·C + c has class c. The bank
  is always under stop-gradient; the current proxies are unless `stop_gradient=False`.
  Source: MAUM, CVPR 2022, §5.4 and §12 of our spec.

  Args:
    proxies: [H, C, D] current counterpart proxies.
    bank: [K, H, C, D] snapshots, or None (K = 0).
    stop_gradient: stop the gradient to the current proxies (MAUM); False is the
      bidirectional control of §9.
    ref_valid: optional [C] bool class mask.

  Returns:
    refs [H, (K+1)·C, D], ref_labels [(K+1)·C] = tile(arange(C), K+1), and ref_valid tiled to
    [(K+1)·C] (or None).
  """
  if proxies.ndim != 3:
    raise ValueError(f"proxies must be [H, C, D], got shape {proxies.shape}.")
  current = jax.lax.stop_gradient(proxies) if stop_gradient else proxies
  slots = current[None]
  if bank is not None:
    if bank.ndim != 4 or bank.shape[1:] != proxies.shape:
      raise ValueError(
        f"bank must be [K, H, C, D] with [H, C, D] = proxies {proxies.shape}; got "
        f"{bank.shape}. Re-initialise it with memory.init_bank from these proxies."
      )
    slots = jnp.concatenate([slots, jax.lax.stop_gradient(bank).astype(current.dtype)], axis=0)
  num_slots, num_heads, num_classes, dim = slots.shape
  refs = jnp.transpose(slots, (1, 0, 2, 3)).reshape(num_heads, num_slots * num_classes, dim)
  ref_labels = jnp.tile(jnp.arange(num_classes), num_slots)
  if ref_valid is not None:
    if ref_valid.shape != (num_classes,):
      raise ValueError(f"ref_valid must be [C] = ({num_classes},), got {ref_valid.shape}.")
    ref_valid = jnp.tile(ref_valid.astype(bool), num_slots)
  return refs, ref_labels, ref_valid


def unidirectional_loss(
  feats_rgb: jax.Array,
  labels_rgb: jax.Array,
  feats_ir: jax.Array,
  labels_ir: jax.Array,
  proxies_rgb: jax.Array,
  proxies_ir: jax.Array,
  bank_rgb: jax.Array | None = None,
  bank_ir: jax.Array | None = None,
  *,
  stop_gradient: bool = True,
  metric: str = "circle",
  gamma: float = 64.0,
  margin: float = 0.25,
  scale: float = 16.0,
  head_reduce: str = "sum",
  ref_valid_rgb: jax.Array | None = None,
  ref_valid_ir: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """(Memory-augmented) unidirectional cross-modality terms.

    R⁺(y) = {sg(w^v_y)} ∪ {B^V[t, y]}_{t=1..K},  R⁻(y) = {sg(w^v_c)} ∪ {B^V[t, c]}, c ≠ y
    L_{I→V} = mean_j ℓ(f^r_j; R⁺(y_j), R⁻(y_j))        IR features vs RGB references
    L_{V→I} = mean_i ℓ(f^v_i; ...)                      RGB features vs IR references, with B^I

  With no bank (None, or K = 0) this is exactly the plain unidirectional term of §5.3. Only the
  features receive gradient: banks are always under stop-gradient and the current counterpart
  proxies are too unless `stop_gradient=False` (the bidirectional control, §9). Source: MAUM,
  CVPR 2022, §5.3–§5.4 of our spec.

  Args:
    feats_rgb: [N_rgb, H, D] RGB features.
    labels_rgb: [N_rgb] int class ids.
    feats_ir: [N_ir, H, D] IR features.
    labels_ir: [N_ir] int class ids.
    proxies_rgb: [H, C, D] RGB proxies W^V.
    proxies_ir: [H, C, D] IR proxies W^I.
    bank_rgb: [K, H, C, D] RGB proxy snapshots B^V, or None.
    bank_ir: [K, H, C, D] IR proxy snapshots B^I, or None.
    stop_gradient: stop the gradient to the current counterpart proxies.
    metric, gamma, margin, scale: as for `proxy_metric`.
    head_reduce: 'sum' (default) or 'mean' over heads.
    ref_valid_rgb: optional [C] bool mask of usable RGB references (applies to every slot).
    ref_valid_ir: optional [C] bool mask of usable IR references.

  Returns:
    {'ir_to_rgb': L_{I→V}, 'rgb_to_ir': L_{V→I}}, scalars.
  """
  kw = {
    "metric": metric, "gamma": gamma, "margin": margin, "scale": scale, "head_reduce": head_reduce
  }
  refs_rgb, labels_refs_rgb, valid_rgb = memory_refs(
    proxies_rgb, bank_rgb, stop_gradient=stop_gradient, ref_valid=ref_valid_rgb
  )
  refs_ir, labels_refs_ir, valid_ir = memory_refs(
    proxies_ir, bank_ir, stop_gradient=stop_gradient, ref_valid=ref_valid_ir
  )
  ir_to_rgb = head_proxy_metric(
    feats_ir, labels_ir, refs_rgb, labels_refs_rgb, ref_valid=valid_rgb, **kw
  )
  rgb_to_ir = head_proxy_metric(
    feats_rgb, labels_rgb, refs_ir, labels_refs_ir, ref_valid=valid_ir, **kw
  )
  return {"ir_to_rgb": jnp.mean(ir_to_rgb), "rgb_to_ir": jnp.mean(rgb_to_ir)}
