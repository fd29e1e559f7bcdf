"""Markdown tables, and the issue-5 target check, from benchmark JSON lines.

  python -m experiments.benchmarks.tables experiments/benchmarks/results.jsonl \
      [--commit=abc1234] [--device=H100]

Reads every JSON object of the files (as the benchmarks and `suite.py` write them), keeps those
matching `--commit` / `--device` (substring matches; the device is the line's `device` or
`device_kind`), and prints one table per benchmark: train step (with the PyTorch ratio, compile
time, recompilation, MFU and peak memory), evaluation, input pipeline and trainer. Lines with an
`error` or `skipped` are listed after the tables, so a failed measurement is not silently left
out.

The target check applies issue 5's targets (`TARGETS`) to the lines of one device: each target
is 'met', 'not met' or 'not measured', with the value it was judged on. The train-step targets
use the ResNet-50 288x144 bfloat16 lines; the images/s target is judged at the best batch, the
PyTorch ratio at each batch measured with PyTorch (the smallest ratio is reported). The input
pipeline's lines name the host rather than the GPU, so every selected one counts: select one
run's lines with `--commit`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from absl import app, flags

# Issue 5, one H100 in bf16.
TARGETS = {
    "step_images_per_s": 5000.0,  # MAUM train step, ResNet-50, 288x144
    "ratio_vs_torch": 1.5,
    "first_compile_s": 60.0,
    "eval_s": 1.0,  # SYSU protocol given features, all settings, 10 trials
}


def load(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
  """Every JSON object of the files, one per non-empty line.

  Raises:
    ValueError: a line is not JSON (names the file and line).
  """
  rows = []
  for path in paths:
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i} is not a JSON object ({e}); each line of a results "
                           "file must be one benchmark's JSON output") from e
  return rows


def device_of(row: dict[str, Any]) -> str:
  return str(row.get("device_kind") or row.get("device") or "?")


def select(rows: list[dict[str, Any]], *, commit: str = "", device: str = ""):
  """Rows whose commit starts with `commit` and whose device names contain `device`."""
  return [r for r in rows
          if str(r.get("commit", "")).startswith(commit)
          and (not device or device.lower() in
               f"{r.get('device', '')} {r.get('device_kind', '')}".lower())]


def _fmt(v: Any, digits: int = 1) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    return f"{v:,.{digits}f}"
  if isinstance(v, int):
    return f"{v:,}"
  return str(v)


def _num(v: Any, digits: int) -> str:
  return "-" if v is None else f"{v:,.{digits}f}"


def _table(header: list[str], body: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |"
            for row in body]
  return "\n".join(lines)


def _ok(r: dict[str, Any]) -> bool:
  return "error" not in r and "skipped" not in r


def train_step_table(rows: list[dict[str, Any]]) -> str:
  body = []
  for r in rows:
    if r.get("benchmark") != "train_step" or not _ok(r):
      continue
    torch = None
    if r.get("torch_images_per_s"):
      mode = "compiled" if r.get("torch_compile") else "eager"
      torch = f"{r['torch_images_per_s']:,.1f} ({mode})"
    mem = r.get("peak_memory_bytes")
    body.append([device_of(r), f"{r.get('arch')} {r.get('height')}x{r.get('width')}",
                 r.get("dtype"), r.get("batch"), float(r["images_per_s"]), torch or "-",
                 _num(r.get("ratio_vs_torch"), 2), _num(r.get("trace_compile_s"), 1),
                 r.get("recompiled"),
                 f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-",
                 f"{mem / 2**30:.1f}" if mem else "-", r.get("commit")])
  return _table(["device", "model", "dtype", "batch", "images/s", "PyTorch images/s", "ratio",
                 "trace+compile (s)", "recompiled", "MFU", "peak GiB", "commit"], body)


def evaluation_table(rows: list[dict[str, Any]]) -> str:
  body = [[device_of(r), r.get("queries"), r.get("trials"), _num(r.get("fast_s"), 3),
           _num(r.get("naive_s"), 1), _num(r.get("speedup"), 1), r.get("commit")]
          for r in rows if str(r.get("benchmark", "")).startswith("evaluation") and _ok(r)]
  return _table(["device", "queries", "trials", "maumjax (s)", "NumPy loop (s)", "speedup",
                 "commit"], body)


def input_table(rows: list[dict[str, Any]]) -> str:
  body = [[device_of(r), f"{r.get('height')}x{r.get('width')}", r.get("threads"),
           r.get("workers"), r.get("cache"), r.get("augment_on"), r.get("images_per_s"),
           r.get("commit")]
          for r in rows if r.get("benchmark") == "input_pipeline" and _ok(r)]
  return _table(["host", "size", "threads", "workers", "cache", "augmentation on", "images/s",
                 "commit"], body)


def trainer_table(rows: list[dict[str, Any]]) -> str:
  body = [[device_of(r), r.get("dtype"), r.get("batch"), r.get("epochs"), r.get("images_per_s"),
           _num(r.get("sysu_81_epochs_hours_at_this_rate"), 2), r.get("commit")]
          for r in rows if r.get("benchmark") == "trainer" and _ok(r)]
  return _table(["device", "dtype", "batch", "epochs", "images/s",
                 "SYSU-MM01 81 epochs (h)", "commit"], body)


def failures(rows: list[dict[str, Any]]) -> list[str]:
  return [f"- {r.get('benchmark')}: {r.get('error') or 'skipped: ' + str(r.get('skipped'))}"
          for r in rows if not _ok(r)]


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Issue 5's targets on `rows` (one device's lines); see the module docstring."""
  steps = [r for r in rows if r.get("benchmark") == "train_step" and _ok(r)
           and r.get("dtype") == "bfloat16" and r.get("arch") == "resnet50"
           and (r.get("height"), r.get("width")) == (288, 144)]
  out = []

  def add(name, target, value, met, basis):
    out.append({"target": name, "goal": target, "value": value,
                "status": "not measured" if value is None else ("met" if met else "not met"),
                "basis": basis})

  best = max(steps, key=lambda r: r["images_per_s"], default=None)
  add("train step images/s (bf16, ResNet-50, 288x144)", f">= {TARGETS['step_images_per_s']:,.0f}",
      best and best["images_per_s"],
      best is not None and best["images_per_s"] >= TARGETS["step_images_per_s"],
      best and f"batch {best['batch']}")
  ratios = [r for r in steps if r.get("ratio_vs_torch")]
  worst = min(ratios, key=lambda r: r["ratio_vs_torch"], default=None)
  add("ratio vs PyTorch (same run)", f">= {TARGETS['ratio_vs_torch']}",
      worst and worst["ratio_vs_torch"],
      worst is not None and worst["ratio_vs_torch"] >= TARGETS["ratio_vs_torch"],
      worst and f"smallest of {len(ratios)} (batch {worst['batch']}, torch "
                f"{'compiled' if worst.get('torch_compile') else 'eager'})")
  compiles = [r["trace_compile_s"] for r in steps if r.get("trace_compile_s") is not None]
  add("first-step trace + compile (s)", f"<= {TARGETS['first_compile_s']:.0f}",
      max(compiles) if compiles else None,
      bool(compiles) and max(compiles) <= TARGETS["first_compile_s"],
      f"largest of {len(compiles)}" if compiles else None)
  add("no recompilation after the first step", "none",
      any(r.get("recompiled") for r in steps) if steps else None,
      bool(steps) and not any(r.get("recompiled") for r in steps),
      f"{len(steps)} runs" if steps else None)
  evals = [r for r in rows if str(r.get("benchmark", "")).startswith("evaluation") and _ok(r)
           and r.get("trials") == 10 and r.get("queries") == 3803]
  fastest = min((r["fast_s"] for r in evals), default=None)
  add("SYSU evaluation given features (s)", f"< {TARGETS['eval_s']:.0f}", fastest,
      fastest is not None and fastest < TARGETS["eval_s"],
      "full protocol, 10 trials" if evals else None)
  inputs = [r for r in rows if r.get("benchmark") == "input_pipeline" and _ok(r)
            and (r.get("height"), r.get("width")) == (288, 144)]
  feed = max((r["images_per_s"] for r in inputs), default=None)
  step_rate = best and best["images_per_s"]
  add("input pipeline >= train step (images/s)", "pipeline >= step", feed,
      feed is not None and step_rate is not None and feed >= step_rate,
      f"best pipeline setting vs step {step_rate:,.0f}" if feed and step_rate else None)
  return out


def targets_table(rows: list[dict[str, Any]]) -> str:
  body = [[t["target"], t["goal"],
           _num(t["value"], 2) if isinstance(t["value"], float) else t["value"], t["status"],
           t["basis"] or "-"]
          for t in check_targets(rows)]
  return _table(["target (issue 5)", "goal", "measured", "status", "basis"], body)


def render(rows: list[dict[str, Any]]) -> str:
  """All tables, the failures, and one target check per device that ran the train step."""
  parts = []
  for title, fn, name in (("Train step", train_step_table, "train_step"),
                          ("Evaluation", evaluation_table, "evaluation"),
                          ("Input pipeline", input_table, "input_pipeline"),
                          ("Trainer", trainer_table, "trainer")):
    if any(str(r.get("benchmark", "")).startswith(name) and _ok(r) for r in rows):
      parts.append(f"### {title}\n\n{fn(rows)}")
  devices = sorted({device_of(r) for r in rows if r.get("benchmark") == "train_step"
                    and r.get("platform") == "gpu"})
  for dev in devices:
    # The input pipeline's lines name the host, not the accelerator: all selected ones count
    # (select one run with --commit).
    mine = [r for r in rows if device_of(r) == dev or r.get("benchmark") == "input_pipeline"]
    parts.append(f"### Targets on {dev}\n\n{targets_table(mine)}")
  failed = failures(rows)
  if failed:
    parts.append("### Not measured\n\n" + "\n".join(failed))
  return "\n\n".join(parts)


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give one or more results .jsonl files")
  rows = select(load(argv[1:]), commit=flags.FLAGS.commit, device=flags.FLAGS.device)
  print(render(rows))


if __name__ == "__main__":
  flags.DEFINE_string("commit", "", "Keep lines whose commit starts with this.")
  flags.DEFINE_string("device", "", "Keep lines whose device or device_kind contains this.")
  app.run(main)
