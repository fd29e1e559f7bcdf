"""Memories carried through the train step as explicit state (pure functions).

Cluster memories (MMM, mmm.md §5.4): `cluster_nce_loss` (re-exported from
`maumjax.losses.cluster_nce`) scores features against a [C, D] memory of unit-norm cluster
centres, and `update_cluster_memory` moves the rows towards the step's features afterwards;
`maumjax.cluster.init_cluster_memory` builds the memory from cluster means at each
re-clustering.

Proxy memory banks for MAUM's memory-augmented unidirectional terms:

A `ProxyBank` holds, per modality, K snapshots of the L2-normalised proxies of every head,
`[K, H, C, D]`, and the next FIFO slot `ptr`. It is plain state carried in the train state (a
pytree of arrays, checkpointable, never in `params`), updated after the optimiser step from the
new proxies, and passed to `losses.unidirectional_loss`, which stop-gradients it. Source: MAUM,
CVPR 2022, §5.4 and §12 of our spec; the mechanics are engineering defaults ([I] there).

Size 0 means "no bank": `init_bank` returns None, `fill_bank`/`update_bank` pass None through,
and the losses accept None (the plain unidirectional term of §5.3).

Modes:
* 'fifo' (default): a history queue. On a write step, slot `ptr` gets normalise(W) and
  `ptr = (ptr + 1) mod K`, so the bank holds the last K written snapshots.
* 'ema': one slot (size must be 1), a momentum average of normalised proxies, renormalised:
  B[0] = normalise(μ·B[0] + (1 − μ)·normalise(W)); `ptr` stays 0. Engineering default for the
  `mem_mode = ema` switch (§5.4; the spec leaves its definition open). K > 1 EMA slots would all
  hold the same average, so it is rejected.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from maumjax.losses.metric import l2_normalize

from maumjax.losses.cluster_nce import cluster_nce_loss  # noqa: F401  (public here too)

MODES = ("fifo", "ema")
CLUSTER_UPDATES = ("sequential", "per_label_mean")


class ProxyBank(NamedTuple):
  """Proxy snapshots of both modalities (a pytree).

  Attributes:
    rgb: [K, H, C, D] L2-normalised RGB proxy snapshots (B^V).
    ir: [K, H, C, D] L2-normalised IR proxy snapshots (B^I).
    ptr: int32 scalar, the next FIFO slot to overwrite.
  """

  rgb: jax.Array
  ir: jax.Array
  ptr: jax.Array


def _check_mode(mode: str, size: int) -> None:
  if mode not in MODES:
    raise ValueError(f"Unknown memory mode {mode!r}; valid: {list(MODES)}.")
  if mode == "ema" and size != 1:
    raise ValueError(
      f"mem_mode='ema' keeps one momentum-averaged slot, got bank size {size}; set the bank "
      "size to 1 for 'ema', or use mode='fifo' for a K-slot history."
    )


def _snapshot(proxies: jax.Array) -> jax.Array:
  """Normalised, gradient-free copy of [H, C, D] proxies."""
  if proxies.ndim != 3:
    raise ValueError(f"proxies must be [H, C, D], got shape {proxies.shape}.")
  return l2_normalize(jax.lax.stop_gradient(proxies))


def init_bank(
  proxies_rgb: jax.Array,
  proxies_ir: jax.Array,
  size: int,
  *,
  mode: str = "fifo",
) -> ProxyBank | None:
  """A bank whose K slots all hold the normalised current proxies (no masking needed).

  Called when the cross-modality stage starts (§6 of our spec: epoch `uni_start_epoch`). Also
  usable at step 0 to get the state's shapes and refilled later with `fill_bank`.

  Args:
    proxies_rgb: [H, C, D] RGB proxies.
    proxies_ir: [H, C, D] IR proxies.
    size: K, the number of slots; 0 means no bank.
    mode: 'fifo' or 'ema' (which needs size 1).

  Returns:
    A `ProxyBank` with ptr = 0, or None for size 0.

  Raises:
    ValueError: negative size, unknown mode, 'ema' with size != 1, mismatched proxy shapes.
  """
  if size < 0:
    raise ValueError(f"bank size must be >= 0 (0 = no bank), got {size}.")
  if size == 0:
    return None
  _check_mode(mode, size)
  snap_rgb, snap_ir = _snapshot(proxies_rgb), _snapshot(proxies_ir)
  if snap_rgb.shape != snap_ir.shape:
    raise ValueError(
      f"proxies_rgb {snap_rgb.shape} and proxies_ir {snap_ir.shape} must have the same "
      "[H, C, D]."
    )
  return ProxyBank(
    rgb=jnp.broadcast_to(snap_rgb[None], (size, *snap_rgb.shape)),
    ir=jnp.broadcast_to(snap_ir[None], (size, *snap_ir.shape)),
    ptr=jnp.zeros((), jnp.int32),
  )


def fill_bank(
  bank: ProxyBank | None,
  proxies_rgb: jax.Array,
  proxies_ir: jax.Array,
) -> ProxyBank | None:
  """Overwrites every slot with the normalised current proxies and resets ptr to 0.

  Same result as `init_bank` with the bank's size, shapes and dtype kept (jittable, for the
  phase-2 start inside a compiled step). None passes through.

  Args:
    bank: the bank to refill, or None.
    proxies_rgb: [H, C, D] RGB proxies.
    proxies_ir: [H, C, D] IR proxies.

  Returns:
    The refilled bank, or None.
  """
  if bank is None:
    return None
  return ProxyBank(
    rgb=jnp.broadcast_to(_snapshot(proxies_rgb)[None], bank.rgb.shape).astype(bank.rgb.dtype),
    ir=jnp.broadcast_to(_snapshot(proxies_ir)[None], bank.ir.shape).astype(bank.ir.dtype),
    ptr=jnp.zeros_like(bank.ptr),
  )


def update_bank(
  bank: ProxyBank | None,
  proxies_rgb: jax.Array,
  proxies_ir: jax.Array,
  *,
  step: int | jax.Array,
  mode: str = "fifo",
  every: int = 1,
  momentum: float = 0.9,
  enabled: bool | jax.Array = True,
) -> ProxyBank | None:
  """Writes the new proxies into the bank if `step % every == 0`; otherwise returns it unchanged.

  Call after the optimiser update with the new proxies. `step` may be traced, so one compiled
  step serves write and skip steps; only the written slot is touched (a slot-sized select
  followed by an in-place dynamic update), so donating the state avoids copying the bank.

  Args:
    bank: the bank, or None (returned as is).
    proxies_rgb: [H, C, D] new RGB proxies.
    proxies_ir: [H, C, D] new IR proxies.
    step: int step counter (e.g. the optimiser step after the update).
    mode: 'fifo' (history queue) or 'ema' (one momentum slot); see the module docstring.
    every: write interval in steps (`mem_update_every`, default 1).
    momentum: μ of the 'ema' mode.
    enabled: a (traced) bool; False skips the write whatever the step (the trainer passes
      False for a step it will not apply).

  Returns:
    The updated bank; never carries gradient to the proxies.

  Raises:
    ValueError: unknown mode, 'ema' with K != 1, every < 1, or shapes that do not match.
  """
  if bank is None:
    return None
  _check_mode(mode, bank.rgb.shape[0])
  if every < 1:
    raise ValueError(f"every must be a positive number of steps, got {every}.")
  snap_rgb, snap_ir = _snapshot(proxies_rgb), _snapshot(proxies_ir)
  if snap_rgb.shape != bank.rgb.shape[1:] or snap_ir.shape != bank.ir.shape[1:]:
    raise ValueError(
      f"proxies {snap_rgb.shape}/{snap_ir.shape} do not match the bank's [H, C, D] = "
      f"{bank.rgb.shape[1:]}; re-initialise the bank with init_bank."
    )
  write = (jnp.asarray(step) % every == 0) & jnp.asarray(enabled, bool)
  ptr = bank.ptr

  def new_slot(slots: jax.Array, snap: jax.Array) -> jax.Array:
    old = slots[ptr]
    if mode == "ema":
      snap = l2_normalize(momentum * old + (1.0 - momentum) * snap)
    return slots.at[ptr].set(jnp.where(write, snap.astype(slots.dtype), old))

  next_ptr = (ptr + 1) % bank.rgb.shape[0] if mode == "fifo" else ptr
  return ProxyBank(
    rgb=new_slot(bank.rgb, snap_rgb),
    ir=new_slot(bank.ir, snap_ir),
    ptr=jnp.where(write, next_ptr, ptr).astype(bank.ptr.dtype),
  )


def bank_bytes(bank: ProxyBank | None) -> int:
  """Bytes held by the bank's arrays (0 for None), for logging the memory cost (§5.4)."""
  if bank is None:
    return 0
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(bank))


def update_cluster_memory(memory: jax.Array, feats: jax.Array, labels: jax.Array, *,
                          momentum: float = 0.1, mode: str = "sequential") -> jax.Array:
  """The cluster memory's momentum update after a step (mmm.md §5.4, §12).

  'sequential' (the code): for each sample i in batch order,
  M[y_i] <- normalise(m M[y_i] + (1 - m) normalise(x_i)), a `lax.scan` over the batch, so with
  m = 0.1 the last of several samples sharing a label dominates. 'per_label_mean' (a documented
  deviation, one vectorised update per label): M[c] <- normalise(m M[c] + (1 - m) mean of the
  normalised x_i with y_i = c). Samples labelled -1 change nothing. m = 0.1 keeps only 10% of
  the old row (the ClusterContrast convention; the code's value).

  The memory is the loss's input as it was before the step: in MMM's joint stage the released
  code's infrared loss happens to read the memory already updated by the visible branch (an
  in-place side effect); here both branches score against the pre-step memory and the updates
  are applied afterwards.

  Args:
    memory: [C, D] unit-norm rows (zero rows: padding, never written unless a label points
      there).
    feats: [B, D] raw BN-neck features (L2-normalised inside).
    labels: [B] int in [0, C), -1 to skip.
    momentum: m (0.1).
    mode: a key of `CLUSTER_UPDATES`.

  Returns:
    The new memory [C, D] (memory's dtype).
  """
  if mode not in CLUSTER_UPDATES:
    raise ValueError(f"unknown cluster-memory update {mode!r}; use one of {CLUSTER_UPDATES}")
  if feats.ndim != 2 or labels.shape != feats.shape[:1] or memory.shape[1:] != feats.shape[1:]:
    raise ValueError(f"memory [C, D], feats [B, D] and labels [B] expected; got "
                     f"{memory.shape}, {feats.shape} and {labels.shape}")
  x = l2_normalize(jax.lax.stop_gradient(feats).astype(jnp.float32), axis=-1)
  mem = memory.astype(jnp.float32)
  if mode == "sequential":
    def one(mem, item):
      xi, yi = item
      row = l2_normalize(momentum * mem[jnp.maximum(yi, 0)] + (1.0 - momentum) * xi)
      return jnp.where(yi >= 0, mem.at[jnp.maximum(yi, 0)].set(row), mem), None

    mem, _ = jax.lax.scan(one, mem, (x, labels))
    return mem.astype(memory.dtype)
  num = memory.shape[0]
  onehot = jax.nn.one_hot(labels, num, dtype=jnp.float32)  # label -1 -> zero row
  counts = jnp.sum(onehot, axis=0)
  means = (onehot.T @ x) / jnp.maximum(counts, 1.0)[:, None]
  moved = l2_normalize(momentum * mem + (1.0 - momentum) * means, axis=-1)
  return jnp.where((counts > 0)[:, None], moved, mem).astype(memory.dtype)
