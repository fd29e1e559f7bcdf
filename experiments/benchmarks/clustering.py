"""One MMM re-clustering (k-reciprocal Jaccard distance + DBSCAN) at SYSU-MM01 sizes: maumjax's
`maumjax.cluster` against a straightforward NumPy implementation of the same encoding.

  python -m experiments.benchmarks.clustering [--sizes=11909,22258,34167] [--reference_max=22258]
  python -m experiments.benchmarks.clustering --smoke     # seconds, small N and D

Sizes (mmm.md §5): 11,909 infrared and 22,258 visible training images (per-modality clustering,
k1 = 30, k2 = 6) and 34,167 both together (the modality-aware joint clustering, k1 = 40,
k2 = 32, the first 22,258 rows visible). Features: 2048-d, random but clustered (one random
centre per pseudo-identity of 20 images plus noise, L2-normalised), the same for both sides.

The reference is what a direct NumPy reading of the encoding does (the reference scripts' own
structure without faiss): an N x N distance matrix by one matrix product, argpartition for the
k1 neighbours, the reciprocal sets and expansion row by row in Python, a dense V and a dense
query-expanded V, an inverted index of V's columns, and the Jaccard rows accumulated from it.
maumjax: the kNN blockwise on the JAX device, V sparse, the min-sum over sparse rows by blocks
(module docstring of `maumjax.cluster`). DBSCAN (scikit-learn, eps 0.6, min_samples 4) runs on
each side's distance: the dense matrix on the reference side, the sparse pairs under eps
(`cluster.pseudo_labels`) on maumjax's.

Each (side, N) runs in its own child process, so its peak resident memory (`ru_maxrss`) is its
own. The parent checks that both sides give the same distances (max |difference| over 256
sampled rows) and the same DBSCAN labels, then prints a table and one JSON line with the
speed-ups of the Jaccard step and of the whole re-clustering (Jaccard + DBSCAN), and maumjax's
exact kNN timed on its own (`fast_knn_s`, a part of `fast_jaccard_s`). The reference
holds up to four N x N float32/int64 arrays at once, so it is skipped above `--reference_max`
(at 34,167 it would need about 19 GB).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments.benchmarks import report

_SIZES = flags.DEFINE_list("sizes", ["11909", "22258", "34167"], "Numbers of images N.")
_DIM = flags.DEFINE_integer("dim", 2048, "Feature dimension.")
_REFERENCE_MAX = flags.DEFINE_integer("reference_max", 22258,
                                      "Largest N the NumPy reference runs at.")
_EPS = flags.DEFINE_float("eps", 0.6, "DBSCAN eps (MMM's SYSU value).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the features.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Sizes 300 / 560 / 860 at 64-d (seconds; tests).")
_CHILD = flags.DEFINE_string("child", "", "Internal: 'fast:N' or 'reference:N'.")
_OUT = flags.DEFINE_string("out", "", "Internal: the child's output folder.")

JOINT_VISIBLE = {34167: 22258, 860: 560}  # joint sizes and their visible part
SAMPLE_ROWS = 256


def settings(n: int) -> dict:
  """k1, k2 and the modality mask of a size (joint sizes: the modality-aware version)."""
  if n in JOINT_VISIBLE:
    return {"k1": 40, "k2": 32, "modality": np.arange(n) >= JOINT_VISIBLE[n]}
  return {"k1": 30, "k2": 6, "modality": None}


def features(n: int, dim: int, seed: int) -> np.ndarray:
  """Clustered random features: a centre per 20 images, noise, L2-normalised (float32)."""
  rng = np.random.default_rng(seed)
  ids = max(n // 20, 2)
  centres = rng.normal(size=(ids, dim)).astype(np.float32)
  x = centres[rng.integers(0, ids, n)] + 0.9 * rng.normal(size=(n, dim)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def reference_jaccard(feats: np.ndarray, *, k1: int, k2: int,
                      modality: np.ndarray | None = None) -> np.ndarray:
  """The encoding with dense NumPy arrays and per-row Python loops (see the module docstring)."""
  n = feats.shape[0]
  sq = np.sum(feats * feats, axis=1)
  dist = sq[:, None] + sq[None, :] - 2.0 * (feats @ feats.T)
  part = np.argpartition(dist, k1 - 1, axis=1)[:, :k1]
  order = np.argsort(np.take_along_axis(dist, part, axis=1), axis=1, kind="stable")
  rank = np.take_along_axis(part, order, axis=1)
  del dist, part, order

  def recip(i, k):
    fwd = rank[i, :k + 1]
    back = rank[fwd, :k + 1]
    return fwd[np.where(back == i)[0]]

  half = int(np.around(k1 / 2))
  nn_k1 = [recip(i, k1) for i in range(n)]
  nn_half = [recip(i, half) for i in range(n)]
  v = np.zeros((n, n), np.float32)
  for i in range(n):
    r = nn_k1[i]
    exp = r
    for c in r:
      rc = nn_half[c]
      if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
        exp = np.append(exp, rc)
    exp = np.unique(exp)
    d = 2.0 - 2.0 * (feats[exp] @ feats[i])
    w = np.exp(-d - np.max(-d))
    v[i, exp] = w / w.sum()
  if k2 > 1:
    vq = np.zeros_like(v)
    for i in range(n):
      nb = rank[i, :k2]
      if modality is None:
        vq[i] = v[nb].mean(0)
      else:
        parts = [v[nb[modality[nb] == m]].mean(0) for m in (False, True)
                 if np.any(modality[nb] == m)]
        vq[i] = np.mean(parts, axis=0)
    v = vq
    del vq
  inv = [np.where(v[:, k] != 0)[0] for k in range(n)]
  out = np.zeros((n, n), np.float32)
  for i in range(n):
    temp = np.zeros(n, np.float32)
    nz = np.where(v[i] != 0)[0]
    for k in nz:
      temp[inv[k]] += np.minimum(v[i, k], v[inv[k], k])
    out[i] = 1.0 - temp / (2.0 - temp)
  np.maximum(out, 0.0, out=out)
  return out


def _child(spec: str, out: Path) -> None:
  side, n = spec.split(":")
  n = int(n)
  feats = features(n, _DIM.value, _SEED.value)
  s = settings(n)
  t0 = time.perf_counter()
  if side == "fast":
    from maumjax import cluster

    dist = cluster.jaccard_distance(feats, k1=s["k1"], k2=s["k2"], modality=s["modality"])
  else:
    dist = reference_jaccard(feats, k1=s["k1"], k2=s["k2"], modality=s["modality"])
  t1 = time.perf_counter()
  if side == "fast":  # the pairs under eps, sparse
    labels = cluster.pseudo_labels(dist, eps=_EPS.value)
  else:  # scikit-learn on the dense matrix, as a reference script does
    from sklearn.cluster import DBSCAN

    labels = DBSCAN(eps=_EPS.value, min_samples=4, metric="precomputed").fit_predict(dist)
  t2 = time.perf_counter()
  rows = np.random.default_rng(1).choice(n, min(SAMPLE_ROWS, n), replace=False)
  np.save(out / "rows.npy", dist[rows])
  np.save(out / "labels.npy", labels)
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
  result = {"jaccard_s": round(t1 - t0, 2), "dbscan_s": round(t2 - t1, 2),
            "peak_rss_gib": round(peak_gb, 2), "clusters": int(labels.max()) + 1,
            "outliers": float(np.mean(labels < 0))}
  if side == "fast":  # the exact kNN alone (part of jaccard_s), timed again after the peak
    del dist
    t3 = time.perf_counter()
    cluster.knn(feats, s["k1"])
    result["knn_s"] = round(time.perf_counter() - t3, 2)
  print(json.dumps(result))


def _run_child(side: str, n: int, out: Path) -> dict:
  out.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "experiments.benchmarks.clustering", f"--child={side}:{n}",
         f"--out={out}", f"--dim={_DIM.value}", f"--seed={_SEED.value}", f"--eps={_EPS.value}"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"{side} at N={n} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CHILD.value:
    _child(_CHILD.value, Path(_OUT.value))
    return
  sizes = [300, 560, 860] if _SMOKE.value else [int(s) for s in _SIZES.value]
  if _SMOKE.value:
    flags.FLAGS.dim = 64
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for n in sizes:
      fast = _run_child("fast", n, Path(tmp) / f"fast{n}")
      result = {"benchmark": "clustering", "commit": report.commit(), "n": n,
                "dim": _DIM.value, "k1": settings(n)["k1"], "k2": settings(n)["k2"],
                "joint": settings(n)["modality"] is not None, "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "python": platform.python_version()}
      result.update({f"fast_{k}": v for k, v in fast.items()})
      if n <= _REFERENCE_MAX.value:
        ref = _run_child("reference", n, Path(tmp) / f"ref{n}")
        result.update({f"reference_{k}": v for k, v in ref.items()})
        a = np.load(Path(tmp) / f"fast{n}" / "rows.npy")
        b = np.load(Path(tmp) / f"ref{n}" / "rows.npy")
        result["max_abs_diff"] = float(np.max(np.abs(a - b)))
        result["same_labels"] = bool(np.array_equal(np.load(Path(tmp) / f"fast{n}/labels.npy"),
                                                    np.load(Path(tmp) / f"ref{n}/labels.npy")))
        result["speedup_jaccard"] = round(ref["jaccard_s"] / max(fast["jaccard_s"], 1e-9), 2)
        result["speedup_total"] = round((ref["jaccard_s"] + ref["dbscan_s"])
                                        / max(fast["jaccard_s"] + fast["dbscan_s"], 1e-9), 2)
        result["memory_ratio"] = round(fast["peak_rss_gib"] / ref["peak_rss_gib"], 3)
      report.emit(result)
      results.append(result)


if __name__ == "__main__":
  app.run(main)
