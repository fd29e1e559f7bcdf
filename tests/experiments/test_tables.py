"""tables: loading results, the markdown tables and issue 5's target check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.benchmarks import tables

REPO = Path(__file__).resolve().parents[2]
H100 = "NVIDIA H100 80GB HBM3"


def _step(batch, images_per_s, ratio, compile_s, *, torch_compile=False, recompiled=False,
          dtype="bfloat16", arch="resnet50"):
  return {"benchmark": "train_step", "device": H100, "device_kind": H100, "platform": "gpu",
          "commit": "abc1234", "arch": arch, "height": 288, "width": 144, "dtype": dtype,
          "batch": batch, "images_per_s": images_per_s, "ratio_vs_torch": ratio,
          "torch_images_per_s": images_per_s / ratio if ratio else None,
          "torch_compile": torch_compile,
          "trace_compile_s": compile_s, "recompiled": recompiled, "mfu": 0.21,
          "peak_memory_bytes": 3 * 2**30}


GPU_RUN = [
    _step(64, 4000.0, 1.6, 50.0),
    _step(128, 5200.0, 1.4, 70.0, torch_compile=True),
    _step(256, 9000.0, None, 20.0, dtype="float32"),  # not a bf16 line: ignored by the targets
    {"benchmark": "evaluation_sysu", "device": "gpu:16 cores", "device_kind": H100,
     "commit": "abc1234", "queries": 3803, "trials": 10, "fast_s": 0.4, "naive_s": 30.0,
     "speedup": 75.0},
    {"benchmark": "input_pipeline", "device": "cpu:16 cores", "commit": "abc1234",
     "height": 288, "width": 144, "threads": 16, "workers": 0, "cache": "ram",
     "augment_on": "device", "images_per_s": 6000.0},
    {"benchmark": "trainer", "device": H100, "commit": "abc1234", "error": "failed: boom"},
]


def test_targets_by_hand():
  got = {t["target"]: t for t in tables.check_targets(GPU_RUN)}
  speed = got["train step images/s (bf16, ResNet-50, 288x144)"]
  assert (speed["value"], speed["status"], speed["basis"]) == (5200.0, "met", "batch 128")
  ratio = got["ratio vs PyTorch (same run)"]
  assert (ratio["value"], ratio["status"]) == (1.4, "not met")
  assert "torch compiled" in ratio["basis"] and "smallest of 2" in ratio["basis"]
  comp = got["first-step trace + compile (s)"]
  assert (comp["value"], comp["status"]) == (70.0, "not met")
  assert got["no recompilation after the first step"]["status"] == "met"
  assert got["SYSU evaluation given features (s)"]["value"] == 0.4
  assert got["SYSU evaluation given features (s)"]["status"] == "met"
  feed = got["input pipeline >= train step (images/s)"]
  assert (feed["value"], feed["status"]) == (6000.0, "met")


def test_targets_not_measured_and_recompilation():
  assert {t["status"] for t in tables.check_targets([])} == {"not measured"}
  rows = [_step(64, 6000.0, 2.0, 30.0, recompiled=True)]
  got = {t["target"]: t["status"] for t in tables.check_targets(rows)}
  assert got["no recompilation after the first step"] == "not met"
  assert got["ratio vs PyTorch (same run)"] == "met"
  assert got["input pipeline >= train step (images/s)"] == "not measured"


def test_render_lists_tables_targets_and_failures():
  text = tables.render(GPU_RUN)
  assert "### Train step" in text and "### Evaluation" in text and "### Input pipeline" in text
  assert f"### Targets on {H100}" in text
  assert "| 4,000.0 | 2,500.0 (eager) | 1.60 | 50.0 | no | 21.0% | 3.0 |" in text
  assert "### Not measured\n\n- trainer: failed: boom" in text
  assert "### Trainer" not in text  # its only line failed


def test_the_recorded_cpu_results_render(tmp_path):
  path = REPO / "experiments" / "benchmarks" / "results.jsonl"
  rows = tables.load([path])
  text = tables.render(tables.select(rows, commit="de463bf"))
  for r in rows:
    if r.get("benchmark") == "train_step" and r.get("commit") == "de463bf":
      ratio = r["images_per_s"] / r["torch_images_per_s"]
      assert f"| {r['images_per_s']:,.1f} | {r['torch_images_per_s']:,.1f} " in text
      assert f"| {ratio:.2f} |" in text
  assert "Targets on" not in text  # no GPU lines


def test_select_and_bad_lines(tmp_path):
  assert len(tables.select(GPU_RUN, device="h100")) == 5
  assert tables.select(GPU_RUN, commit="zzz") == []
  bad = tmp_path / "r.jsonl"
  bad.write_text(json.dumps({"a": 1}) + "\n\nnot json\n")
  with pytest.raises(ValueError, match=r"r\.jsonl:3 is not a JSON object"):
    tables.load([bad])
