"""NumPy references of the proxy metrics and MAUM terms, written from the spec formulas
with per-row / per-head Python loops (maum.md §4, §5); shared by test_metric and test_proxy."""

from __future__ import annotations

import numpy as np


def lse(x):
  x = np.asarray(x, np.float64)
  mx = x.max()
  return mx + np.log(np.exp(x - mx).sum())


def circle_row(sims, pos, gamma, margin, alpha_sims=None):
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
  return float(np.logaddexp(0.0, lse(ln) + lse(lp)))


def circle(sim, pos, valid=None, *, gamma, margin):
  valid = np.ones_like(pos) if valid is None else valid
  out = []
  for i in range(sim.shape[0]):
    keep = valid[i]
    out.append(circle_row(sim[i][keep], pos[i][keep], gamma, margin))
  return np.array(out)


def norm_softmax(sim, pos, valid=None, *, scale):
  valid = np.ones_like(pos) if valid is None else valid
  out = []
  for i in range(sim.shape[0]):
    num = [scale * s for s, p, v in zip(sim[i], pos[i], valid[i]) if p and v]
    den = [scale * s for s, v in zip(sim[i], valid[i]) if v]
    out.append(0.0 if not num else lse(den) - lse(num))
  return np.array(out)


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def proxy_term(feats, labels, ref_list, *, gamma=64.0, margin=0.25, head_reduce="sum",
                   ref_valid=None):
  """mean_i Σ_h ℓ(f_ih; R⁺, R⁻) with ref_list[h] = [(ref_vector, class_id), ...] per head."""
  n, h = feats.shape[:2]
  total = 0.0
  for i in range(n):
    per_head = []
    for k in range(h):
      f = unit(feats[i, k])
      sims, pos = [], []
      for ref, c in ref_list[k]:
        if ref_valid is not None and not ref_valid[c]:
          continue
        sims.append(float(f @ unit(ref)))
        pos.append(c == labels[i])
      per_head.append(circle_row(sims, pos, gamma, margin))
    total += sum(per_head) if head_reduce == "sum" else np.mean(per_head)
  return total / n


def class_list(proxies_h):
  return [(proxies_h[c], c) for c in range(proxies_h.shape[0])]


def memory_list(proxies_h, bank_h):
  """Current proxies plus every bank slot, as references (spec §5.4: K+1 per class)."""
  refs = class_list(proxies_h)
  for t in range(0 if bank_h is None else bank_h.shape[0]):
    refs += class_list(bank_h[t])
  return refs


def problem(seed=0, *, n_rgb=6, n_ir=5, heads=3, classes=4, dim=8, bank=2):
  rng = np.random.default_rng(seed)

  def f(*s):
    return rng.normal(size=s).astype(np.float32)

  return {
    "feats_rgb": f(n_rgb, heads, dim), "labels_rgb": rng.integers(0, classes, n_rgb),
    "feats_ir": f(n_ir, heads, dim), "labels_ir": rng.integers(0, classes, n_ir),
    "proxies_rgb": f(heads, classes, dim), "proxies_ir": f(heads, classes, dim),
    "bank_rgb": unit(f(bank, heads, classes, dim)).astype(np.float32),
    "bank_ir": unit(f(bank, heads, classes, dim)).astype(np.float32),
  }
