"""What evaluation writes says its units, and a wrong --workdir / --step fails in one line.

A tiny run directory (the smoke preset's config.json and two checkpoints of its initial state,
no training) is evaluated once with `evaluate_workdir`; every file written is read back and its
numbers checked against its `"units"` label: metrics.json in percent, the runner's
eval_<dataset>.json in fractions, and the logged evaluation scalars (log.jsonl) named `_pct`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.configs import maum as maum_configs
from maumjax import methods
from maumjax.errors import UserError
from maumjax.eval import metrics as metrics_lib
from maumjax.eval import protocol
from maumjax.eval import runner
from maumjax.train import checkpoint as checkpoint_lib
from maumjax.train import evaluation
from maumjax.train import inputs
from maumjax.train import writers

STEPS = (3, 7)
METRICS = protocol.METRIC_KEYS


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run directory as the trainer leaves it: config.json and checkpoints at STEPS."""
  patch = pytest.MonkeyPatch()
  patch.setenv("MAUMJAX_CACHE", str(tmp_path_factory.mktemp("maumjax_cache")))
  workdir = tmp_path_factory.mktemp("run")
  config = json.loads(json.dumps(maum_configs.get_config("smoke").to_dict()))
  config["eval"]["num_ranked"] = 2
  (workdir / "config.json").write_text(json.dumps(config, indent=1))
  method = methods.get(config["method"])
  _, _, pipe, _ = inputs.prepare(config)
  setup = method.init(config, inputs.data_info(pipe, config), seed=config["seed"])
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    for step in STEPS:
      ckpt.save(step, setup.state, {"step": step}, force=True)
    ckpt.wait()
  yield workdir
  patch.undo()


@pytest.fixture(scope="module")
def evaluated(run_dir):
  result = evaluation.evaluate_workdir(run_dir)
  out = run_dir / f"eval_step{STEPS[-1]}"
  return (result, json.loads((out / "metrics.json").read_text()),
          json.loads((out / "eval_sysu_mm01.json").read_text()))


def _settings(record):
  return {s["setting"]: s for s in record["settings"]}


def test_metrics_json_is_all_percent_and_says_so(evaluated):
  result, saved, fractions = evaluated
  assert result["step"] == STEPS[-1] and saved == json.loads(json.dumps(result))
  assert saved["units"] == "percent" and saved["protocol"]["units"] == "percent"
  assert fractions["units"] == "fraction"
  percent = _settings(saved["protocol"])
  assert set(saved["summary"]) == set(percent) == set(_settings(fractions))
  for name, frac in _settings(fractions).items():
    pct = percent[name]
    for k in METRICS:
      # summary and protocol of metrics.json: 100 x the fraction in eval_<dataset>.json.
      assert saved["summary"][name][k] == pytest.approx(100 * frac["mean"][k], rel=1e-12)
      assert pct["mean"][k] == pytest.approx(saved["summary"][name][k], rel=1e-12)
      assert pct["std"][k] == pytest.approx(100 * frac["std"][k], rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(pct["cmc_mean"], 100 * np.array(frac["cmc_mean"]), rtol=1e-12)
    for t_pct, t_frac in zip(pct["trials"], frac["trials"], strict=True):
      for k in METRICS:
        assert t_pct[k] == pytest.approx(100 * t_frac[k], rel=1e-12, abs=1e-12)
      np.testing.assert_allclose(t_pct["cmc"], 100 * np.array(t_frac["cmc"]), rtol=1e-12)
      assert t_pct["num_valid"] == t_frac["num_valid"] > 0  # a count, not converted
    # Some value must exceed 1, or percent and fractions could not be told apart.
    assert max(pct["cmc_mean"]) > 1
  assert saved["protocol"]["queries"] == fractions["queries"]


def test_every_metric_value_lies_in_its_units_range(evaluated):
  _, saved, fractions = evaluated
  for record, top in ((saved["protocol"], 100.0), (fractions, 1.0)):
    for s in record["settings"]:
      values = [*s["mean"].values(), *s["std"].values(), *s["cmc_mean"]]
      values += [t[k] for t in s["trials"] for k in METRICS] + [v for t in s["trials"]
                                                               for v in t["cmc"]]
      assert all(0.0 <= v <= top for v in values), (record["units"], s["setting"])
  for setting in saved["summary"].values():
    assert all(0.0 <= v <= 100.0 for v in setting.values())


def test_logged_evaluation_scalars_are_named_percent(evaluated, tmp_path):
  """log.jsonl gets what the loop writes: `scalars(summarize(report))`, names ending `_pct`."""
  result, _, fractions = evaluated
  with writers.MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(STEPS[-1], evaluation.scalars(result["summary"]), kind="eval", epoch=0)
  (row,) = writers.read_log(tmp_path, "eval")
  logged = {k: v for k, v in row.items() if k not in ("step", "kind", "epoch")}
  assert logged and all(k.endswith("_pct") for k in logged)
  expected = {f"{name}/{k}_pct": 100 * s["mean"][k] for name, s in _settings(fractions).items()
              for k in ("r1", "mAP", "mINP")}
  assert logged == pytest.approx(expected, rel=1e-12)


def test_the_sheet_and_plots_are_written_next_to_the_records(evaluated, run_dir):
  out = run_dir / f"eval_step{STEPS[-1]}"
  for name in ("metrics.json", "eval_sysu_mm01.json", "cmc_sysu_mm01.png", "ranked_sysu_mm01.png"):
    assert (out / name).is_file(), name


def _report(cmc, m_ap, m_inp):
  metrics = metrics_lib.Metrics(np.array(cmc), m_ap, m_inp, 5)
  results = (protocol.SettingResult("all/single", (metrics, metrics)),)
  record = protocol.results_to_json(results, dataset="sysu_mm01", queries=5)
  return runner.Report(results, protocol.format_table(results), record)


def test_result_record_converts_the_protocol_once():
  report = _report([0.25, 0.5, 1.0], 0.125, 0.0625)
  record = evaluation.result_record(report)
  assert list(record) == ["units", "summary", "table", "protocol"]
  assert record["units"] == record["protocol"]["units"] == "percent"
  assert record["summary"] == {"all/single": {"r1": 25.0, "r5": 100.0, "r10": 100.0,
                                              "r20": 100.0, "mAP": 12.5, "mINP": 6.25}}
  (setting,) = record["protocol"]["settings"]
  assert setting["mean"] == record["summary"]["all/single"]
  assert setting["cmc_mean"] == [25.0, 50.0, 100.0] == setting["trials"][1]["cmc"]
  assert setting["trials"][0]["num_valid"] == 5 and record["protocol"]["queries"] == 5
  assert report.record["units"] == "fraction"  # the report itself is left as it was
  assert report.record["settings"][0]["mean"]["r1"] == 0.25
  with pytest.raises(ValueError, match="fraction"):
    evaluation.protocol_percent(record["protocol"])


def _one_line_error(err, *parts):
  message = str(err.value)
  assert isinstance(err.value, UserError) and "\n" not in message
  for part in parts:
    assert part in message, (part, message)
  return message


def test_missing_step_names_the_workdir_and_the_steps_there_are(run_dir):
  with pytest.raises(evaluation.RunNotFoundError) as err:
    evaluation.evaluate_workdir(run_dir, step=5)
  assert isinstance(err.value, FileNotFoundError)
  _one_line_error(err, str(run_dir), "step 5", "steps 3, 7", "--step")
  assert not (run_dir / "eval_step5").exists()


def test_workdir_without_config_json(tmp_path):
  with pytest.raises(evaluation.RunNotFoundError) as err:
    evaluation.evaluate_workdir(tmp_path)
  _one_line_error(err, str(tmp_path), "config.json", "experiments.maum")
  missing = tmp_path / "nowhere"
  with pytest.raises(evaluation.RunNotFoundError) as err:
    evaluation.evaluate_workdir(missing)
  _one_line_error(err, str(missing), "does not exist")
  assert not missing.exists()


def test_workdir_without_checkpoints(run_dir, tmp_path):
  (tmp_path / "config.json").write_text((run_dir / "config.json").read_text())
  with pytest.raises(evaluation.RunNotFoundError) as err:
    evaluation.evaluate_workdir(tmp_path)
  _one_line_error(err, str(tmp_path), "no checkpoint", "train")
  assert not (tmp_path / "checkpoints").exists()  # looking did not create the folder
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(evaluation.RunNotFoundError) as err:
    evaluation.evaluate_workdir(tmp_path, step=3)
  _one_line_error(err, str(tmp_path), "no checkpoint")


def test_unreadable_config_json(tmp_path):
  (tmp_path / "config.json").write_text('{"method": "maum",\n')
  with pytest.raises(evaluation.RunConfigError) as err:
    evaluation.evaluate_workdir(tmp_path)
  assert isinstance(err.value, ValueError)
  _one_line_error(err, str(tmp_path / "config.json"), "not valid JSON")
  (tmp_path / "config.json").write_text('{"method": "maum"}')
  with pytest.raises(evaluation.RunConfigError) as err:
    evaluation.evaluate_workdir(tmp_path)
  _one_line_error(err, "'eval'")
