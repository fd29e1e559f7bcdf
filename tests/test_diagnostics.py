"""Tests of maumjax.diagnostics: pseudo-label metrics, history reading and plotting."""

import collections
import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from maumjax import diagnostics
from maumjax.diagnostics import (correspondence_accuracy, jsonable, label_metrics,
                                 plot_history, read_history, report)
from maumjax.train.writers import MetricWriter

# --- label_metrics -----------------------------------------------------------------------------


def test_label_metrics_hand_case():
  truth = np.array([0, 0, 0, 1, 1, 1, 2, 2])
  pred = np.array([0, 0, 7, 7, 7, -1, -1, 9])  # label 0 is a cluster, not an outlier
  m = label_metrics(pred, truth)
  assert m["clusters"] == 3  # 0, 7, 9
  assert m["outlier_fraction"] == pytest.approx(2 / 8)
  # Non-outliers: cluster 0 = ids {0, 0} -> 2; cluster 7 = {0, 1, 1} -> 2; cluster 9 = {2} -> 1.
  assert m["purity"] == pytest.approx(5 / 6)
  assert m["num"] == 8
  assert isinstance(m["clusters"], int) and isinstance(m["num"], int)
  assert set(m) == {"ari", "nmi", "clusters", "outlier_fraction", "purity", "num"}


def test_ari_nmi_of_relabelled_truth_is_one():
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 12, size=200)
  perm = rng.permutation(1000)[:12] + 3  # a relabelling: different numbers, same partition
  m = label_metrics(perm[truth], truth)
  assert m["ari"] == pytest.approx(1.0)
  assert m["nmi"] == pytest.approx(1.0)
  assert m["purity"] == pytest.approx(1.0)
  assert m["clusters"] == 12 and m["outlier_fraction"] == 0.0


def test_outliers_count_as_one_cluster_hand_values():
  # Outliers holding two whole identities: as ONE cluster they merge ids 0 and 1.
  # Pairs: sum_ij C(n_ij, 2) = 3, truth sum = 3, pred sum = C(4,2) + C(2,2) = 7, total C(6,2) = 15:
  # ARI = (3 - 3*7/15) / ((3 + 7)/2 - 3*7/15) = 1.6 / 3.6 = 4/9. Dropping the outliers leaves a
  # single cluster against a single identity: ARI 1.
  truth = np.array([0, 0, 1, 1, 2, 2])
  pred = np.array([-1, -1, -1, -1, 5, 5])
  assert label_metrics(pred, truth)["ari"] == pytest.approx(4 / 9)
  assert adjusted_rand_score(truth[pred >= 0], pred[pred >= 0]) == pytest.approx(1.0)
  # Outliers holding exactly one identity: one cluster gives 1, singletons would give 4/7.
  truth = np.array([0, 0, 1, 1])
  pred = np.array([-1, -1, 1, 1])
  assert label_metrics(pred, truth)["ari"] == pytest.approx(1.0)
  assert adjusted_rand_score(truth, [100, 101, 1, 1]) == pytest.approx(4 / 7)


def test_outlier_convention_against_sklearn_on_converted_arrays():
  rng = np.random.default_rng(1)
  truth = rng.integers(0, 8, size=120)
  pred = truth.copy() + 10
  pred[rng.random(120) < 0.3] = -1
  pred[rng.random(120) < 0.2] = 13  # some merging noise
  m = label_metrics(pred, truth)
  one = np.where(pred < 0, 10_000, pred)  # outliers as one fresh cluster, by hand
  keep = pred >= 0
  assert m["ari"] == pytest.approx(adjusted_rand_score(truth, one))
  assert m["nmi"] == pytest.approx(normalized_mutual_info_score(truth, one))
  dropped = adjusted_rand_score(truth[keep], pred[keep])
  assert abs(m["ari"] - dropped) > 1e-3  # the convention matters on this case


def test_label_metrics_degenerate():
  m = label_metrics([-1, -1, -1], [0, 1, 2])
  assert m["clusters"] == 0 and m["outlier_fraction"] == 1.0 and m["num"] == 3
  assert math.isnan(m["purity"])
  e = label_metrics(np.zeros(0, int), np.zeros(0, int))
  assert e["num"] == 0 and e["clusters"] == 0
  assert math.isnan(e["ari"]) and math.isnan(e["purity"]) and math.isnan(e["outlier_fraction"])
  with pytest.raises(ValueError):
    label_metrics([0, 1], [0, 1, 2])
  with pytest.raises(ValueError):
    label_metrics([0.5, 1.0], [0, 1])


# --- correspondence ----------------------------------------------------------------------------


def test_correspondence_hand_case():
  # IR members: label 10 -> ids {1, 1, 2} (majority 1); 20 -> {3, 4} (tie: 3 and 4);
  # 30 -> {6}; the IR outlier (id 5) belongs to no label.
  ir_pred = np.array([10, 10, 10, 20, 20, -1, 30])
  ir_truth = np.array([1, 1, 2, 3, 4, 5, 6])
  rgb_pred = np.array([10, 10, 20, 20, 40, -1, 30, -1])
  rgb_truth = np.array([1, 2, 4, 9, 1, 1, 6, 5])
  # 10/id1 right; 10/id2 wrong; 20/id4 right (tie); 20/id9 wrong; 40 has no IR member: wrong;
  # outlier left out; 30/id6 right; outlier (id 5, like the IR outlier) left out. 3 of 6.
  assert correspondence_accuracy(rgb_pred, rgb_truth, ir_pred, ir_truth) == pytest.approx(0.5)


def test_correspondence_degenerate():
  assert math.isnan(correspondence_accuracy([-1, -1], [0, 1], [0, 1], [0, 1]))
  assert correspondence_accuracy([0, 1], [0, 1], [-1, -1], [0, 1]) == 0.0
  assert correspondence_accuracy([3, 3, 4], [0, 0, 1], [4, 3], [1, 0]) == 1.0


def _purity_loop(pred, truth):
  clusters = collections.defaultdict(list)
  for p, t in zip(pred.tolist(), truth.tolist()):
    if p >= 0:
      clusters[p].append(t)
  n = sum(len(v) for v in clusters.values())
  if n == 0:
    return float("nan")
  return sum(max(collections.Counter(v).values()) for v in clusters.values()) / n


def _correspondence_loop(rgb_pred, rgb_truth, ir_pred, ir_truth):
  members = collections.defaultdict(collections.Counter)
  for p, t in zip(ir_pred.tolist(), ir_truth.tolist()):
    if p >= 0:
      members[p][t] += 1
  total = right = 0
  for p, t in zip(rgb_pred.tolist(), rgb_truth.tolist()):
    if p < 0:
      continue
    total += 1
    counts = members.get(p)
    if counts and counts[t] == max(counts.values()):
      right += 1
  return right / total if total else float("nan")


@pytest.mark.parametrize("seed", range(6))
def test_purity_and_correspondence_match_loops(seed):
  rng = np.random.default_rng(seed)
  n_ids = int(rng.integers(2, 15))
  nv, nr = int(rng.integers(1, 150)), int(rng.integers(1, 150))
  rgb_truth = rng.integers(0, n_ids, size=nv) * 7 - 20  # sparse, negative ids too
  ir_truth = rng.integers(0, n_ids, size=nr) * 7 - 20
  n_lab = int(rng.integers(1, 20))
  rgb_pred = rng.integers(-1, n_lab, size=nv) * 3
  ir_pred = rng.integers(-1, n_lab, size=nr) * 3
  rgb_pred[rgb_pred < 0] = -1
  ir_pred[ir_pred < 0] = -1
  # Make labels informative in part, so that correct answers occur.
  k = rng.random(nv) < 0.5
  rgb_pred[k] = (rgb_truth[k] + 20) // 7 * 3 % (3 * n_lab)
  k = rng.random(nr) < 0.5
  ir_pred[k] = (ir_truth[k] + 20) // 7 * 3 % (3 * n_lab)
  for pred, truth in ((rgb_pred, rgb_truth), (ir_pred, ir_truth)):
    want = _purity_loop(pred, truth)
    got = label_metrics(pred, truth)["purity"]
    assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want)
  want = _correspondence_loop(rgb_pred, rgb_truth, ir_pred, ir_truth)
  got = correspondence_accuracy(rgb_pred, rgb_truth, ir_pred, ir_truth)
  assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want)


# --- report ------------------------------------------------------------------------------------

_METRICS = ("ari", "nmi", "clusters", "outlier_fraction", "purity", "num")


def _example():
  rgb_pred = np.array([10, 10, 20, 20, 40, -1, 30, -1])
  rgb_truth = np.array([1, 2, 4, 9, 1, 1, 6, 5])
  ir_pred = np.array([10, 10, 10, 20, 20, -1, 30])
  ir_truth = np.array([1, 1, 2, 3, 4, 5, 6])
  return rgb_pred, rgb_truth, ir_pred, ir_truth


def test_report_keys_and_values():
  rp, rt, ip, it = _example()
  r = report(rp, rt, ip, it)
  assert set(r) == ({f"{m}_{k}" for m in ("rgb", "ir") for k in _METRICS}
                    | {"joint_ari", "joint_nmi", "correspondence"})
  assert r["rgb_ari"] == label_metrics(rp, rt)["ari"]
  assert r["ir_purity"] == label_metrics(ip, it)["purity"]
  both_p, both_t = np.concatenate([rp, ip]), np.concatenate([rt, it])
  assert r["joint_ari"] == pytest.approx(adjusted_rand_score(both_t, both_p))
  assert r["joint_nmi"] == pytest.approx(normalized_mutual_info_score(both_t, both_p))
  assert r["correspondence"] == pytest.approx(0.5)
  assert all(type(v) in (int, float) for v in r.values())
  json.dumps(r, allow_nan=False)  # no nan in this case: plain JSON

  r = report(rp, rt, ip, it, joint=False)
  assert not {"joint_ari", "joint_nmi", "correspondence"} & set(r)


def test_jsonable_strict_json():
  r = report([-1, -1], [0, 1], [0, 0], [0, 1])
  assert math.isnan(r["rgb_purity"])
  with pytest.raises(ValueError):
    json.dumps(r, allow_nan=False)
  s = json.loads(json.dumps(jsonable(r), allow_nan=False))
  assert s["rgb_purity"] is None and s["ir_purity"] == 0.5
  assert jsonable({"a": np.float32(1.5), "b": np.int64(3)}) == {"a": 1.5, "b": 3}


# --- read_history ------------------------------------------------------------------------------


def test_read_history_roundtrip_through_metric_writer(tmp_path):
  rp, rt, ip, it = _example()
  r1 = report(rp, rt, ip, it)
  r2 = report([-1, -1], [0, 1], [0, 0], [0, 1])  # nan purity -> null in the log
  with MetricWriter(tmp_path, tensorboard=False) as w:
    w.write(10, {"loss": 1.0}, kind="train", epoch=0)
    w.write(10, r1, kind="pseudo_labels", epoch=0)
    w.write(20, {"loss": 0.5}, kind="train", epoch=1)
    w.write(20, r2, kind="pseudo_labels/mmlm", epoch=1)
    w.write(30, {"rank1": 0.3}, kind="eval", epoch=1)
  with open(tmp_path / "log.jsonl", "a") as f:
    f.write("\n{\"step\": 40, \"kind\": \"pseudo_lab")  # a blank and a line cut short
  rows = read_history(tmp_path / "log.jsonl")
  assert [row["step"] for row in rows] == [10, 20]
  assert "stage" not in rows[0] and rows[1]["stage"] == "mmlm"
  for key, value in r1.items():
    assert rows[0][key] == pytest.approx(value)
  assert math.isnan(rows[1]["rgb_purity"])
  assert read_history(tmp_path) == rows  # a workdir means its log.jsonl
  assert [row["step"] for row in read_history(tmp_path, kind="train")] == [10, 20]
  assert [row["step"] for row in read_history(tmp_path, kind="eval")] == [30]
  assert read_history(tmp_path, kind="pseudo") == []  # a prefix is not a kind


def test_read_history_keeps_explicit_stage(tmp_path):
  path = tmp_path / "h.jsonl"
  lines = [{"kind": "pseudo_labels", "epoch": 1, "stage": "stage2", "rgb_ari": 0.5},
           {"kind": "pseudo_labels/final", "epoch": 2, "stage": "own", "rgb_ari": 0.6},
           {"kind": "train", "epoch": 2, "loss": 1.0}, [1, 2]]
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  rows = read_history(path)
  assert [row["stage"] for row in rows] == ["stage2", "own"]


# --- plot_history ------------------------------------------------------------------------------


def _records():
  rng = np.random.default_rng(3)
  out = []
  for i, stage in enumerate(["stage1"] * 3 + ["stage2"] * 3 + ["mmlm", "final"]):
    truth_r = rng.integers(0, 10, size=80)
    truth_i = rng.integers(0, 10, size=60)
    noise = 0.8 - 0.1 * i
    pr = np.where(rng.random(80) < noise, rng.integers(-1, 10, size=80), truth_r)
    pi = np.where(rng.random(60) < noise, rng.integers(-1, 10, size=60), truth_i)
    out.append({"epoch": i, "stage": stage,
                **report(pr, truth_r, pi, truth_i, joint=stage in ("mmlm", "final"))})
  return out


@pytest.fixture
def saved_figures(monkeypatch):
  """Records the panel titles of every figure plot_history saves."""
  from matplotlib.figure import Figure

  seen = []
  original = Figure.savefig

  def savefig(self, *args, **kwargs):
    seen.append([ax.get_title() for ax in self.axes])
    return original(self, *args, **kwargs)

  monkeypatch.setattr(Figure, "savefig", savefig)
  return seen


def _check_png(path):
  assert os.path.getsize(path) > 0
  with Image.open(path) as im:
    assert im.format == "PNG"
    assert im.size[0] > 100 and im.size[1] > 100


def test_plot_history_all_keys(tmp_path, saved_figures):
  out = plot_history(_records(), tmp_path / "sub" / "pseudo.png", title="run")
  assert out == str(tmp_path / "sub" / "pseudo.png")
  _check_png(out)
  assert len(saved_figures[0]) == 6
  assert os.listdir(tmp_path / "sub") == ["pseudo.png"]  # no temporary file left


def test_plot_history_some_keys(tmp_path, saved_figures):
  records = [{"epoch": 0, "rgb_ari": 0.2, "ir_clusters": 40},
             {"epoch": 1, "stage": "stage2", "rgb_ari": float("nan"), "ir_clusters": 35},
             {"rgb_ari": None}]
  path = plot_history(records, tmp_path / "p.png")
  _check_png(path)
  titles = saved_figures[0]
  assert len(titles) == 2
  assert titles[0].startswith("ARI") and titles[1] == "clusters"
  path = plot_history([], tmp_path / "empty.png")  # no data: still a PNG, saying so
  _check_png(path)
  assert sorted(os.listdir(tmp_path)) == ["empty.png", "p.png"]


def test_plot_history_from_log(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as w:
    for rec in _records():
      scalars = {k: v for k, v in rec.items() if k not in ("epoch", "stage")}
      w.write(rec["epoch"] * 10, scalars, kind=f"pseudo_labels/{rec['stage']}",
              epoch=rec["epoch"])
  rows = read_history(tmp_path)
  assert [r["stage"] for r in rows][-2:] == ["mmlm", "final"]
  _check_png(plot_history(rows, tmp_path / "pseudo.png"))


def test_plot_history_failure_leaves_nothing(tmp_path, monkeypatch):
  from matplotlib.figure import Figure

  target = tmp_path / "pseudo.png"
  target.write_bytes(b"old")

  def broken(self, f, *args, **kwargs):
    f.write(b"\x89PNG half")
    raise RuntimeError("disk full")

  monkeypatch.setattr(Figure, "savefig", broken)
  with pytest.raises(RuntimeError, match="disk full"):
    plot_history(_records(), target)
  assert os.listdir(tmp_path) == ["pseudo.png"]
  assert target.read_bytes() == b"old"  # the earlier PNG is untouched
  monkeypatch.undo()
  plot_history(_records(), target)
  _check_png(target)
  assert os.listdir(tmp_path) == ["pseudo.png"]


def test_public_names():
  assert set(diagnostics.__all__) == {"label_metrics", "correspondence_accuracy", "report",
                                      "jsonable", "read_history", "plot_history"}
