"""MMM entry point: `python -m experiments.mmm [--config=...:PRESET] [--config.x=y] [--workdir=D]`.

With no arguments: writes the built-in synthetic SYSU-MM01-layout data into the cache
(`~/.cache/maumjax`, or $MAUMJAX_CACHE), then runs MMM's stages without reading a training
identity label: stage 1 (per-modality clustering memories), stage 2 (+ the joint
cross-modality memory), the export and multi-memory matching (MMLM), and the final stage
(fixed matched pseudo-labels, GMM-weighted CE + triplet + Intra + Inter). Each stage's trainer
run is a folder of the workdir (stage1/, stage2/, final/; mmlm/ holds the matched labels), each
evaluated with the full protocol; the last one's Rank-1 / mAP / mINP are printed.
`diagnostics.png` draws the pseudo-labels' agreement with the ground truth over the stages
(ARI, NMI, purity, ...; the ground truth is read only for this report).

A stage whose run finished is not run again when the same --workdir is started again; an
interrupted one resumes from its last checkpoint. `--config.stages=stage1,stage2` runs a
subset (a stage needs the earlier ones' results in the workdir).

The paper's online pipeline (preset `<data>_paper`: `mmm.pipeline='paper_online'`,
`stages='online'`) is one trained stage in <workdir>/online: re-clustering, memories and the
per-epoch matching at every epoch start, ClusterNCE + Intra + Inter in one objective. Presets
and switches: experiments/configs/mmm.py.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from experiments import cli
from experiments import launch
from maumjax.errors import UserError

STAGES = ("stage1", "stage2", "mmlm", "final", "online")
TRAINED = ("stage1", "stage2", "final", "online")
OFFLINE = STAGES[:4]  # pipeline 'code_offline'; 'online' alone is 'paper_online'
MATCHING_KEYS = ("matching", "cost_sum_over", "unmatched", "off_by_one", "sub_memories")
TOP_LEVEL = ("method", "preset", "seed", "parallel", "distributed", "coordinator_address",
             "num_processes", "process_id")


def parse_stages(text: str) -> tuple[str, ...]:
  """'stage1,stage2' -> ('stage1', 'stage2'), checked: known names, in pipeline order."""
  stages = tuple(s.strip() for s in str(text).split(",") if s.strip())
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise UserError(f"config.stages={text!r}: name stages from {STAGES}, comma-separated")
  order = [STAGES.index(s) for s in stages]
  if order != sorted(set(order)):
    raise UserError(f"config.stages={text!r}: list each stage once, in the order {STAGES}")
  if "online" in stages and len(stages) > 1:
    raise UserError(f"config.stages={text!r}: 'online' (the paper pipeline) is a stage of its "
                    f"own; the offline pipeline's stages are {OFFLINE}")
  return stages


def check_pipeline(config: dict[str, Any], stages: tuple[str, ...]) -> None:
  """The stages belong to `config.mmm.pipeline`: 'online' to 'paper_online', the others to
  'code_offline'."""
  pipeline = config["mmm"]["pipeline"]
  if (pipeline == "paper_online") != (stages == ("online",)):
    raise UserError(f"config.stages={','.join(stages)!r} with config.mmm.pipeline="
                    f"{pipeline!r}: the paper_online pipeline runs config.stages='online' "
                    f"(preset <data>_paper), code_offline the stages of {OFFLINE}")


def _capped_p(config: dict[str, Any], num_classes: int) -> int | None:
  """The final stage's P when MMLM left fewer classes than the P identities a step draws (an
  infrared clustering that collapsed, e.g. with little infrared data): all of them [I]; None
  when the configured P stands."""
  p = int(config["final"]["pipeline"].get("num_identities",
                                          config["data"]["pipeline"]["num_identities"]))
  return num_classes if 0 < num_classes < p else None


def stage_config(config: dict[str, Any], stage: str, workdir: Path,
                 num_classes: int = 0) -> dict[str, Any]:
  """The trainer config of one trained stage (a plain dict, as config.json stores it)."""
  out = {k: copy.deepcopy(config[k]) for k in TOP_LEVEL}
  for section in ("data", "model", "train", "eval"):
    out[section] = copy.deepcopy(config[section])
  sc = config[stage]
  out["num_epochs"] = sc["num_epochs"]
  out["optim"] = copy.deepcopy(sc["optim"])
  pipe = dict(sc["pipeline"])
  if stage == "stage2":  # two optimiser steps (per-modality, joint) per iteration
    pipe["steps_per_epoch"] = 2 * int(pipe["steps_per_epoch"])
  if stage == "final":
    pipe["warm_epochs"] = config["mmm"]["warm_epochs"]
    if (capped := _capped_p(config, num_classes)) is not None:
      pipe["num_identities"] = capped
  out["data"]["pipeline"].update(pipe)
  mmm = dict(config["mmm"], stage=stage)
  if stage == "stage2":
    mmm["init_from"] = str(workdir / "stage1")
    # eval.select='best_on_test': stage 2 starts from stage 1's pick (mmm.md §9 row 17).
    mmm["init_best"] = config["eval"].get("select", "last") == "best_on_test"
  if stage != "online":  # the code's 'best': test mAP in Baseline.py, Rank-1 in main.py
    out["eval"]["select_metric"] = "r1" if stage == "final" else "mAP"
  if stage == "final":
    mmm.update(labels_file=str(workdir / "mmlm" / "labels.npz"), num_classes=num_classes)
  if stage == "online":  # the per-epoch matching reads the mmlm section
    mmm.update({k: config["mmlm"][k] for k in MATCHING_KEYS})
  out["mmm"] = mmm
  return out


def _needs(workdir: Path, stage: str, what: Path) -> None:
  if not what.exists():
    raise UserError(f"stage {stage} needs {what}, which an earlier stage writes; run the "
                    f"earlier stages first (e.g. --config.stages={','.join(STAGES)})")


def _diagnostics_records(workdir: Path) -> list[dict[str, Any]]:
  """The pseudo-label diagnostics of every stage so far, in pipeline order."""
  from maumjax.train import writers

  records = []
  for stage in STAGES:
    if stage == "mmlm":
      path = workdir / "mmlm" / "mmlm.json"
      if path.is_file():
        summary = json.loads(path.read_text())
        if "after" in summary:
          records.append({"stage": "mmlm", "epoch": 0, **summary["after"]})
      continue
    if (workdir / stage / "log.jsonl").is_file():
      for r in writers.read_log(workdir / stage, kind="pseudo_labels"):
        records.append({**r, "stage": stage})
  return records


def run_stages(config, workdir: str | Path, *, config_change=()) -> dict[str, Any]:
  """Runs the config's stages in `workdir`; returns {stage: metrics or MMLM summary}."""
  from maumjax import diagnostics
  from maumjax.methods import mmm as mmm_method
  from maumjax.train import loop

  config = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))
  workdir = Path(workdir)
  stages = parse_stages(config["stages"])
  check_pipeline(config, stages)
  results: dict[str, Any] = {}
  num_classes = 0
  for stage in STAGES:
    if stage not in stages:
      continue
    if stage == "mmlm":
      out = workdir / "mmlm"
      if (out / "mmlm.json").is_file() and (out / "labels.npz").is_file():
        print(f"mmlm: done earlier ({out}), not run again")
        results[stage] = json.loads((out / "mmlm.json").read_text())
      else:
        _needs(workdir, stage, workdir / "stage2" / "metrics.json")
        print(f"mmlm: export and matching of {workdir / 'stage2'} into {out}")
        results[stage] = mmm_method.export_and_match(
            stage_config(config, "stage2", workdir), workdir / "stage2", out,
            **config["mmlm"])
      s = results[stage]
      print(f"mmlm: {s['clusters_rgb']} visible and {s['clusters_ir']} infrared clusters -> "
            f"{s['num_classes']} classes")
      continue
    if stage == "stage2":
      _needs(workdir, stage, workdir / "stage1" / "metrics.json")
    if stage == "final":
      _needs(workdir, stage, workdir / "mmlm" / "mmlm.json")
      num_classes = json.loads((workdir / "mmlm" / "mmlm.json").read_text())["num_classes"]
    run_dir = workdir / stage
    if (run_dir / "metrics.json").is_file():
      print(f"{stage}: finished earlier ({run_dir}), not run again")
      results[stage] = json.loads((run_dir / "metrics.json").read_text())
    else:
      print(f"{stage}: training in {run_dir}")
      if stage == "final" and _capped_p(config, num_classes) is not None:
        print(f"final: MMLM left {num_classes} classes, fewer than the sampler's P; each step "
              f"draws all {num_classes}")
      results[stage] = loop.train_and_evaluate(
          stage_config(config, stage, workdir, num_classes), run_dir,
          config_change=tuple(config_change))
    print(f"{stage}:\n{results[stage]['table']}")
  records = _diagnostics_records(workdir)
  if records:
    png = diagnostics.plot_history(records, workdir / "diagnostics.png",
                                   title=f"MMM pseudo-labels ({config['preset']})")
    print(f"pseudo-label diagnostics: {png}")
  return results


def main() -> None:
  default = str(launch.CONFIG_DIR / "mmm.py")
  config_file = cli.load_config("config", default)
  config_flag, workdir_flag, change_flag = launch._define_flags(default)  # noqa: SLF001

  def _main(argv):
    from absl import app, logging

    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}; flags are --name=value")
    logging.set_verbosity(logging.WARNING)
    config = config_flag.value
    check_pipeline(config, parse_stages(config.stages))
    # The method, --config_change, the workdir path, the eval fields and the pretrained file
    # are checked before any data is prepared, as for every entry point.
    launch._check("mmm", config, workdir_flag.value, change_flag.value)  # noqa: SLF001
    from maumjax import compilation_cache
    from maumjax.data import prepare

    compilation_cache.enable()
    workdir = workdir_flag.value or str(
        prepare.cache_root() / "runs" / f"mmm-{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"workdir: {workdir}")
    results = run_stages(config, workdir, config_change=change_flag.value)
    last = [s for s in TRAINED if s in results]
    if last:
      r = results[last[-1]]
      print(f"MMM result ({last[-1]}):\n{r['table']}")

  cli.run(_main, config=config_file)


if __name__ == "__main__":
  main()
