"""The SYSU-MM01 and RegDB test protocols over features (all settings, all trials).

SYSU-MM01 (protocol.md §1.6-1.8): infrared queries (cams 3, 6) against visible galleries
drawn per trial from the test identities' visible images: all-search (cams 1, 2, 4, 5) or
indoor (cams 1, 2), single-shot (one image per identity and camera) or multi-shot (ten),
10 trials each. Query features and gallery-pool features are computed once; every trial's
gallery is a list of rows of the one query-pool distance table, and all trials of a setting are
ranked in one compiled call (`maumjax.eval.metrics.rank_metrics_batch`), without extra
distances or sorting.

RegDB (§2.5): visible->thermal and thermal->visible on the test split of one trial.

Results are per-trial `Metrics` plus mean +/- std over trials; `format_table` prints them and
`results_to_json` serialises them with the settings that make a number comparable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from maumjax.eval import metrics as metrics_lib

SYSU_MODES = ("all", "indoor")
SYSU_SHOTS = (1, 10)
METRIC_KEYS = ("r1", "r5", "r10", "r20", "mAP", "mINP")
# The `"units"` label of every JSON file with metric values: `Metrics` and `results_to_json`
# hold fractions in [0, 1]; files meant for reading (metrics.json) hold percent.
UNITS_FRACTION = "fraction"
UNITS_PERCENT = "percent"


def setting_name(mode: str, shot: int) -> str:
  return f"{mode}/{'single' if shot == 1 else 'multi'}"


@dataclasses.dataclass(frozen=True)
class SettingResult:
  """One protocol setting: its per-trial metrics and their mean and std.

  Attributes:
    setting: e.g. 'all/single', 'indoor/multi', 'visible->thermal'.
    trials: per-trial `Metrics`, in trial order.
  """

  setting: str
  trials: tuple[metrics_lib.Metrics, ...]

  def values(self, key: str) -> np.ndarray:
    return np.array([getattr(m, key) for m in self.trials], np.float64)

  def mean(self, key: str) -> float:
    return float(self.values(key).mean())

  def std(self, key: str) -> float:
    return float(self.values(key).std())

  def mean_cmc(self) -> np.ndarray:
    return np.mean([m.cmc for m in self.trials], axis=0)

  def as_dict(self) -> dict[str, Any]:
    return {"setting": self.setting,
            "mean": {k: self.mean(k) for k in METRIC_KEYS},
            "std": {k: self.std(k) for k in METRIC_KEYS},
            "cmc_mean": self.mean_cmc().tolist(),
            "trials": [m.as_dict() for m in self.trials]}


def sysu_protocol_from_features(query_feats, query_ids, query_cams, pool_feats, pool_ids,
                                pool_cams, galleries: Mapping[str, Sequence[np.ndarray]], *,
                                max_rank: int = 20, distance: str = "cosine"
                                ) -> dict[str, list[metrics_lib.Metrics]]:
  """Runs SYSU settings whose trial galleries are index lists into a gallery pool.

  Args:
    query_feats: [Q, D] query features (infrared test images).
    query_ids, query_cams: [Q] identities and SYSU cameras of the queries.
    pool_feats: [N, D] features of the gallery pool (visible test images).
    pool_ids, pool_cams: [N] identities and cameras of the pool.
    galleries: setting name -> one int array per trial: the pool indices of that trial's
      gallery, in gallery order (which decides ties).
    max_rank: CMC length.
    distance: 'cosine' (L2-normalised features) or 'euclidean' (squared, unnormalised);
      `maumjax.eval.metrics.distance_rows`.

  Returns:
    setting -> per-trial Metrics (cam-3 queries ignore cam-2 images; deduplicated CMC).
  """
  dist_rows = metrics_lib.distance_rows(pool_feats, query_feats, distance)
  pool_ids, pool_cams = np.asarray(pool_ids), np.asarray(pool_cams)
  q_excl = np.asarray(query_cams) == metrics_lib.SYSU_EXCLUDED[0]
  out = {}
  for setting, trials in galleries.items():
    # One compiled call per setting: every trial of a setting has the same gallery size.
    rows = np.stack([np.asarray(t) for t in trials])
    out[setting] = metrics_lib.rank_metrics_batch(
        dist_rows, rows, query_ids, pool_ids[rows], query_excluded=q_excl,
        gallery_excluded=pool_cams[rows] == metrics_lib.SYSU_EXCLUDED[1], dedup=True,
        max_rank=max_rank)
  return out


def regdb_protocol_from_features(visible_feats, visible_ids, thermal_feats, thermal_ids, *,
                                 max_rank: int = 20, distance: str = "cosine",
                                 dedup: bool = False) -> dict[str, metrics_lib.Metrics]:
  """Both RegDB directions of one trial (no camera rule; plain CMC unless `dedup`).

  `distance` and `dedup` as `maumjax.eval.metrics.evaluate_regdb`.
  """
  kw = dict(max_rank=max_rank, distance=distance, dedup=dedup)
  return {
      "visible->thermal": metrics_lib.evaluate_regdb(visible_feats, visible_ids, thermal_feats,
                                                     thermal_ids, **kw),
      "thermal->visible": metrics_lib.evaluate_regdb(thermal_feats, thermal_ids, visible_feats,
                                                     visible_ids, **kw),
  }


def format_table(results: Sequence[SettingResult], *, title: str = "") -> str:
  """A terminal table: one row per setting, mean +/- std in percent over trials."""
  head = f"{'setting':<18} {'trials':>6} " + " ".join(f"{k:>13}" for k in METRIC_KEYS)
  lines = [title] if title else []
  lines += [head, "-" * len(head)]
  for res in results:
    cells = []
    for k in METRIC_KEYS:
      cells.append(f"{100 * res.mean(k):6.2f}±{100 * res.std(k):5.2f}" if len(res.trials) > 1
                   else f"{100 * res.mean(k):13.2f}")
    lines.append(f"{res.setting:<18} {len(res.trials):>6} " + " ".join(f"{c:>13}" for c in cells))
  return "\n".join(lines)


def results_to_json(results: Sequence[SettingResult], **record: Any) -> dict[str, Any]:
  """JSON-ready dict: `record` (dataset, sampler, feature, ...) plus every setting.

  Metric values (r1 ... mINP, their means and stds, the CMC curves) are fractions in [0, 1], as
  `Metrics` holds them; the dict says so in its first entry, `"units": "fraction"`. Counts
  (`num_valid`, `queries`, ...) are plain numbers.
  """
  return {"units": UNITS_FRACTION, **record, "settings": [r.as_dict() for r in results]}
