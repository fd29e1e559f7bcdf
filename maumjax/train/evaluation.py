"""Evaluating a trained model: in the training loop and from a saved workdir.

`evaluate` runs the dataset's protocol (`maumjax.eval.runner`) on a train state's model, with
the method's `embed`; `evaluate_workdir` restores a run made by `maumjax.train.loop` (its
config.json names the method; latest or chosen checkpoint) and evaluates it, as
`python -m experiments.evaluate --workdir=DIR` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax

from maumjax import methods
from maumjax.eval import protocol
from maumjax.eval import runner
from maumjax.train import checkpoint as checkpoint_lib
from maumjax.train import inputs


def evaluate(method, setup, state, prepared, config: dict[str, Any], *, full: bool,
             out_dir: str | os.PathLike | None = None) -> runner.Report:
  """Runs the evaluation protocol on the state's model.

  Args:
    method: the method module (`maumjax.methods.METHODS[config['method']]`).
    setup: the method's setup (model).
    state: an unreplicated train state.
    prepared: the `PreparedDataset` (builder and manual dir).
    config: run config; its `eval` section selects trials/settings.
    full: every setting and trial of the protocol (`eval.trials`), else the quick in-training
      check (`eval.quick_trials`, all-search single-shot on SYSU).
    out_dir: where the runner writes its JSON record and plots (None: nothing written).
  """
  ev = config["eval"]
  embed = method.embed(setup)
  variables = jax.device_get(method.variables_of(state))

  def extract(images, modality):
    return embed(variables, images, modality)

  if prepared.name == "sysu_mm01":
    modes, shots = (tuple(ev["modes"]), tuple(ev["shots"])) if full else (("all",), (1,))
    return runner.run_sysu(extract, prepared.builder, root=prepared.manual_dir, modes=modes,
                           shots=shots, trials=tuple(range(ev["trials"] if full
                                                           else ev["quick_trials"])),
                           sampling=ev["sampling"], batch_size=ev["batch_size"], flip=ev["flip"],
                           out_dir=out_dir, num_ranked=ev["num_ranked"] if out_dir else 0)
  return runner.run_regdb(extract, prepared.builder, batch_size=ev["batch_size"], flip=ev["flip"],
                          out_dir=out_dir, num_ranked=ev["num_ranked"] if out_dir else 0)


def summarize(report: runner.Report) -> dict[str, dict[str, float]]:
  """{setting: {r1, r5, r10, r20, mAP, mINP}} means over trials (percent)."""
  return {r.setting: {k: 100.0 * r.mean(k) for k in protocol.METRIC_KEYS} for r in report.results}


def scalars(summary_: dict[str, dict[str, float]]) -> dict[str, float]:
  return {f"{s}/{k}": v for s, m in summary_.items() for k, v in m.items()
          if k in ("r1", "mAP", "mINP")}


def evaluate_workdir(workdir: str | os.PathLike, *, step: int | None = None,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Restores a run's checkpoint and evaluates it with the full protocol.

  Args:
    workdir: a run directory (config.json + checkpoints/).
    step: checkpoint step (default: latest).
    overrides: replacements for fields of the config's `eval` section.

  Returns:
    {'summary', 'table', 'protocol', 'step', 'out_dir'}; also written to
    `<workdir>/eval_step<step>/metrics.json`.

  Raises:
    FileNotFoundError: the workdir has no config.json or no checkpoint.
  """
  workdir = Path(workdir).absolute()
  path = workdir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: --workdir must be a run directory made by "
                            "python -m experiments.<method> (e.g. experiments.maum)")
  config = json.loads(path.read_text())
  config["eval"].update(overrides or {})
  method = methods.get(config["method"])
  prepared, _, pipe, _ = inputs.prepare(config)
  setup = method.init(config, inputs.data_info(pipe, config), seed=config["seed"])
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first")
    state, meta = ckpt.restore(setup.state, step)
  out_dir = workdir / f"eval_step{meta['step']}"
  report = evaluate(method, setup, state, prepared, config, full=True, out_dir=out_dir)
  result = {"summary": summarize(report), "table": report.table, "protocol": report.record,
            "step": meta["step"], "out_dir": str(out_dir)}
  (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
  return result
