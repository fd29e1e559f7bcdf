"""Evaluating a trained model: in the training loop and from a saved workdir.

`evaluate` runs the dataset's protocol (`maumjax.eval.runner`) on a train state's model, with
the method's `embed`; `evaluate_workdir` restores a run made by `maumjax.train.loop` (its
config.json names the method; latest or chosen checkpoint) and evaluates it, as
`python -m experiments.evaluate --workdir=DIR` does.

Units: the runner's `Metrics` and its `eval_<dataset>.json` hold fractions in [0, 1]
(`"units": "fraction"`); what is written for people to read is in percent: metrics.json
(`result_record`, `"units": "percent"`, summary and protocol alike) and the logged scalars
(`scalars`, named `<setting>/<metric>_pct` in log.jsonl and TensorBoard).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax

from maumjax import errors
from maumjax import methods
from maumjax.eval import gallery
from maumjax.eval import metrics
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
                           out_dir=out_dir, num_ranked=ev["num_ranked"] if out_dir else 0,
                           distance=ev.get("distance", "cosine"))
  return runner.run_regdb(extract, prepared.builder, batch_size=ev["batch_size"], flip=ev["flip"],
                          out_dir=out_dir, num_ranked=ev["num_ranked"] if out_dir else 0,
                          distance=ev.get("distance", "cosine"),
                          cmc=ev.get("regdb_cmc", "plain"))


class EvalConfigError(errors.UserError, ValueError):
  """A field of the config's `eval` section has a value the protocol does not know."""


EVAL_CHOICES = {
    "sampling": gallery.SAMPLINGS,  # SYSU-MM01 gallery sampler
    "distance": metrics.DISTANCES,  # ranking distance (both datasets)
    "regdb_cmc": ("plain", "dedup"),  # RegDB CMC convention
    "select": ("last", "best_on_test"),  # the model the final evaluation scores
    "select_metric": ("r1", "mAP"),  # what 'best' means for select='best_on_test'
}


def check_config(config) -> None:
  """Checks the run config's `eval` section before any training, so a typo does not surface
  only when the run is over.

  Args:
    config: the run config (ConfigDict or dict) with its `eval` and `train` sections.

  Raises:
    EvalConfigError: a field of `EVAL_CHOICES` holds another value, a SYSU setting is unknown,
      the synthetic SYSU data holds fewer images per camera folder than a multi-shot gallery
      draws, or `eval.select='best_on_test'` has no quick evaluations to select from
      (`train.eval_every_epochs=0`). The message names the field, the value and the choices.
  """
  ev = config["eval"]
  for key, choices in EVAL_CHOICES.items():
    if key in ev and ev[key] not in choices:
      raise EvalConfigError(f"config.eval.{key}={ev[key]!r} is not one of {list(choices)}")
  for key, allowed in (("modes", protocol.SYSU_MODES), ("shots", protocol.SYSU_SHOTS)):
    bad = [v for v in ev.get(key, ()) if v not in allowed]
    if bad:
      raise EvalConfigError(f"config.eval.{key} holds {bad}; the SYSU-MM01 protocol has "
                            f"{list(allowed)}")
  data = config.get("data", {})
  synthetic = data.get("synthetic", {})
  if (not data.get("manual_dir") and data.get("name") == "sysu_mm01"
      and max(ev.get("shots", ()), default=1) > synthetic.get("images_per_camera", 10)):
    raise EvalConfigError(
        f"config.eval.shots={list(ev['shots'])} draws {max(ev['shots'])} gallery images per "
        f"camera folder, and the synthetic data's config.data.synthetic.images_per_camera="
        f"{synthetic['images_per_camera']} writes fewer; raise it to {max(ev['shots'])} or "
        f"evaluate single-shot only (config.eval.shots=1,)")
  if ev.get("select") == "best_on_test" and not config["train"]["eval_every_epochs"]:
    raise EvalConfigError("config.eval.select='best_on_test' picks among the quick "
                          "evaluations, and config.train.eval_every_epochs=0 runs none: set "
                          "it to N > 0 (an evaluation every N epochs)")


_MISSING = object()


class RunNotFoundError(errors.UserError, FileNotFoundError):
  """The run to evaluate is missing: no such folder, no config.json, no checkpoint, or none at
  the asked step (the message lists the steps there are)."""


class RunConfigError(errors.UserError, ValueError):
  """The run directory's config.json cannot be read as a run config."""


def summarize(report: runner.Report) -> dict[str, dict[str, float]]:
  """{setting: {r1, r5, r10, r20, mAP, mINP}} means over trials, in percent."""
  return {r.setting: {k: 100.0 * r.mean(k) for k in protocol.METRIC_KEYS} for r in report.results}


def scalars(summary_: dict[str, dict[str, float]]) -> dict[str, float]:
  """The logged scalars of a `summarize` summary: R1, mAP and mINP in percent.

  Named `<setting>/<metric>_pct` (e.g. 'all/single/r1_pct'), so each log.jsonl record and
  TensorBoard tag carries its unit.
  """
  return {f"{s}/{k}_pct": v for s, m in summary_.items() for k, v in m.items()
          if k in ("r1", "mAP", "mINP")}


def protocol_percent(record: dict[str, Any]) -> dict[str, Any]:
  """A copy of a runner record (`Report.record`, fractions) with its metric values in percent.

  Every setting's mean and std of r1 ... mINP, its mean CMC, and each trial's r1 ... mINP and
  CMC are multiplied by 100; counts (`num_valid`, `queries`, ...) are kept. `"units"` becomes
  'percent'.

  Raises:
    ValueError: the record is not labelled `"units": "fraction"`.
  """
  if record.get("units") != protocol.UNITS_FRACTION:
    raise ValueError(f"expected a runner record in fractions (units 'fraction'); got units "
                     f"{record.get('units')!r}")

  def pct(values):
    return {k: 100.0 * v if k in protocol.METRIC_KEYS else v for k, v in values.items()}

  def setting(s):
    return {**s, "mean": pct(s["mean"]), "std": pct(s["std"]),
            "cmc_mean": [100.0 * v for v in s["cmc_mean"]],
            "trials": [{**pct(t), "cmc": [100.0 * v for v in t["cmc"]]} for t in s["trials"]]}

  return {**record, "units": protocol.UNITS_PERCENT,
          "settings": [setting(s) for s in record["settings"]]}


def result_record(report: runner.Report) -> dict[str, Any]:
  """What metrics.json holds besides the run's facts, every metric value in percent.

  Returns:
    {'units': 'percent', 'summary': `summarize(report)`, 'table': the printed table (percent),
    'protocol': `protocol_percent(report.record)`}.
  """
  return {"units": protocol.UNITS_PERCENT, "summary": summarize(report), "table": report.table,
          "protocol": protocol_percent(report.record)}


def _read_config(workdir: Path) -> dict[str, Any]:
  """The run config in `<workdir>/config.json`; raises a one-line `UserError` if unusable."""
  how = ("--workdir must be a run directory made by python -m experiments.<method> "
         "(e.g. experiments.maum)")
  if not workdir.is_dir():
    raise RunNotFoundError(f"run directory {workdir} does not exist: {how}")
  path = workdir / "config.json"
  if not path.is_file():
    raise RunNotFoundError(f"{workdir} has no config.json, so it is not a run directory: {how}")
  try:
    config = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunConfigError(errors.one_line(
        f"{path} is not valid JSON ({e}); it must be the config.json a training run wrote: "
        f"{how}")) from e
  missing = [k for k in ("method", "eval") if not isinstance(config, dict) or k not in config]
  if missing:
    raise RunConfigError(f"{path} has no {' or '.join(map(repr, missing))} entry; it must be "
                         f"the config.json a training run wrote: {how}")
  return config


def _checkpoint_step(workdir: Path, step: int | None) -> int:
  """The checkpoint step to restore (`step`, or the latest); raises a one-line `UserError`."""
  # Listed without opening a Checkpointer, which would create the folder.
  steps = checkpoint_lib.saved_steps(workdir)
  if not steps:
    raise RunNotFoundError(f"{workdir} has no checkpoint (no step under "
                           f"{workdir / 'checkpoints'}): train the run first, or pass the run "
                           "directory that holds its checkpoints")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise RunNotFoundError(f"{workdir} has no checkpoint at step {step}; its checkpoints are at "
                           f"steps {', '.join(map(str, steps))} (pass one of them as --step, or "
                           "leave --step out for the latest)")
  return step


def evaluate_workdir(workdir: str | os.PathLike, *, step: int | None = None,
                     overrides: dict[str, Any] | None = None,
                     model_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Restores a run's checkpoint and evaluates it with the full protocol.

  Args:
    workdir: a run directory (config.json + checkpoints/).
    step: checkpoint step (default: latest).
    overrides: replacements for fields of the config's `eval` section.
    model_overrides: replacements for test-time fields of the config's `model` section (BDF's
      `tta_derivative`); each must be a field the run's model section has, with a value of
      the same type. The results then go to `eval_step<step>_<field>-<value>...`.

  Returns:
    `result_record(report)` (units, summary, table, protocol; percent) plus 'step' and
    'out_dir'; also written to `<workdir>/eval_step<step>/metrics.json`, next to the runner's
    eval_<dataset>.json (fractions), CMC plot and ranked lists.

  Raises:
    RunNotFoundError: (a `UserError` and `FileNotFoundError`) the workdir does not exist, has no
      config.json, has no checkpoint, or has none at `step` (the message lists the steps it
      has); checked before any data is prepared.
    RunConfigError: (a `UserError` and `ValueError`) config.json is not a run config, or a
      model override names a field it lacks or has a value of another type.
  """
  workdir = Path(workdir).absolute()
  config = _read_config(workdir)
  step = _checkpoint_step(workdir, step)
  config["eval"].update(overrides or {})
  suffix = ""
  for field, value in (model_overrides or {}).items():
    old = config["model"].get(field, _MISSING)
    if old is _MISSING or type(old) is not type(value):
      raise RunConfigError(
          f"model override {field}={value!r}: the run's model section has "
          + ("no such field" if old is _MISSING else f"{field}={old!r} ({type(old).__name__})")
          + f"; its fields are {sorted(config['model'])}")
    config["model"][field] = value
    suffix += f"_{field}-{value}"
  method = methods.get(config["method"])
  prepared, _, pipe, _ = inputs.prepare(config)
  setup = method.init(config, inputs.data_info(pipe, config), seed=config["seed"])
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    state, meta = ckpt.restore(setup.state, step)
  out_dir = workdir / f"eval_step{meta['step']}{suffix}"
  report = evaluate(method, setup, state, prepared, config, full=True, out_dir=out_dir)
  result = {**result_record(report), "step": meta["step"], "out_dir": str(out_dir)}
  (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
  return result
