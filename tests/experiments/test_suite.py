"""The benchmark suite: section plans, the time budget, and a smoke run end to end."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from experiments.benchmarks import suite

REPO = Path(__file__).resolve().parents[2]


def _lines(out: Path) -> list[dict]:
  return [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]


def test_gpu_plans_measure_what_the_issue_names(tmp_path):
  def argv(section):
    [cmd] = [c for c in suite.plan(section, tmp_path, smoke=False, threads=16,
                                   trainer_epochs=12)][:1]
    return cmd.argv

  bf16 = argv("step_bf16")
  assert "--batches=64,128,256" in bf16 and "--dtypes=bfloat16" in bf16 and "--torch" in bf16
  assert not any(a.startswith(("--arch", "--height", "--width")) for a in bf16)  # ResNet-50 288x144
  assert "--torch_compile=both" in argv("step_torch_compile")
  assert "--dtypes=float32" in argv("step_f32")
  assert "--profile_steps=5" in argv("profile")
  inputs = suite.plan("input", tmp_path, smoke=False, threads=16, trainer_epochs=12)
  assert [("--cache=ram" in c.argv) for c in inputs] == [False, True]
  assert all("--threads=16" in c.argv and "--augment_on=device" in c.argv for c in inputs)
  trainer = argv("trainer")
  assert "--config=experiments/configs/maum.py:sysu" in trainer
  assert "--config.model.dtype=bfloat16" in trainer and "--config.num_epochs=12" in trainer
  with pytest.raises(Exception, match="unknown section"):
    suite.plan("nope", tmp_path, smoke=False, threads=0, trainer_epochs=1)


def test_pyproject_ranges_are_read():
  ranges = suite._pyproject_ranges()
  assert ranges["jax"] == ">=0.10.2,<0.12" and ranges["grain"] == ">=0.2.18,<0.3"
  assert ranges["ml-collections"] == ">=0.1.1"


def test_env_flags_versions_outside_the_ranges(monkeypatch):
  real = importlib.metadata.version
  monkeypatch.setattr(suite.importlib.metadata, "version",
                      lambda name: "0.9.0" if name == "flax" else real(name))
  env = suite.env_result()
  assert env["versions"]["jax"] == jax.__version__
  assert env["outside_pyproject_ranges"] == {"flax": "0.9.0 not in >=0.12.8,<0.13"}
  assert env["device_count"] == jax.device_count()


def test_budget_skips_and_kills(tmp_path):
  t0 = time.monotonic()
  records = suite.run_suite(["env", "eval"], tmp_path / "a", budget_s=0.5, min_start_s=1.0,
                            smoke=True)
  assert [r["status"] for r in records] == ["skipped", "skipped"]
  assert [ln["benchmark"] for ln in _lines(tmp_path / "a")] == ["env", "eval"]
  assert all("budget" in ln["skipped"] for ln in _lines(tmp_path / "a"))
  # The full-size evaluation cannot finish in 2 s: killed at the end of the budget.
  records = suite.run_suite(["eval"], tmp_path / "b", budget_s=2.0, min_start_s=0.1,
                            smoke=False)
  assert records[0]["status"] == "timed out"
  assert "timed out" in _lines(tmp_path / "b")[0]["error"]
  assert time.monotonic() - t0 < 30


def test_smoke_suite_end_to_end(tmp_path):
  """env, profile and trainer at CPU sizes, through the command line. The eval and input
  sections run benchmarks that tests/experiments/test_entrypoints.py runs on their own; here
  only their commands are checked (`plan`)."""
  out = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1",
         "MAUMJAX_CACHE": str(tmp_path / "cache")}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.suite", "--smoke", f"--out_dir={out}",
       "--sections=env,profile,trainer", "--budget_s=400", "--min_start_s=1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=450, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = {ln["benchmark"]: ln for ln in _lines(out)}
  assert set(lines) == {"env", "train_step", "trainer"}, lines
  for section, module in (("eval", "experiments.benchmarks.evaluation"),
                          ("input", "experiments.benchmarks.input_pipeline")):
    commands = suite.plan(section, out, smoke=True, threads=1, trainer_epochs=1)
    assert commands and all(module in " ".join(c.argv) for c in commands), (section, commands)
  assert lines["env"]["versions"]["jax"] == jax.__version__
  # The profile section runs the train-step benchmark (bf16, tiny ResNet, batch 8): its record.
  step = lines["train_step"]
  assert step["dtype"] == "bfloat16" and step["arch"] == "tiny" and step["platform"] == "cpu"
  assert step["images_per_s"] > 0 and step["step_ms"] > 0 and step["compile_s"] > 0
  assert step["flops_per_step"] > 0 and step["flops_per_image"] > 0
  assert step["recompiled"] is False and step["finite"] is True
  # After uni_start: the cross-modality (memory) terms are in the loss.
  assert {"ms_parts", "ir_to_rgb_parts", "rgb_to_ir_parts", "triplet"} <= set(step["loss_terms"])
  assert step["mfu"] is None and step["peak_tflops"] is None  # no peak known for a CPU
  assert step["jax_version"] == jax.__version__ and "commit" in step
  prof = step["profile"]
  assert prof["steps"] == 5 and prof["busy_ms_per_step"] > 0
  assert (out / suite.PROFILE_FILE).stat().st_size > 0 and not (out / "trace").exists()
  trainer = lines["trainer"]
  assert trainer["images_per_s"] > 0 and trainer["synthetic_data"] is True
  assert trainer["sysu_81_epochs_hours_at_this_rate"] == pytest.approx(
      81 * 696 * 64 / trainer["images_per_s"] / 3600, rel=1e-2)
  assert "===== trainer" in (out / "suite.log").read_text()
  assert "suite: env ok" in proc.stdout
