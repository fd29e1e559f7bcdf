"""SYSU-MM01 evaluation speed: maumjax's jitted protocol vs a per-query NumPy loop.

  python -m experiments.benchmarks.evaluation [--dim=2048] [--trials=10] [--skip_naive]

Both implementations run the full protocol at the real sizes (3,803 infrared queries; gallery
pool of 6,775 visible test images; all/indoor x single/multi-shot galleries of 301 / 3,010 /
112 / 1,120 images; 10 trials each) on the same random features and gallery draws, in one run,
and must give identical numbers. The naive side is what a reference script does: for every
trial one NumPy distance matrix, then a Python loop over queries (stable argsort, camera
filter, deduplicated CMC, AP, INP). The fast side computes the query-pool distances once and
ranks every trial gallery as rows of that table (`maumjax.eval.protocol`). The fast side is
compiled first and timed as the median of `--repeats` runs (a real evaluation loop reuses the
compiled program); the naive side runs once. Prints a table and one JSON line with both times
and their ratio.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
from absl import app, flags

from experiments.benchmarks import report

_DIM = flags.DEFINE_integer("dim", 2048, "Feature dimension.")
_TRIALS = flags.DEFINE_integer("trials", 10, "Trials per setting.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the features and gallery draws.")
_SKIP_NAIVE = flags.DEFINE_bool("skip_naive", False, "Time only the jitted protocol.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of the fast path (median reported).")
_SCALE = flags.DEFINE_float("scale", 1.0, "Shrink every count by this factor (smoke tests).")

# Real SYSU-MM01 test-set structure (protocol.md §1.4): images per camera for the 96 test ids.
_GALLERY_CAMS = {1: (56, 1374), 2: (56, 1565), 4: (94, 1918), 5: (95, 1918)}
_QUERY_CAMS = {3: (93, 1883), 6: (96, 1920)}
_NUM_IDS = 96


def _folders(rng, cams, scale):
  """Image metadata with the real per-camera identity and image counts (scaled)."""
  ids, cam_of, folder = [], [], []
  num_ids = max(4, int(_NUM_IDS * scale))
  for cam, (n_ids, n_img) in cams.items():
    n_ids = max(2, int(n_ids * scale))
    n_img = max(n_ids * 11, int(n_img * scale))
    chosen = np.sort(rng.choice(num_ids, n_ids, replace=False))
    if cam in (1, 2):  # cams 1 and 2 see the same identities (the indoor ones)
      chosen = np.arange(n_ids)
    counts = np.full(n_ids, n_img // n_ids)
    counts[: n_img % n_ids] += 1
    for i, c in zip(chosen, counts):
      ids += [i] * c
      cam_of += [cam] * c
      folder += [(cam, i)] * c
  return np.array(ids), np.array(cam_of), folder


def _draw(rng, folder, cams, shots):
  """One trial's gallery: `shots` random images per (identity, camera) folder of `cams`."""
  by_folder = {}
  for idx, f in enumerate(folder):
    if f[0] in cams:
      by_folder.setdefault(f, []).append(idx)
  return np.concatenate([rng.choice(v, shots, replace=False) for _, v in sorted(by_folder.items())])


def naive_protocol(q_feats, q_ids, q_cams, g_feats, g_ids, g_cams, galleries):
  """Per-query NumPy reference of the whole protocol; returns {setting: [per-trial dicts]}."""
  out = {}
  for setting, trials in galleries.items():
    rows = []
    for idx in trials:
      dist = -(q_feats @ g_feats[idx].T)
      cmc_all, aps, inps = [], [], []
      for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        order = order[~((q_cams[i] == 3) & (g_cams[idx][order] == 2))]
        ids = g_ids[idx][order]
        hit = ids == q_ids[i]
        if not hit.any():
          continue
        ranks = np.flatnonzero(hit) + 1
        aps.append(np.mean(np.arange(1, ranks.size + 1) / ranks))
        inps.append(ranks.size / ranks[-1])
        _, first = np.unique(ids, return_index=True)
        p = int(np.flatnonzero(ids[np.sort(first)] == q_ids[i])[0]) + 1
        cmc_all.append(np.arange(1, min(20, len(idx)) + 1) >= p)
      cmc = np.mean(cmc_all, axis=0)
      # Past the end of a short curve the last value holds (all positives found).
      rows.append({"r1": cmc[0], "r10": cmc[min(9, len(cmc) - 1)], "mAP": np.mean(aps),
                   "mINP": np.mean(inps)})
    out[setting] = rows
  return out


def main(argv):
  del argv
  import jax

  from maumjax import compilation_cache
  from maumjax.eval import protocol

  compilation_cache.enable()
  rng = np.random.default_rng(_SEED.value)
  scale = _SCALE.value
  g_ids, g_cams, g_folder = _folders(rng, _GALLERY_CAMS, scale)
  q_ids, q_cams, _ = _folders(rng, _QUERY_CAMS, scale)
  dim = _DIM.value
  q_feats = rng.standard_normal((len(q_ids), dim)).astype(np.float32)
  g_feats = rng.standard_normal((len(g_ids), dim)).astype(np.float32)
  q_feats /= np.linalg.norm(q_feats, axis=1, keepdims=True)
  g_feats /= np.linalg.norm(g_feats, axis=1, keepdims=True)
  galleries = {}
  for mode, cams in (("all", (1, 2, 4, 5)), ("indoor", (1, 2))):
    for shots, name in ((1, "single"), (10, "multi")):
      galleries[f"{mode}/{name}"] = [_draw(rng, g_folder, cams, shots)
                                     for _ in range(_TRIALS.value)]

  def fast():
    return protocol.sysu_protocol_from_features(
        q_feats, q_ids, q_cams, g_feats, g_ids, g_cams, galleries)

  fast()  # compile once (shapes are fixed per setting), as a real evaluation loop would
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    fast_result = jax.block_until_ready(fast())
    times.append(time.perf_counter() - t0)
  fast_s = float(np.median(times))
  result = {
      "benchmark": "evaluation_sysu",
      "device": f"{jax.devices()[0].platform}:{os.cpu_count()} cores "
                f"({platform.processor() or platform.machine()})",
      "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
      "commit": report.commit(), "dtype": "float32", "dim": dim, "queries": len(q_ids),
      "gallery_pool": len(g_ids), "trials": _TRIALS.value,
      "gallery_sizes": {k: int(len(v[0])) for k, v in galleries.items()},
      "fast_s": round(fast_s, 3), "fast_s_min": round(min(times), 3),
  }
  if not _SKIP_NAIVE.value:
    t0 = time.perf_counter()
    naive = naive_protocol(q_feats, q_ids, q_cams, g_feats, g_ids, g_cams, galleries)
    naive_s = time.perf_counter() - t0
    worst = 0.0
    for setting, rows in naive.items():
      for trial, row in enumerate(rows):
        got = fast_result[setting][trial]
        for key in ("r1", "r10", "mAP", "mINP"):
          worst = max(worst, abs(float(getattr(got, key)) - float(row[key])))
    result.update({"naive_s": round(naive_s, 3), "speedup": round(naive_s / fast_s, 1),
                   "max_abs_diff": worst})
  report.emit(result)


if __name__ == "__main__":
  app.run(main)
