"""experiments.compare: a tiny comparison end to end, its report against the runs' own files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import compare
from experiments import compare_report
from experiments.configs import compare as compare_configs
from maumjax.errors import UserError

REPO = Path(__file__).resolve().parents[2]
# MAUM's key and baseline rows train (experiments.launch runs, the cheapest method); MMM's
# CMC-only row goes through experiments.mmm's stage driver, replaced in the test by a stand-in
# that writes the stages' metrics.json (the driver is tested in tests/methods/test_mmm*.py).
RESULTS = {"maum_maum": "metrics.json", "maum_baseline": "metrics.json",
           "mmm_full": "final/metrics.json", "mmm_cmc": "stage2/metrics.json"}
METRICS = ("r1", "r5", "r10", "r20", "mAP", "mINP")


def _config():
  config = compare_configs.get_config("smoke")  # one seed, 1 trial of all-search single-shot
  config.methods, config.rows.mmm = "maum,mmm", "full,cmc"
  return config


def _stand_in(work: Path, staged: list):
  """MMM's driver, replaced: writes each trained stage's run files (copied from the MAUM run,
  r1 50 + stage number) as the driver does, skipping finished stages as it does."""

  def run_stages(config, folder):
    staged.append((config.stages, Path(folder)))
    source = work / "runs/maum_maum/imb1.0/seed0"
    for i, stage in enumerate(("stage1", "stage2", "final")):
      out = Path(folder) / stage
      if stage not in config.stages.split(",") or (out / "metrics.json").is_file():
        continue
      metrics = json.loads((source / "metrics.json").read_text())
      metrics["run"]["train_seconds"] = 10.0 * (i + 1)
      metrics["summary"]["all/single"]["r1"] = 50.0 + i
      out.mkdir(parents=True)
      (out / "metrics.json").write_text(json.dumps(metrics))
      (out / "config.json").write_text((source / "config.json").read_text())

  return run_stages


def _hand_run(seed: int, r1: float, mAP: float, seconds: float, row: str = "maum") -> dict:
  values = {k: 0.0 for k in METRICS} | {"r1": r1, "mAP": mAP}
  return {"method": "maum", "row": row, "imbalance": 1.0, "seed": seed, "order": [0, 0],
          "train_seconds": seconds, "train_images_per_s": None, "params": 7,
          "evaluations": {"agw": {"summary": {"all/single": values},
                                  "protocol": {"feature_dim": 4}}}}


def test_mean_and_std_over_seeds_by_hand():
  runs = [_hand_run(0, 10.0, 1.0, 100.0), _hand_run(1, 20.0, 2.0, 100.0),
          _hand_run(2, 30.0, 4.0, 100.0), _hand_run(0, 5.0, 3.0, 50.0, row="baseline")]
  rows = {r["row"]: r for r in compare_report.aggregate(runs)}
  full, single = rows["maum"], rows["baseline"]
  assert full["seeds"] == [0, 1, 2]
  # R1 10, 20, 30: mean 20; deviations -10, 0, 10 -> sample variance (100 + 0 + 100) / 2 = 100.
  np.testing.assert_allclose([full["mean"]["r1"], full["std"]["r1"]], [20.0, 10.0])
  # mAP 1, 2, 4: mean 7/3; deviations -4/3, -1/3, 5/3 -> (16 + 1 + 25) / 9 / 2 = 7/3.
  np.testing.assert_allclose([full["mean"]["mAP"], full["std"]["mAP"]],
                             [7 / 3, np.sqrt(7 / 3)])
  assert full["train_seconds"] == {"mean": 100.0, "std": 0.0}
  assert full["train_images_per_s"] == {"mean": None, "std": None}
  # One seed: the value itself, no spread.
  assert single["mean"]["r1"] == 5.0 and single["std"]["r1"] is None
  assert compare_report._pm(20.0, 10.0) == "20.0 ± 10.0"  # noqa: SLF001
  assert compare_report._pm(5.0, None) == "5.0"  # noqa: SLF001


def test_unknown_methods_and_rows_name_the_valid_ones():
  config = _config()
  config.methods = "maum,agw"
  with pytest.raises(UserError, match="unknown method.*agw.*maum, mpanet, bdf, mmm"):
    compare.plan(config)
  config = _config()
  config.rows.mmm = "full,nope"
  with pytest.raises(UserError, match="unknown row.*nope.*full, cmc, mmlm"):
    compare.plan(config)


def test_the_official_sampler_is_skipped_on_the_synthetic_data(capsys):
  config = _config()
  config.eval.samplers = "agw,official"
  assert compare.extra_samplers(config, compare.plan(config)) == []
  assert "'official' skipped" in capsys.readouterr().out


def test_synthetic_generator_settings_apply_to_every_run():
  config = _config()
  config.data.synthetic.update(seed=7, num_identities=24, nir=0.5)
  for run in compare.plan(config):
    assert (run.config.data.synthetic.seed, run.config.data.synthetic.num_identities,
            run.config.data.synthetic.images_per_camera,
            run.config.data.synthetic.nir) == (7, 24, 10, 0.5), run.method
  assert {(r.config.data.synthetic.num_identities, r.config.data.synthetic.nir)
          for r in compare.plan(_config())} == {(16, 0.0)}


def test_multi_shot_on_too_few_synthetic_images_is_refused_before_training(tmp_path):
  """Ten-shot galleries need ten images per camera folder: refused at the check, not after a
  run's training (it happened: eight per folder failed at MAUM's evaluation)."""
  from maumjax.train import evaluation

  config = _config()
  config.eval.shots = (1, 10)
  config.data.synthetic.images_per_camera = 8
  with pytest.raises(evaluation.EvalConfigError, match="images_per_camera=8 writes fewer"):
    compare.run_all(config, tmp_path / "work")
  assert not (tmp_path / "work" / "runs").exists()
  run = compare.plan(config)[0].config
  run.data.manual_dir = "/data/sysu"  # real data: the dataset's own folders decide
  evaluation.check_config(run)
  config.data.synthetic.images_per_camera = 10
  for r in compare.plan(config):
    evaluation.check_config(r.config)


def test_a_row_applies_to_a_budget_without_rows():
  """MAUM's smoke preset has no rows: `smoke` plus what synthetic_baseline changes."""
  config = compare.method_config("maum", "smoke", "baseline")
  assert (config.data.height, config.num_epochs) == (32, 2)  # still the smoke preset
  assert config.loss.shared_proxy and not config.loss.ms_proxy and config.loss.memory_size == 0
  assert compare.method_config("maum", "smoke", "maum").loss.memory_size == 2  # smoke's own
  assert compare.method_config("mmm", "smoke", "cmc").stages == "stage1,stage2"


def test_compare_trains_reports_and_retrains_nothing(tmp_path, monkeypatch, capsys):
  cache, work = tmp_path / "cache", tmp_path / "work"
  monkeypatch.setenv("MAUMJAX_CACHE", str(cache))
  method_config = compare.method_config

  def shorter(method, budget, row):  # suite time: one epoch of 4 steps
    config = method_config(method, budget, row)
    if method == "maum":
      config.num_epochs = 1
      config.data.pipeline.steps_per_epoch = 4
    return config

  staged = []
  monkeypatch.setattr(compare, "method_config", shorter)
  monkeypatch.setattr(compare.mmm_driver, "run_stages", _stand_in(work, staged))
  compare.run_all(_config(), work)
  out = capsys.readouterr().out
  assert out.count(" seed0: training in ") == 3 and "mmm/cmc imb1.0 seed0: done earlier" in out
  # The CMC row's stages 1-2 are the full row's: trained once, linked into the CMC run.
  full, cmc = work / "runs/mmm_full/imb1.0/seed0", work / "runs/mmm_cmc/imb1.0/seed0"
  assert staged == [("stage1,stage2,mmlm,final", full)]
  for stage in ("stage1", "stage2"):
    assert (cmc / stage).is_symlink() and (cmc / stage).resolve() == (full / stage).resolve()
  assert not (cmc / "final").exists()

  results = {name: json.loads((work / "runs" / name / "imb1.0" / "seed0" / path).read_text())
             for name, path in RESULTS.items()}
  report = json.loads((work / "report" / "report.json").read_text())
  by_name = {f"{r['method']}_{r['row']}": r for r in report["runs"]}
  assert sorted(by_name) == sorted(RESULTS)
  stage1 = json.loads((work / "runs/mmm_cmc/imb1.0/seed0/stage1/metrics.json").read_text())
  for name, metrics in results.items():
    run = by_name[name]
    assert run["evaluations"]["agw"]["summary"] == metrics["summary"]
    assert run["train_images_per_s"] == metrics["run"]["train_images_per_s"]
    if not name.startswith("mmm"):  # the stand-in writes no checkpoint
      assert isinstance(run["params"], int) and run["params"] > 0
    protocol = run["evaluations"]["agw"]["protocol"]
    assert (protocol["dataset"], protocol["settings"], protocol["sampler"], protocol["trials"],
            protocol["flip"], protocol["selection"]) == (
                "sysu_mm01", ["all/single"], "agw", 1, False, "last")
  assert by_name["maum_maum"]["train_seconds"] == results["maum_maum"]["run"]["train_seconds"]
  assert by_name["mmm_cmc"]["train_seconds"] == pytest.approx(
      stage1["run"]["train_seconds"] + results["mmm_cmc"]["run"]["train_seconds"])
  assert by_name["mmm_cmc"]["evaluations"]["agw"]["summary"]["all/single"]["r1"] == 51.0
  assert by_name["mmm_full"]["train_seconds"] == pytest.approx(10.0 + 20.0 + 30.0)

  # One seed: each aggregate is the run's own number, without a spread, and report.md shows it.
  table = (work / "report" / "report.md").read_text()
  for agg in report["aggregates"]:
    own = results[f"{agg['method']}_{agg['row']}"]["summary"][agg["setting"]]
    assert agg["mean"] == pytest.approx(own) and set(agg["std"].values()) == {None}
    cells = " | ".join(f"{own[k]:.1f}" for k in METRICS)
    assert f"| {agg['method']} / {agg['row']} | {agg['setting']} | 1 | {cells} |" in table
  assert "Protocol: sysu_mm01" in table and "gallery sampler(s) agw" in table
  own = json.loads((work / "runs/maum_maum/imb1.0/seed0/config.json").read_text())["data"]
  g = own["synthetic"]
  assert (f"Data and start: synthetic sysu_mm01 (generator seed {g['seed']}, "
          f"{g['num_identities']} identities, {g['images_per_camera']} images per folder, "
          f"near-infrared weight {g['nir']}), from scratch.") in table
  assert by_name["maum_maum"]["data"]["synthetic"]["num_identities"] == 16
  for png in ("cmc_all-single.png", "map_bars.png", "ranked.png"):
    assert (work / "report" / png).stat().st_size > 0, png
  assert not (work / "report" / "imbalance.png").exists()  # one fraction
  assert report["ranked"]["same_queries"] is True

  # Again: nothing trains, the report is made again.
  stamps = {p: p.stat().st_mtime_ns for p in work.glob("runs/**/metrics.json")}
  (work / "report" / "report.json").unlink()
  compare.run_all(_config(), work)
  out = capsys.readouterr().out
  assert out.count(" seed0: done earlier") == 4 and "training in" not in out
  assert len(staged) == 1
  assert {p: p.stat().st_mtime_ns for p in work.glob("runs/**/metrics.json")} == stamps
  again = json.loads((work / "report" / "report.json").read_text())
  assert again["aggregates"] == report["aggregates"]


def test_mmm_rows_share_stages_only_with_the_same_config(tmp_path, monkeypatch, capsys):
  """`shared_stages` pairs a row with one training the same config's stages at the same
  fraction and seed; listed first, the CMC row trains them in the full row's folder."""
  config = _config()
  config.methods, config.rows.mmm, config.seeds = "mmm", "cmc,full,mmlm", "0,1"
  runs = compare.plan(config)
  names = [(r.row, r.seed) for r in runs]
  shared = {names[i]: (names[j], stages)
            for i, (j, stages) in compare.shared_stages(runs).items()}
  # mmlm trains stages 1-2 with Intra and Inter off: another config, nothing shared.
  assert shared == {("cmc", 0): (("full", 0), ["stage1", "stage2"]),
                    ("cmc", 1): (("full", 1), ["stage1", "stage2"])}

  work = tmp_path / "work"
  source = work / "runs/maum_maum/imb1.0/seed0"
  source.mkdir(parents=True)
  metrics = {"summary": {"all/single": {k: 1.0 for k in METRICS}},
             "run": {"train_seconds": 1.0, "train_images_per_s": 1.0}}
  (source / "metrics.json").write_text(json.dumps(metrics))
  (source / "config.json").write_text("{}")
  staged = []
  monkeypatch.setattr(compare.mmm_driver, "run_stages", _stand_in(work, staged))
  cmc, full = runs[0], runs[2]
  assert (cmc.row, full.row, cmc.seed, full.seed) == ("cmc", "full", 0, 0)
  compare._link_stages(cmc, full, ["stage1", "stage2"], work)  # noqa: SLF001
  assert [(c, f.name) for c, f in staged] == [("stage1,stage2", "seed0")]
  assert (cmc.folder(work) / "stage2" / "metrics.json").is_file()
  assert "training them in" in capsys.readouterr().out
  compare._link_stages(cmc, full, ["stage1", "stage2"], work)  # noqa: SLF001
  assert len(staged) == 1  # finished: linked again, not trained
  (cmc.folder(work) / "stage1").unlink()
  (cmc.folder(work) / "stage1").mkdir()
  with pytest.raises(UserError, match="stage1 exists but the comparison shares it"):
    compare._link_stages(cmc, full, ["stage1", "stage2"], work)  # noqa: SLF001


def test_the_command_line_refuses_an_unknown_method_before_any_work(tmp_path):
  env = {**os.environ, "MAUMJAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.compare", "--config=experiments/configs/compare.py:smoke",
       "--config.methods=maum,agw", f"--workdir={tmp_path / 'work'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert "unknown method(s) agw" in proc.stderr + proc.stdout
  assert not (tmp_path / "work").exists() and not (tmp_path / "cache").exists()


def test_overrides_set_one_methods_field_and_refuse_shared_or_unknown_ones():
  config = _config()
  config.methods = "maum,bdf"
  config.overrides = "maum.optim.lr=0.125, bdf.num_epochs=3,maum.model.dtype=bfloat16"
  runs = compare.plan(config)
  for run in runs:
    lr, epochs = run.config.optim.lr, run.config.num_epochs
    default = compare.method_config(run.method, "smoke", run.row)
    assert lr == (0.125 if run.method == "maum" else default.optim.lr), run
    assert epochs == (3 if run.method == "bdf" else default.num_epochs), run
    assert run.config.model.dtype == ("bfloat16" if run.method == "maum"
                                      else default.model.dtype)
  for text, message in (("maum.optim.lr", "expected METHOD.FIELD=VALUE"),
                        ("nosuch.optim.lr=1", "unknown method 'nosuch'"),
                        ("maum.optim.lrr=1", "no field 'optim.lrr'"),
                        ("maum.nosuch.lr=1", "no field 'nosuch.lr'"),
                        ("maum.seed=3", "shared by every run"),
                        ("bdf.eval.trials=1", "shared by every run"),
                        ("bdf.data.synthetic.seed=4", "shared by every run"),
                        ("bdf.data.pipeline.imbalance_fraction=0.5", "shared by every run"),
                        ("bdf.data.pipeline.seed=3", "shared by every run"),
                        ("maum.optim.lr='fast'", "maum.optim.lr='fast'"),
                        ("maum/nosuch.optim.lr=1", "unknown row 'nosuch'"),
                        ("bdf/maum.optim.lr=1", "unknown row 'maum'")):
    config.overrides = text
    with pytest.raises(UserError, match=re.escape(message)):
      compare.plan(config)
  # METHOD/ROW: that row's runs only; later items win, as for whole-method ones.
  config.overrides = "maum.optim.lr=0.5,maum/baseline.optim.lr=0.25,bdf/full.num_epochs=5"
  got = {(r.method, r.row): (r.config.optim.lr, r.config.num_epochs)
         for r in compare.plan(config)}
  preset = {(r.method, r.row): compare.method_config(r.method, "smoke", r.row)
            for r in compare.plan(config)}
  assert got == {("maum", "maum"): (0.5, preset["maum", "maum"].num_epochs),
                 ("maum", "baseline"): (0.25, preset["maum", "baseline"].num_epochs),
                 ("bdf", "full"): (preset["bdf", "full"].optim.lr, 5),
                 ("bdf", "base"): (preset["bdf", "base"].optim.lr,
                                   preset["bdf", "base"].num_epochs)}
  # One method's own backbone file is fine without the compare-wide one, and refused with it
  # (the compare-wide one would replace it without a word).
  config.overrides = "maum.model.pretrained='/w/tiny.safetensors'"
  assert {(r.method, r.config.model.pretrained) for r in compare.plan(config)} == {
      ("maum", "/w/tiny.safetensors"), ("bdf", "")}
  for pretrained in ("synthetic", "/w/resnet50.pth"):
    config.pretrained = pretrained
    with pytest.raises(UserError, match="sets maum's model.pretrained"):
      compare.plan(config)


def test_the_synthetic_bench_is_near_infrared_and_pretrained_and_refuses_that_on_real_data():
  config = compare_configs.get_config()
  runs = compare.plan(config)
  assert {r.config.data.synthetic.nir for r in runs} == {0.5}
  assert {(r.config.mmm.eps, r.config.final.optim.backbone_lr_mult)
          for r in runs if r.method == "mmm"} == {(0.45, 0.1)}
  # MPANet's MAM after layer4 only, its other parts as the preset's full row.
  full = compare.method_config("mpanet", "synthetic", "mpanet")
  assert full.model.modality_attention == 2 and full.model.pam
  assert {(r.row, r.config.model.modality_attention, r.config.model.pam, r.config.loss.ml)
          for r in runs if r.method == "mpanet"} == {("mpanet", 1, True, True),
                                                    ("baseline", 0, False, False)}
  # 0.6 of each preset's epochs, but MMM's: whole epochs, the final stage's of 20 steps.
  assert {(r.method, r.config.data.pipeline.epoch_fraction) for r in runs} == {
      ("maum", 0.6), ("mpanet", 0.6), ("bdf", 0.6), ("mmm", 1.0)}
  assert {r.config.final.pipeline.steps_per_epoch for r in runs if r.method == "mmm"} == {20}
  assert compare.method_config("mmm", "synthetic", "full").final.pipeline.steps_per_epoch == 40
  assert {r.method for r in runs} == {"maum", "mpanet", "bdf", "mmm"}
  assert (config.pretrained, config.pretrain.labels) == ("synthetic", "joint")
  config.data.manual_dir = "/data/sysu"
  with pytest.raises(UserError, match="resnet50-0676ba61.pth"):
    compare.plan(config)
  config.pretrained = ""
  assert all(r.config.data.manual_dir == "/data/sysu" for r in compare.plan(config))
  # The real-data recipes: a preset without the bench's own settings; the synthetic preset
  # refuses a real budget rather than train it with them.
  config.budget = "sysu"
  with pytest.raises(UserError, match=re.escape("compare.py:sysu")):
    compare.plan(config)
  for budget in ("sysu", "regdb"):
    real = compare_configs.get_config(budget)
    real.data.manual_dir, real.pretrained = f"/data/{budget}", "/w/resnet50-0676ba61.pth"
    runs = compare.plan(real)
    assert {r.method for r in runs} == {"maum", "mpanet", "bdf", "mmm"}
    for run in runs:
      preset = compare.method_config(run.method, budget, run.row)
      assert run.config.data.pipeline.epoch_fraction == 1.0
      assert run.config.model.pretrained == "/w/resnet50-0676ba61.pth"
      assert run.config.model.to_dict() == {**preset.model.to_dict(),
                                            "pretrained": "/w/resnet50-0676ba61.pth"}, run
      if run.method == "mmm":
        assert run.config.mmm.to_dict() == preset.mmm.to_dict()
        assert run.config.final.to_dict() == preset.final.to_dict()


def test_report_order_is_the_methods_own_whatever_an_invocation_asks_for():
  config = _config()
  config.methods = "mmm,maum"
  orders = {(r.method, r.row): r.order for r in compare.plan(config)}
  assert orders == {("maum", "maum"): (0, 0), ("maum", "baseline"): (0, 1),
                    ("mmm", "full"): (3, 0), ("mmm", "cmc"): (3, 1)}


def test_epoch_fraction_reaches_every_run_and_one_method_may_keep_its_own():
  config = _config()
  assert {r.config.data.pipeline.epoch_fraction for r in compare.plan(config)} == {1.0}
  config.epoch_fraction = 0.5
  assert {r.config.data.pipeline.epoch_fraction for r in compare.plan(config)} == {0.5}
  config.overrides = "mmm.data.pipeline.epoch_fraction=0.75"
  assert {(r.method, r.config.data.pipeline.epoch_fraction) for r in compare.plan(config)} == {
      ("maum", 0.5), ("mmm", 0.75)}
