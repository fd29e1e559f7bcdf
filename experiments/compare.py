"""Compare the methods: `python -m experiments.compare [--config=...:PRESET] [--workdir=D]`.

Trains each method's key row and its baseline row (`--config.rows.<method>`) for every
infrared fraction (`--config.imbalance`) and seed (`--config.seeds`) on the same data and
evaluates every run with the same protocol (`--config.eval.*`), one run per folder:

  <workdir>/runs/<method>_<row>/imb<fraction>/seed<s>/   the method's own run (MMM: its stages)
      compare_run.json                                  what the run is, where its result is
      metrics.json  (MMM: <last trained stage>/metrics.json)
      metrics_<sampler>.json                            re-evaluation with a further sampler
  <workdir>/report/   report.json, report.md, cmc_<setting>.png, map_bars.png, ranked.png,
                      imbalance.png (with more than one fraction)

Each run is an ordinary run of `python -m experiments.<method>` (MMM: `experiments.mmm`'s
stages) with the method's preset `<budget>_<row>`, `seed` and `data.pipeline.seed` set to the
seed, `data.pipeline.imbalance_fraction` to the fraction and the `eval` section to the shared
protocol. A run whose result exists is not trained again ("done earlier"), and an interrupted
one resumes from its last checkpoint, so the same command continues a comparison. An MMM row
whose stages another row trains with the same config (the CMC row: the full row's stages 1-2)
links them (`shared_stages`) instead of training them again. The report
is a function of the run folders alone: `compare_report.write_report(workdir)` re-makes it.
Presets and fields: experiments/configs/compare.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli
from experiments import launch
from experiments import mmm as mmm_driver
from experiments.configs import bdf as bdf_configs
from experiments.configs import compare as compare_configs
from experiments.configs import maum as maum_configs
from experiments.configs import mmm as mmm_configs
from experiments.configs import mpanet as mpanet_configs
from maumjax.errors import UserError

CONFIGS = {"maum": maum_configs, "mpanet": mpanet_configs, "bdf": bdf_configs,
           "mmm": mmm_configs}
SAMPLERS = ("agw", "official")  # maumjax.eval.gallery.SAMPLINGS (that module imports scipy)
SYNTHETIC_BACKBONE = compare_configs.SYNTHETIC_BACKBONE


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the comparison: a method's row at one fraction and seed."""

  method: str
  row: str
  imbalance: float
  seed: int
  config: Any  # the method's ConfigDict, ready to train
  order: tuple[int, int]  # (method, row) position in the comparison, for the report

  def folder(self, workdir: Path) -> Path:
    return workdir / "runs" / f"{self.method}_{self.row}" / f"imb{self.imbalance!r}" / \
        f"seed{self.seed}"

  def stages(self) -> list[str]:
    """MMM: the row's trained stages (the last one is the result); others: []."""
    if self.method != "mmm":
      return []
    return [s for s in mmm_driver.parse_stages(self.config.stages) if s in mmm_driver.TRAINED]

  def record(self) -> dict[str, Any]:
    """compare_run.json: what `compare_report` needs to read the run folder."""
    stages = self.stages()
    return {"method": self.method, "row": self.row, "imbalance": self.imbalance,
            "seed": self.seed, "order": list(self.order), "preset": self.config.preset,
            "stages": stages,
            "result": f"{stages[-1]}/metrics.json" if stages else "metrics.json"}


def _items(text: str, field: str) -> list[str]:
  items = [s.strip() for s in str(text).split(",") if s.strip()]
  if not items:
    raise UserError(f"config.{field}={text!r} is empty; give a comma-separated list")
  return items


def _numbers(text: str, field: str, kind: type) -> list:
  try:
    return [kind(s) for s in _items(text, field)]
  except ValueError:
    raise UserError(f"config.{field}={text!r}: expected comma-separated {kind.__name__}s, "
                    f"e.g. '0,1,2'") from None


# What every run shares (the data, the seeds, the protocol): `overrides` may not change it.
# A method's training length is its own (its preset's epochs): `data.pipeline.epoch_fraction`
# may be overridden for one method.
_SHARED = ("seed", "eval.", "data.synthetic.", "data.manual_dir", "data.name",
           "data.pipeline.seed", "data.pipeline.imbalance_fraction")


def parse_overrides(text: str) -> dict[str, list[tuple[str | None, str, Any]]]:
  """`overrides`: 'METHOD[/ROW].FIELD=VALUE,...' -> {method: [(row, field, value), ...]}.

  FIELD is a dotted path in the method's config (e.g. `mmm.mmm.eps=0.45` sets MMM's
  `config.mmm.eps`), set in every run of the method, or with `/ROW` only in that row's runs
  (e.g. `mpanet/mpanet.model.modality_attention=1` leaves MPANet's baseline without a MAM);
  row None means every row. VALUE is a Python literal (a number, True / False, a quoted
  string); anything else is taken as a string.

  Raises:
    UserError: an item without METHOD.FIELD=VALUE, an unknown method or row, or a field every
      run shares (seed, eval, the data and its fraction).
  """
  import ast

  out: dict[str, list[tuple[str | None, str, Any]]] = {}
  for item in (s.strip() for s in str(text).split(",")):
    if not item:
      continue
    key, sep, raw = item.partition("=")
    target, dot, field = key.strip().partition(".")
    if not (sep and dot and field):
      raise UserError(f"config.overrides item {item!r}: expected METHOD.FIELD=VALUE or "
                      "METHOD/ROW.FIELD=VALUE, e.g. mmm.mmm.eps=0.45")
    method, slash, row = target.partition("/")
    if method not in CONFIGS:
      raise UserError(f"config.overrides item {item!r}: unknown method {method!r}; the "
                      f"methods are {', '.join(CONFIGS)}")
    if slash and row not in CONFIGS[method].ROWS:
      raise UserError(f"config.overrides item {item!r}: unknown row {row!r}; {method}'s rows "
                      f"are {', '.join(CONFIGS[method].ROWS)}")
    if any(field == p.rstrip(".") or field.startswith(p) for p in _SHARED):
      raise UserError(f"config.overrides item {item!r}: {field} is shared by every run of the "
                      "comparison; set it with the compare config's own fields (seeds, eval.*, "
                      "data.*, imbalance)")
    try:
      value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
      value = raw.strip()
    out.setdefault(method, []).append((row if slash else None, field, value))
  return out


def _override(config, method: str, field: str, value: Any) -> None:
  *path, last = field.split(".")
  node = config
  for part in path:
    node = node.get(part) if hasattr(node, "get") else None
  if not hasattr(node, "get") or last not in node:
    raise UserError(f"config.overrides: {method}'s config has no field {field!r} (see "
                    f"experiments/configs/{method}.py)")
  try:
    node[last] = value
  except TypeError as e:
    raise UserError(f"config.overrides: {method}.{field}={value!r}: {e}") from None


def _leaves(config, prefix: str = ""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def method_config(method: str, budget: str, row: str):
  """The method's config of preset `<budget>_<row>`.

  A budget without rows (the `smoke` presets of MAUM, MPANet and BDF) gets the budget's preset
  plus what the row changes in the synthetic presets (synthetic_<row> against synthetic).
  """
  module = CONFIGS[method]
  try:
    return module.get_config(f"{budget}_{row}")
  except ValueError:
    pass
  try:
    config = module.get_config(budget)
  except ValueError:
    raise UserError(f"config.budget={budget!r} is not a preset of experiments/configs/"
                    f"{method}.py; use synthetic, smoke, sysu or regdb") from None
  default = dict(_leaves(module.get_config("synthetic")))
  for key, value in _leaves(module.get_config(f"synthetic_{row}")):
    if key != "preset" and default.get(key) != value:
      *path, last = key.split(".")
      node = config
      for part in path:
        node = node[part]
      node[last] = value
  return config


def plan(config) -> list[Run]:
  """Every run of the comparison, checked (methods, rows, seeds, fractions), nothing trained.

  Raises:
    UserError: an unknown method or row (the message lists the valid ones), an empty or
      malformed list, a fraction outside (0, 1], an unknown budget or sampler, a bad
      `overrides` item.
  """
  methods = _items(config.methods, "methods")
  unknown = [m for m in methods if m not in CONFIGS]
  if unknown:
    raise UserError(f"config.methods={config.methods!r}: unknown method(s) "
                    f"{', '.join(unknown)}; the methods are {', '.join(CONFIGS)}")
  seeds = _numbers(config.seeds, "seeds", int)
  fractions = _numbers(config.imbalance, "imbalance", float)
  bad = [f for f in fractions if not 0.0 < f <= 1.0]
  if bad:
    raise UserError(f"config.imbalance={config.imbalance!r}: infrared fractions must be in "
                    f"(0, 1] (1.0 = balanced); got {bad}")
  overrides = parse_overrides(config.overrides)
  if config.preset == "synthetic" and config.budget in ("sysu", "regdb"):
    raise UserError(f"config.budget={config.budget!r} on the synthetic preset would train the "
                    "real-data recipes with the synthetic bench's own settings (epoch_fraction "
                    f"{config.epoch_fraction}, overrides {config.overrides!r}); use the preset: "
                    f"--config=experiments/configs/compare.py:{config.budget}")
  if config.pretrained:
    clash = [m for m, items in overrides.items()
             if any(f == "model.pretrained" for _, f, _ in items)]
    if clash:
      raise UserError(f"config.overrides sets {', '.join(clash)}'s model.pretrained and "
                      f"config.pretrained={config.pretrained!r} sets every method's: give one "
                      "of them (config.pretrained='' to keep only the override)")
  if config.pretrained == SYNTHETIC_BACKBONE and config.data.manual_dir:
    raise UserError(f"config.pretrained={SYNTHETIC_BACKBONE!r} is the synthetic data's stand-in "
                    f"for ImageNet, and config.data.manual_dir={config.data.manual_dir!r} is "
                    "real data: give the ImageNet file, --config.pretrained=/path/to/"
                    "resnet50-0676ba61.pth (or '' to train from scratch)")
  samplers = _items(config.eval.samplers, "eval.samplers")
  if any(s not in SAMPLERS for s in samplers):
    raise UserError(f"config.eval.samplers={config.eval.samplers!r}: the SYSU-MM01 gallery "
                    f"samplers are {', '.join(SAMPLERS)}")
  runs = []
  for method in methods:
    rows = _items(config.rows[method], f"rows.{method}")
    bad = [r for r in rows if r not in CONFIGS[method].ROWS]
    if bad:
      raise UserError(f"config.rows.{method}={config.rows[method]!r}: unknown row(s) "
                      f"{', '.join(bad)}; {method}'s rows are "
                      f"{', '.join(CONFIGS[method].ROWS)}")
    for j, row in enumerate(rows if config.baselines else rows[:1]):
      for fraction in fractions:
        for seed in seeds:
          c = method_config(method, config.budget, row)
          c.seed = seed
          c.data.pipeline.update(seed=seed, imbalance_fraction=fraction,
                                 epoch_fraction=config.epoch_fraction)
          if config.data.manual_dir:
            c.data.manual_dir = config.data.manual_dir
          c.data.synthetic.update({k: v for k, v in config.data.synthetic.items() if v >= 0})
          if config.pretrained and config.pretrained != SYNTHETIC_BACKBONE:
            c.model.pretrained = config.pretrained
          c.eval.update(trials=config.eval.trials, modes=tuple(config.eval.modes),
                        shots=tuple(config.eval.shots), sampling=samplers[0],
                        num_ranked=config.eval.num_ranked)
          for only, field, value in overrides.get(method, ()):
            if only in (None, row):
              _override(c, method, field, value)
          # The report's row order: the methods' own order (CONFIGS), whichever were asked
          # for this time, so a later partial invocation does not reorder a workdir's report.
          runs.append(Run(method, row, fraction, seed, c, (list(CONFIGS).index(method), j)))
  return runs


def extra_samplers(config, runs: list[Run]) -> list[str]:
  """The samplers after the first, for the data at hand: none on RegDB (no gallery draw);
  'official' needs `<SYSU-MM01>/exp/rand_perm_cam.mat` (the synthetic data has none).

  Raises:
    UserError: 'official' asked for on real SYSU-MM01 data without the permutation file.
  """
  extra = _items(config.eval.samplers, "eval.samplers")[1:]
  if not extra or runs[0].config.data.name != "sysu_mm01":
    return []
  if "official" in extra:
    if not config.data.manual_dir:
      print("eval.samplers: 'official' skipped, the synthetic data has no rand_perm_cam.mat")
      return [s for s in extra if s != "official"]
    from maumjax.data import layouts
    from maumjax.eval import gallery

    perm = layouts.find_sysu_root(config.data.manual_dir) / "exp" / gallery.PERM_FILE_NAME
    if not perm.is_file():
      raise UserError(f"config.eval.samplers={config.eval.samplers!r} needs {perm} for the "
                      "official sampler; copy it from the official repository's "
                      "evaluation/data_split/, or set --config.eval.samplers=agw")
  return extra


def _without_stages(config) -> dict[str, Any]:
  out = config.to_dict()
  out.pop("stages")
  out.pop("preset")
  return out


def shared_stages(runs: list[Run]) -> dict[int, tuple[int, list[str]]]:
  """MMM rows whose trained stages another planned run trains identically.

  MMM's CMC row is stages 1-2 of the full row's pipeline with the same config: training them
  twice would cost a third of an MMM comparison for identical weights. A run R takes its
  stages from the first other run S at the same fraction and seed whose config equals R's
  but for `stages` (and `preset`) and whose trained stages include all of R's.

  Returns:
    {index of R in runs: (index of S, R's stages)}.
  """
  out = {}
  for i, run in enumerate(runs):
    if run.method != "mmm":
      continue
    mine = run.stages()
    for j, other in enumerate(runs):
      if (j != i and j not in out and other.method == "mmm"
          and (other.imbalance, other.seed) == (run.imbalance, run.seed)
          and set(mine) <= set(other.stages()) and len(mine) < len(other.stages())
          and _without_stages(other.config) == _without_stages(run.config)):
        out[i] = (j, mine)
        break
  return out


def _link_stages(run: Run, source: Run, stages: list[str], workdir: Path) -> None:
  """Trains `source`'s `stages` if they are not finished and links them into `run`'s folder."""
  folder, source_folder = run.folder(workdir), source.folder(workdir)
  if not all((source_folder / s / "metrics.json").is_file() for s in stages):
    print(f"{run.method}/{run.row} seed{run.seed}: stages {', '.join(stages)} are those of "
          f"{source.method}/{source.row}; training them in {source_folder}")
    config = source.config.copy_and_resolve_references()
    with config.unlocked():
      config.stages = ",".join(stages)
    source_folder.mkdir(parents=True, exist_ok=True)
    mmm_driver.run_stages(config, source_folder)
  folder.mkdir(parents=True, exist_ok=True)
  for stage in stages:
    link = folder / stage
    if not link.is_symlink():
      if link.exists():
        raise UserError(f"{link} exists but the comparison shares it with {source_folder / stage}"
                        f"; delete {link} (it holds the same training) and run again")
      link.symlink_to(os.path.relpath(source_folder / stage, folder), target_is_directory=True)


def synthetic_backbones(config, runs: list[Run], workdir: Path) -> dict[str, Path]:
  """`pretrained='synthetic'`: one `experiments.pretrain` backbone per (arch, image size) of
  the runs, in `<workdir>/pretrained/`, set as each run's `model.pretrained`. A backbone is
  trained once per config into the cache (`pretrain.cache_file`) and copied from there, so
  another comparison with the same `pretrain.*` fields reuses it.

  Returns:
    {file name: path} of the backbones.
  """
  import shutil

  from experiments import pretrain

  made = {}
  for run in runs:
    arch, height, width = run.config.model.arch, run.config.data.height, run.config.data.width
    path = workdir / "pretrained" / f"{arch}_{height}x{width}.safetensors"
    if path.name not in made:
      if path.is_file():
        print(f"pretrained backbone: {path} (made earlier)")
      else:
        pconfig = pretrain.PretrainConfig(arch=arch, height=height, width=width,
                                          nir=run.config.data.synthetic.nir,
                                          **config.pretrain.to_dict())
        cached = pretrain.cache_file(pconfig)
        if cached.is_file():
          print(f"pretrained backbone: {path} from {cached} (made earlier)")
        else:
          print(f"pretrained backbone: training {arch} at {height}x{width} into {cached}")
          summary = pretrain.pretrain_backbone(cached, pconfig)
          print(f"pretrained backbone: {summary['classes']} classes, train accuracy "
                f"{summary['train_accuracy']:.2f}, {summary['seconds']:.0f} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ""):  # the weights last: their presence means done
          source = Path(f"{cached}{suffix}")
          if source.is_file():
            partial = Path(f"{path}{suffix}.partial")
            shutil.copyfile(source, partial)
            partial.replace(f"{path}{suffix}")
      made[path.name] = path
    run.config.model.pretrained = str(path)
  return made


def run_all(config, workdir: str | Path) -> dict[str, Any]:
  """Trains every run that has no result yet, re-evaluates with the further samplers and
  writes the report; returns `compare_report.write_report`'s summary."""
  from experiments import compare_report  # matplotlib: after the command line is checked

  runs = plan(config)
  workdir = Path(workdir).absolute()
  for run in runs:  # every config is checked before anything trains
    if run.method == "mmm":
      mmm_driver.check_pipeline(run.config, mmm_driver.parse_stages(run.config.stages))
    launch._check(run.method, run.config, str(run.folder(workdir)), ())  # noqa: SLF001
  samplers = extra_samplers(config, runs)
  if config.pretrained == SYNTHETIC_BACKBONE:
    synthetic_backbones(config, runs, workdir)
  shared = shared_stages(runs)
  for i, run in enumerate(runs):
    folder = run.folder(workdir)
    record = run.record()
    if i in shared:
      source, stages = shared[i]
      record["shared_stages"] = {"stages": stages, "from": os.path.relpath(
          runs[source].folder(workdir), folder)}
    result = folder / record["result"]
    name = f"{run.method}/{run.row} imb{run.imbalance!r} seed{run.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / compare_report.RUN_FILE).write_text(json.dumps(record, indent=1))
    if i in shared:
      _link_stages(run, runs[shared[i][0]], shared[i][1], workdir)
    if result.is_file():
      print(f"{name}: done earlier ({result})")
    else:
      print(f"{name}: training in {folder}")
      if run.method == "mmm":
        mmm_driver.run_stages(run.config, folder)
      else:
        launch.run(run.method, run.config, str(folder))
    for sampler in samplers:
      out = result.parent / f"metrics_{sampler}.json"
      if not out.is_file():
        from maumjax.train import evaluation

        print(f"{name}: evaluating again with the {sampler} gallery sampler")
        again = evaluation.evaluate_workdir(result.parent, overrides={"sampling": sampler})
        out.write_text(json.dumps(again, indent=1))
  return compare_report.write_report(workdir)


def main() -> None:
  default = str(launch.CONFIG_DIR / "compare.py")
  config_file = cli.load_config("config", default)
  config_flag = config_flags.DEFINE_config_file(
      "config", default, "Config file and preset, FILE[:PRESET]; --config.<field>=VALUE "
      "overrides a field (--help lists the presets and fields).", lock_config=True)
  workdir_flag = flags.DEFINE_string(
      "workdir", "", "Comparison folder (runs/, report/); default: a new folder under "
      "<cache>/runs/. Started again with the same workdir, finished runs are not retrained.")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}; flags are --name=value")
    logging.set_verbosity(logging.WARNING)
    config = config_flag.value
    plan(config)  # the user's mistakes first, before JAX is imported
    from maumjax import compilation_cache
    from maumjax.data import prepare

    compilation_cache.enable()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = workdir_flag.value or str(
        prepare.cache_root() / "runs" / f"compare-{config.preset}-{stamp}")
    print(f"workdir: {workdir}")
    report = run_all(config, workdir)
    print(report["table"])
    print(f"report: {report['dir']}")

  cli.run(_main, config=config_file)


if __name__ == "__main__":
  main()
