"""Proxy metrics and MAUM terms against hand-worked cases and naive NumPy loops (spec §4, §5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from maumjax import losses

RTOL, ATOL = 1e-5, 1e-6

# Jitted entry points: eager dispatch compiles every primitive separately and would dominate the
# test time on CPU.
_circle = jax.jit(losses.circle_loss)
_norm_softmax = jax.jit(losses.norm_softmax_loss)
_proxy_metric = jax.jit(losses.proxy_metric, static_argnames=("metric",))
_ms = jax.jit(losses.ms_proxy_loss, static_argnames=("metric", "head_reduce"))


# ---------------------------------------------------------------------------------------------
# NumPy references, written from the spec formulas with per-row / per-head Python loops.


def _lse(x):
  x = np.asarray(x, np.float64)
  mx = x.max()
  return mx + np.log(np.exp(x - mx).sum())


def _np_circle_row(sims, pos, gamma, margin, alpha_sims=None):
  """ℓ of one row; `alpha_sims` freezes the α weights (the stop-gradient) at other values."""
  alpha_sims = sims if alpha_sims is None else alpha_sims
  lp, ln = [], []
  for s, a, p in zip(sims, alpha_sims, pos):
    if p:
      lp.append(-gamma * max(1 + margin - a, 0.0) * (s - (1 - margin)))
    else:
      ln.append(gamma * max(a + margin, 0.0) * (s - margin))
  if not lp or not ln:
    return 0.0
  return float(np.logaddexp(0.0, _lse(ln) + _lse(lp)))


def _np_circle(sim, pos, valid=None, *, gamma, margin):
  valid = np.ones_like(pos) if valid is None else valid
  out = []
  for i in range(sim.shape[0]):
    keep = valid[i]
    out.append(_np_circle_row(sim[i][keep], pos[i][keep], gamma, margin))
  return np.array(out)


def _np_norm_softmax(sim, pos, valid=None, *, scale):
  valid = np.ones_like(pos) if valid is None else valid
  out = []
  for i in range(sim.shape[0]):
    num = [scale * s for s, p, v in zip(sim[i], pos[i], valid[i]) if p and v]
    den = [scale * s for s, v in zip(sim[i], valid[i]) if v]
    out.append(0.0 if not num else _lse(den) - _lse(num))
  return np.array(out)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_proxy_term(feats, labels, ref_list, *, gamma=64.0, margin=0.25, head_reduce="sum",
                   ref_valid=None):
  """mean_i Σ_h ℓ(f_ih; R⁺, R⁻) with ref_list[h] = [(ref_vector, class_id), ...] per head."""
  n, h = feats.shape[:2]
  total = 0.0
  for i in range(n):
    per_head = []
    for k in range(h):
      f = _unit(feats[i, k])
      sims, pos = [], []
      for ref, c in ref_list[k]:
        if ref_valid is not None and not ref_valid[c]:
          continue
        sims.append(float(f @ _unit(ref)))
        pos.append(c == labels[i])
      per_head.append(_np_circle_row(sims, pos, gamma, margin))
    total += sum(per_head) if head_reduce == "sum" else np.mean(per_head)
  return total / n


def _class_list(proxies_h):
  return [(proxies_h[c], c) for c in range(proxies_h.shape[0])]


def _memory_list(proxies_h, bank_h):
  """Current proxies plus every bank slot, as references (spec §5.4: K+1 per class)."""
  refs = _class_list(proxies_h)
  for t in range(0 if bank_h is None else bank_h.shape[0]):
    refs += _class_list(bank_h[t])
  return refs


def _problem(seed=0, *, n_rgb=6, n_ir=5, heads=3, classes=4, dim=8, bank=2):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  return {
    "feats_rgb": f(n_rgb, heads, dim), "labels_rgb": rng.integers(0, classes, n_rgb),
    "feats_ir": f(n_ir, heads, dim), "labels_ir": rng.integers(0, classes, n_ir),
    "proxies_rgb": f(heads, classes, dim), "proxies_ir": f(heads, classes, dim),
    "bank_rgb": _unit(f(bank, heads, classes, dim)).astype(np.float32),
    "bank_ir": _unit(f(bank, heads, classes, dim)).astype(np.float32),
  }


# ---------------------------------------------------------------------------------------------
# Row metrics.


def test_circle_hand_worked():
  # γ = 2, m = 0.25; one positive s_p = 0.5, negatives s_n = 0.1 and -0.3.
  # Positive: α_p = 1.25 - 0.5 = 0.75, logit = -2 * 0.75 * (0.5 - 0.75) = 0.375.
  # Negative 0.1: α_n = 0.35, logit = 2 * 0.35 * (0.1 - 0.25) = -0.105.
  # Negative -0.3: α_n = [-0.05]_+ = 0, logit = 0 (still enters the LSE as e^0 = 1).
  # LSE_n = log(e^-0.105 + 1) = log(1.900325) = 0.642025; LSE_p = 0.375.
  # ℓ = softplus(1.017025) = log(1 + 2.764985) = 1.325736.
  sim = jnp.array([[0.5, 0.1, -0.3]])
  pos = jnp.array([[True, False, False]])
  out = _circle(sim, pos, gamma=2.0, margin=0.25)
  np.testing.assert_allclose(out, [1.325736], atol=1e-6)


@pytest.mark.parametrize("gamma,margin", [(64.0, 0.25), (32.0, 0.4)])
def test_circle_matches_numpy_loop(gamma, margin):
  rng = np.random.default_rng(1)
  sim = rng.uniform(-1, 1, size=(7, 12)).astype(np.float32)
  pos = rng.uniform(size=(7, 12)) < 0.3  # several positives per row
  pos[:, 0] = True
  pos[:, 1] = False
  valid = rng.uniform(size=(7, 12)) < 0.8
  valid[:, :2] = True
  fn = jax.jit(lambda s, p, v: _circle(s, p, gamma=gamma, margin=margin, valid=v))
  np.testing.assert_allclose(
    fn(sim, pos, valid), _np_circle(sim, pos, valid, gamma=gamma, margin=margin),
    rtol=RTOL, atol=ATOL,
  )
  no_mask = jax.jit(lambda s, p: _circle(s, p, gamma=gamma, margin=margin))
  np.testing.assert_allclose(
    no_mask(sim, pos), _np_circle(sim, pos, gamma=gamma, margin=margin), rtol=RTOL, atol=ATOL
  )


def test_circle_invalid_entries_are_ignored():
  rng = np.random.default_rng(2)
  sim = rng.uniform(-1, 1, size=(3, 6)).astype(np.float32)
  pos = np.zeros((3, 6), bool)
  pos[:, 0] = True
  valid = np.ones((3, 6), bool)
  valid[:, 4:] = False
  masked = _circle(jnp.asarray(sim), jnp.asarray(pos), valid=jnp.asarray(valid))
  dropped = _circle(jnp.asarray(sim[:, :4]), jnp.asarray(pos[:, :4]))
  np.testing.assert_allclose(masked, dropped, rtol=RTOL)


def test_empty_rows_are_zero_with_finite_zero_grads():
  sim = jnp.array([[0.3, -0.2, 0.1], [0.3, -0.2, 0.1], [0.9, 0.8, -0.5]])
  pos = jnp.array([[False, False, False], [True, True, True], [True, False, False]])
  valid = jnp.array([[True] * 3, [True] * 3, [False, True, True]])  # row 3: positive masked
  for fn in (_circle, lambda s, p, valid: _norm_softmax(s, p, valid=valid)):
    out = fn(sim, pos, valid=valid)
    grad = jax.jit(jax.grad(lambda s: fn(s, pos, valid=valid).sum()))(sim)  # noqa: B023
    assert np.all(np.isfinite(grad))
    if fn is _circle:  # Circle also needs a negative: row 2 has none
      np.testing.assert_array_equal(out, [0.0, 0.0, 0.0])
      np.testing.assert_array_equal(grad, np.zeros((3, 3)))
    else:  # norm_softmax: row 2 is all-positive, loss log(1) = 0 with zero gradient
      np.testing.assert_allclose(out, [0.0, 0.0, 0.0], atol=1e-6)
      np.testing.assert_allclose(grad, np.zeros((3, 3)), atol=1e-6)


def test_circle_grads_finite_at_ties_and_kinks():
  # Equal similarities (LSE ties), s_n = -m (α_n kink) and s = ±1.
  sim = jnp.array([[0.2, 0.2, 0.2, -0.25], [1.0, -1.0, -0.25, -0.25]])
  pos = jnp.array([[True, True, False, False], [True, False, False, False]])
  grad = jax.jit(jax.grad(lambda s: _circle(s, pos).sum()))(sim)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad[0, 0], grad[0, 1])  # tied positives share the gradient


def test_circle_grad_matches_finite_differences_with_frozen_alpha():
  # α is under stop-gradient, so the autodiff gradient is that of ℓ with α frozen at the
  # current similarities: compare with central differences of the NumPy reference.
  gamma, margin, eps = 4.0, 0.25, 1e-6
  rng = np.random.default_rng(3)
  sim0 = rng.uniform(-0.9, 0.9, size=(3, 5))
  pos = np.zeros((3, 5), bool)
  pos[:, :2] = True
  with jax.enable_x64(True):
    loss = lambda s: _circle(s, jnp.asarray(pos), gamma=gamma, margin=margin).sum()
    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(sim0, jnp.float64)))
  assert grad.dtype == np.float64
  numeric = np.zeros_like(sim0)
  for i in range(3):
    for j in range(5):
      up, down = sim0[i].copy(), sim0[i].copy()
      up[j] += eps
      down[j] -= eps
      numeric[i, j] = (
        _np_circle_row(up, pos[i], gamma, margin, alpha_sims=sim0[i])
        - _np_circle_row(down, pos[i], gamma, margin, alpha_sims=sim0[i])
      ) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_norm_softmax_matches_numpy_loop_and_check_grads():
  rng = np.random.default_rng(4)
  sim = rng.uniform(-1, 1, size=(6, 10)).astype(np.float32)
  pos = rng.uniform(size=(6, 10)) < 0.3
  pos[:, 0] = True
  valid = rng.uniform(size=(6, 10)) < 0.8
  valid[:, 0] = True
  fn = jax.jit(lambda s, p, v: _norm_softmax(s, p, scale=16.0, valid=v))
  np.testing.assert_allclose(
    fn(sim, pos, valid), _np_norm_softmax(sim, pos, valid, scale=16.0), rtol=RTOL, atol=ATOL
  )
  with jax.enable_x64(True):
    check_grads(
      jax.jit(lambda s: _norm_softmax(s, pos, scale=3.0, valid=valid)),
      (jnp.asarray(sim, jnp.float64),), order=2, modes=["rev"],
    )


def test_norm_softmax_single_positive_is_cross_entropy():
  rng = np.random.default_rng(5)
  sim = rng.uniform(-1, 1, size=(5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 5)
  pos = np.arange(7)[None] == labels[:, None]
  logits = 16.0 * sim.astype(np.float64)
  ce = -(logits[np.arange(5), labels] - np.log(np.exp(logits).sum(1)))
  np.testing.assert_allclose(
    _norm_softmax(jnp.asarray(sim), jnp.asarray(pos), scale=16.0), ce, rtol=RTOL
  )


# ---------------------------------------------------------------------------------------------
# proxy_metric.


def test_proxy_metric_is_cosine_circle():
  rng = np.random.default_rng(6)
  feats, refs = rng.normal(size=(5, 8)), rng.normal(size=(9, 8))
  labels, ref_labels = rng.integers(0, 3, 5), np.arange(9) % 3
  sim = _unit(feats) @ _unit(refs).T
  pos = ref_labels[None] == labels[:, None]
  out = _proxy_metric(*map(jnp.asarray, (feats, labels, refs, ref_labels)))
  np.testing.assert_allclose(out, _np_circle(sim, pos, gamma=64.0, margin=0.25),
                             rtol=RTOL, atol=ATOL)
  out = _proxy_metric(*map(jnp.asarray, (feats, labels, refs, ref_labels)),
                            metric="norm_softmax", scale=20.0)
  np.testing.assert_allclose(out, _np_norm_softmax(sim, pos, scale=20.0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("metric", ["circle", "norm_softmax"])
def test_proxy_metric_invariances(metric):
  rng = np.random.default_rng(7)
  feats = rng.normal(size=(6, 8)).astype(np.float32)
  refs = rng.normal(size=(10, 8)).astype(np.float32)
  labels, ref_labels = rng.integers(0, 5, 6), np.arange(10) % 5
  ref_valid = np.arange(10) != 3
  base = _proxy_metric(feats, labels, refs, ref_labels, metric=metric, ref_valid=ref_valid)
  # Positive rescaling of features and references (normalisation).
  scaled = _proxy_metric(
    feats * rng.uniform(0.1, 10, (6, 1)).astype(np.float32), labels,
    refs * rng.uniform(0.1, 10, (10, 1)).astype(np.float32), ref_labels, metric=metric,
    ref_valid=ref_valid,
  )
  np.testing.assert_allclose(scaled, base, rtol=1e-4, atol=1e-5)
  # Renaming the classes consistently, and reordering the references.
  perm, order = rng.permutation(5), rng.permutation(10)
  renamed = _proxy_metric(
    feats, perm[labels], refs[order], perm[ref_labels][order], metric=metric,
    ref_valid=ref_valid[order],
  )
  np.testing.assert_allclose(renamed, base, rtol=1e-5, atol=1e-6)


def test_proxy_metric_vmaps_over_problems():
  rng = np.random.default_rng(8)
  feats, refs = rng.normal(size=(3, 4, 8)), rng.normal(size=(3, 6, 8))
  labels, ref_labels = rng.integers(0, 3, (3, 4)), np.arange(6) % 3
  batched = jax.vmap(lambda f, y, r: _proxy_metric(f, y, r, jnp.asarray(ref_labels)))(
    feats, labels, refs
  )
  for b in range(3):
    np.testing.assert_allclose(
      batched[b], _proxy_metric(feats[b], labels[b], refs[b], ref_labels), rtol=1e-6
    )


def test_unknown_metric_and_bad_shapes_raise():
  f, y = jnp.ones((2, 4)), jnp.zeros(2, jnp.int32)
  with pytest.raises(ValueError, match=r"'cosface'.*\['circle', 'norm_softmax'\]"):
    losses.proxy_metric(f, y, f, y, metric="cosface")
  with pytest.raises(ValueError, match="head_reduce"):
    losses.head_proxy_metric(f[:, None], y, f[None], y, head_reduce="max")
  with pytest.raises(ValueError, match=r"\[N, H, D\]"):
    losses.head_proxy_metric(f, y, f[None], y)
  with pytest.raises(ValueError, match="bank"):
    losses.memory_refs(jnp.ones((2, 3, 4)), jnp.ones((1, 2, 3, 5)))


# ---------------------------------------------------------------------------------------------
# MAUM terms (spec §5).


@pytest.mark.parametrize("head_reduce", ["sum", "mean"])
def test_shared_and_ms_proxy_match_naive(head_reduce):
  p = _problem(9)
  heads = p["proxies_rgb"].shape[0]
  shared = jax.jit(lambda *a: losses.shared_proxy_loss(*a, head_reduce=head_reduce))(
    p["feats_rgb"], p["labels_rgb"], p["feats_ir"], p["labels_ir"], p["proxies_rgb"]
  )
  refs = [_class_list(p["proxies_rgb"][h]) for h in range(heads)]
  expected = _np_proxy_term(p["feats_rgb"], p["labels_rgb"], refs, head_reduce=head_reduce)
  expected += _np_proxy_term(p["feats_ir"], p["labels_ir"], refs, head_reduce=head_reduce)
  np.testing.assert_allclose(shared, expected, rtol=RTOL)

  ms = jax.jit(lambda *a: losses.ms_proxy_loss(*a, head_reduce=head_reduce))(
    p["feats_rgb"], p["labels_rgb"], p["feats_ir"], p["labels_ir"], p["proxies_rgb"],
    p["proxies_ir"],
  )
  refs_ir = [_class_list(p["proxies_ir"][h]) for h in range(heads)]
  expected = _np_proxy_term(p["feats_rgb"], p["labels_rgb"], refs, head_reduce=head_reduce)
  expected += _np_proxy_term(p["feats_ir"], p["labels_ir"], refs_ir, head_reduce=head_reduce)
  np.testing.assert_allclose(ms, expected, rtol=RTOL)


_FROM_PROBLEM = object()


_uni_jit = jax.jit(
  losses.unidirectional_loss, static_argnames=("stop_gradient", "metric", "head_reduce")
)


def _uni(p, *, bank_rgb=_FROM_PROBLEM, bank_ir=_FROM_PROBLEM, **kw):
  return _uni_jit(
    p["feats_rgb"], p["labels_rgb"], p["feats_ir"], p["labels_ir"], p["proxies_rgb"],
    p["proxies_ir"], p["bank_rgb"] if bank_rgb is _FROM_PROBLEM else bank_rgb,
    p["bank_ir"] if bank_ir is _FROM_PROBLEM else bank_ir, **kw,
  )


def test_unidirectional_with_memory_matches_naive():
  p = _problem(10, bank=3)
  out = jax.jit(lambda q: _uni(q))(p)
  heads = p["proxies_rgb"].shape[0]
  refs_rgb = [_memory_list(p["proxies_rgb"][h], p["bank_rgb"][:, h]) for h in range(heads)]
  refs_ir = [_memory_list(p["proxies_ir"][h], p["bank_ir"][:, h]) for h in range(heads)]
  np.testing.assert_allclose(
    out["ir_to_rgb"], _np_proxy_term(p["feats_ir"], p["labels_ir"], refs_rgb), rtol=RTOL
  )
  np.testing.assert_allclose(
    out["rgb_to_ir"], _np_proxy_term(p["feats_rgb"], p["labels_rgb"], refs_ir), rtol=RTOL
  )


def test_unidirectional_without_memory_is_plain_formula():
  p = _problem(11)
  heads, classes, dim = p["proxies_rgb"].shape
  none = _uni(p, bank_rgb=None, bank_ir=None)
  empty = np.zeros((0, heads, classes, dim), np.float32)
  k0 = _uni(p, bank_rgb=empty, bank_ir=empty)
  refs_rgb = [_class_list(p["proxies_rgb"][h]) for h in range(heads)]
  refs_ir = [_class_list(p["proxies_ir"][h]) for h in range(heads)]
  expected = {
    "ir_to_rgb": _np_proxy_term(p["feats_ir"], p["labels_ir"], refs_rgb),
    "rgb_to_ir": _np_proxy_term(p["feats_rgb"], p["labels_rgb"], refs_ir),
  }
  for key, value in expected.items():
    np.testing.assert_allclose(none[key], value, rtol=RTOL)
    np.testing.assert_allclose(k0[key], none[key], rtol=1e-6)
  # §5.3's L_{I→V} is §5.2's IR half with the RGB proxies in place of the IR ones.
  swapped = _ms(
    p["feats_rgb"], p["labels_rgb"], p["feats_ir"], p["labels_ir"], p["proxies_ir"],
    p["proxies_rgb"],
  )
  np.testing.assert_allclose(none["ir_to_rgb"] + none["rgb_to_ir"], swapped, rtol=1e-6)


def test_memory_of_current_proxies_is_duplicated_references():
  # Every slot equal to the current proxies: K+1 identical positives per class.
  p = _problem(12, bank=4)
  p["bank_rgb"] = np.broadcast_to(_unit(p["proxies_rgb"]), p["bank_rgb"].shape).astype(np.float32)
  p["bank_ir"] = np.broadcast_to(_unit(p["proxies_ir"]), p["bank_ir"].shape).astype(np.float32)
  out = _uni(p)
  heads = p["proxies_rgb"].shape[0]
  dup_rgb = [_class_list(p["proxies_rgb"][h]) * 5 for h in range(heads)]
  np.testing.assert_allclose(
    out["ir_to_rgb"], _np_proxy_term(p["feats_ir"], p["labels_ir"], dup_rgb), rtol=RTOL
  )
  # Duplicating references changes Circle loss (log(K+1) inside each LSE), so this is not the
  # K = 0 value: check that the bank is really used.
  plain = _uni(p, bank_rgb=None, bank_ir=None)
  assert abs(float(out["ir_to_rgb"]) - float(plain["ir_to_rgb"])) > 1e-3


def test_ref_valid_drops_classes_in_every_slot():
  p = _problem(13, bank=2)
  classes = p["proxies_rgb"].shape[1]
  valid = np.arange(classes) != 2
  p["labels_ir"] = np.where(p["labels_ir"] == 2, 0, p["labels_ir"])
  out = _uni(p, ref_valid_rgb=valid)
  heads = p["proxies_rgb"].shape[0]
  refs = [_memory_list(p["proxies_rgb"][h], p["bank_rgb"][:, h]) for h in range(heads)]
  np.testing.assert_allclose(
    out["ir_to_rgb"], _np_proxy_term(p["feats_ir"], p["labels_ir"], refs, ref_valid=valid),
    rtol=RTOL,
  )


# Gradient flow, spec §5.7: one test per row of the table.


def _ms_args(p):
  return (p["feats_rgb"], p["labels_rgb"], p["feats_ir"], p["labels_ir"], p["proxies_rgb"],
          p["proxies_ir"])


def test_grad_flow_ms_proxy():
  p = _problem(14)
  # RGB half only (IR labels -1: no positive, zero IR rows): W^I gets exactly nothing.
  q = dict(p, labels_ir=np.full_like(p["labels_ir"], -1))
  g_rgb_half = jax.jit(jax.grad(losses.ms_proxy_loss, argnums=(0, 2, 4, 5)))(*_ms_args(q))
  assert np.abs(g_rgb_half[0]).max() > 0 and np.abs(g_rgb_half[2]).max() > 0
  np.testing.assert_array_equal(g_rgb_half[3], 0.0)  # W^I
  np.testing.assert_array_equal(g_rgb_half[1], 0.0)  # IR features
  # IR half only.
  q = dict(p, labels_rgb=np.full_like(p["labels_rgb"], -1))
  g_ir_half = jax.jit(jax.grad(losses.ms_proxy_loss, argnums=(0, 2, 4, 5)))(*_ms_args(q))
  assert np.abs(g_ir_half[1]).max() > 0 and np.abs(g_ir_half[3]).max() > 0
  np.testing.assert_array_equal(g_ir_half[2], 0.0)  # W^V
  # Full loss: W^V's gradient is the RGB half's, W^I's the IR half's.
  g_full = jax.jit(jax.grad(losses.ms_proxy_loss, argnums=(4, 5)))(*_ms_args(p))
  np.testing.assert_allclose(g_full[0], g_rgb_half[2], rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(g_full[1], g_ir_half[3], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("direction,own,other", [("ir_to_rgb", "ir", "rgb"),
                                                 ("rgb_to_ir", "rgb", "ir")])
def test_grad_flow_unidirectional(direction, own, other):
  p = _problem(15, bank=2)
  names = ["feats_rgb", "feats_ir", "proxies_rgb", "proxies_ir", "bank_rgb", "bank_ir"]

  def grads(stop_gradient):
    def term(*arrays):
      return _uni(dict(p, **dict(zip(names, arrays))), stop_gradient=stop_gradient)[direction]
    grad_fn = jax.jit(jax.grad(term, argnums=tuple(range(6))))
    return dict(zip(names, grad_fn(*(p[k] for k in names))))

  g = grads(True)
  assert np.abs(g[f"feats_{own}"]).max() > 0  # backbone through its own features
  for key in (f"feats_{other}", "proxies_rgb", "proxies_ir", "bank_rgb", "bank_ir"):
    np.testing.assert_array_equal(g[key], 0.0, err_msg=key)
  # Bidirectional control (§9): the counterpart proxies learn, banks still do not.
  g = grads(False)
  assert np.abs(g[f"proxies_{other}"]).max() > 0
  for key in (f"proxies_{own}", "bank_rgb", "bank_ir", f"feats_{other}"):
    np.testing.assert_array_equal(g[key], 0.0, err_msg=key)


def test_maum_terms_finite_grads_and_x64_check_grads():
  p = _problem(16, n_rgb=3, n_ir=3, heads=2, classes=3, dim=4, bank=1)
  with jax.enable_x64(True):
    q = {k: jnp.asarray(v, jnp.float64 if v.dtype.kind == "f" else jnp.int64)
         for k, v in p.items()}
    # norm_softmax has no stop-gradient inside, so finite differences apply directly.
    check_grads(
      jax.jit(lambda fr, fi, pr, pi: losses.ms_proxy_loss(
        fr, q["labels_rgb"], fi, q["labels_ir"], pr, pi, metric="norm_softmax", scale=4.0)),
      (q["feats_rgb"], q["feats_ir"], q["proxies_rgb"], q["proxies_ir"]), order=1,
      modes=["rev"],
    )
    check_grads(
      jax.jit(lambda fr, fi: sum(losses.unidirectional_loss(
        fr, q["labels_rgb"], fi, q["labels_ir"], q["proxies_rgb"], q["proxies_ir"],
        q["bank_rgb"], q["bank_ir"], metric="norm_softmax", scale=4.0).values())),
      (q["feats_rgb"], q["feats_ir"]), order=1, modes=["rev"],
    )
  # Circle, float32: coinciding features and proxies (ties) still give finite gradients.
  p["feats_ir"][:] = p["proxies_rgb"][0, 0]
  g = jax.jit(jax.grad(lambda f: _uni(dict(p, feats_ir=f))["ir_to_rgb"]))(p["feats_ir"])
  assert np.all(np.isfinite(g))
