"""The command-line entry points run end to end (in a subprocess, as a user runs them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], cache: Path) -> str:
  env = {**os.environ, "MAUMJAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_maum_trains_and_evaluate_restores_the_run(tmp_path):
  workdir = tmp_path / "run"
  # One epoch (suite time): training, the checkpoint and its restore are what is checked.
  out = _run(["experiments.maum", "--config=experiments/configs/maum.py:smoke",
              "--config.num_epochs=1", f"--workdir={workdir}"], tmp_path)
  assert f"workdir: {workdir}" in out and "all/single" in out and "indoor/multi" in out
  saved = json.loads((workdir / "metrics.json").read_text())
  assert saved["run"]["synthetic_data"] and saved["run"]["steps"] > 0
  assert (tmp_path / "synthetic").is_dir() and (tmp_path / "tfds").is_dir()
  out = _run(["experiments.evaluate", f"--workdir={workdir}", "--trials=2"], tmp_path)
  assert "all/single" in out
  again = json.loads(next(workdir.glob("eval_step*/metrics.json")).read_text())
  assert again["summary"] == saved["summary"]  # same checkpoint, same protocol


def test_input_pipeline_benchmark_prints_json(tmp_path):
  out = _run(["experiments.benchmarks.input_pipeline", "--height=32", "--width=16",
              "--steps=3", "--warmup=1", "--synthetic_identities=8", "--num_identities=2",
              "--num_instances=2", "--threads=1"], tmp_path)
  result = json.loads(out.strip().splitlines()[-1])
  assert result["benchmark"] == "input_pipeline" and result["batch"] == 8
  assert result["images_per_s"] > 0 and result["height"] == 32


def test_evaluation_benchmark_fast_and_naive_agree(tmp_path):
  out = _run(["experiments.benchmarks.evaluation", "--scale=0.05", "--dim=16", "--trials=2",
              "--repeats=1"], tmp_path)
  result = json.loads(out.strip().splitlines()[-1])
  assert result["benchmark"] == "evaluation_sysu" and result["trials"] == 2
  assert result["max_abs_diff"] < 1e-5 and result["speedup"] > 0


def test_multi_process_run_needs_a_workdir(tmp_path):
  env = {**os.environ, "MAUMJAX_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "experiments.maum", "--config.distributed=True"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode != 0
  assert "needs --workdir" in proc.stderr
  assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_maum_trains_on_regdb_layout_data(tmp_path):
  """The regdb preset (its builder, trial split and two-direction protocol), CPU-sized."""
  workdir = tmp_path / "run"
  out = _run(["experiments.maum", "--config=experiments/configs/maum.py:regdb",
              "--config.data.trial=2", "--config.model.arch=tiny", "--config.data.height=32",
              "--config.data.width=16", "--config.model.num_parts=2",
              "--config.model.part_dim=16", "--config.num_epochs=1",
              "--config.data.synthetic.num_identities=16",
              "--config.data.pipeline.num_identities=4", "--config.data.pipeline.num_instances=2",
              "--config.optim.warmup_epochs=0", "--config.loss.uni_start_epoch=0",
              "--config.train.progress=False", f"--workdir={workdir}"], tmp_path)
  assert "RegDB trial 2" in out and "visible->thermal" in out
  saved = json.loads((workdir / "metrics.json").read_text())
  assert saved["run"]["dataset"] == "regdb" and saved["run"]["synthetic_data"]
  assert set(saved["summary"]) == {"visible->thermal", "thermal->visible"}
  for direction in saved["summary"].values():
    assert 0 <= direction["r1"] <= direction["r5"] <= direction["r20"] <= 100
