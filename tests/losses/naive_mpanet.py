"""NumPy references of the MPANet losses, written from the spec formulas with Python loops
(mpanet.md §4.2, §4.3, §4.5), in float64; used by test_center, test_pattern and test_distill."""

from __future__ import annotations

import numpy as np


def center_cluster(feats, labels, *, margin=0.7, push_weighting="pairs"):
  """pull + push; `push_weighting='samples'` is the per-sample variant the tests rule out."""
  feats = np.asarray(feats, np.float64)
  labels = [int(y) for y in labels]
  ids = sorted(set(labels))
  centre = {c: feats[[i for i, y in enumerate(labels) if y == c]].mean(axis=0) for c in ids}
  pull = sum(np.sqrt(np.sum((feats[i] - centre[y]) ** 2)) for i, y in enumerate(labels))
  pull /= len(labels)

  def hinge(c, d):
    return max(margin - np.sqrt(max(np.sum((centre[c] - centre[d]) ** 2), 1e-12)), 0.0)

  if push_weighting == "pairs":
    terms = [hinge(c, d) for c in ids for d in ids if c != d]
  else:  # every sample as an anchor, averaged over the negative samples
    terms = [np.mean([hinge(y, z) for z in labels if z != y]) for y in labels if len(ids) > 1]
  push = float(np.mean(terms)) if terms else 0.0
  return pull + push


def pattern_separation(maps):
  """maps [B, H, W, l]: Σ_b Σ_{i<j} Σ_{h,w} m_bhwi m_bhwj / (B · l(l−1)/2)."""
  maps = np.asarray(maps, np.float64)
  b, h, w, n = maps.shape
  total = 0.0
  for s in range(b):
    for i in range(n):
      for j in range(i + 1, n):
        for y in range(h):
          for x in range(w):
            total += maps[s, y, x, i] * maps[s, y, x, j]
  return total / (b * n * (n - 1) / 2)


def log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max()
  return z - np.log(np.exp(z).sum())


def mutual_mean_kl(student, teacher, direction="student_teacher"):
  """(1/B) Σ_i KL(p^s_i ‖ p^t_i) ('student_teacher') or KL(p^t_i ‖ p^s_i) ('teacher_student')."""
  rows = []
  for zs, zt in zip(student, teacher):
    ls, lt = log_softmax(zs), log_softmax(zt)
    if direction == "student_teacher":
      rows.append(sum(np.exp(a) * (a - b) for a, b in zip(ls, lt)))
    else:
      rows.append(sum(np.exp(b) * (b - a) for a, b in zip(ls, lt)))
  return float(np.mean(rows))
