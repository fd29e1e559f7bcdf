"""The comparison report, made from the run folders alone: `write_report(workdir)`.

Reads every `<workdir>/runs/*/imb*/seed*/compare_run.json` (written by experiments/compare.py:
method, row, infrared fraction, seed, where the result is) with the run's `metrics.json` (MMM:
its last trained stage's) and any `metrics_<sampler>.json` re-evaluation, and writes
`<workdir>/report/`:

* report.json: every run's numbers per setting and sampler, wall time (`run.train_seconds`,
  summed over MMM's trained stages), images/s (`run.train_images_per_s`, MMM: the result
  stage's), parameter count (the trained parameters in the result's last checkpoint, MAUM's
  proxies and the classifiers included) and protocol; the mean and standard deviation over
  seeds of each method / row / fraction / sampler / setting; the protocols in use.
* report.md: the same as tables (percent, mean ± std over seeds), with the protocol line.
* cmc_<setting>.png: every method row's CMC, the mean over seeds of each run's mean CMC.
* map_bars.png: mAP, mean with std error bars, grouped by setting.
* ranked.png: each method row's ranked-list sheet (the first seed) stacked, labelled. Every
  run draws its sheet for the same queries when the data and `eval.num_ranked` agree (the
  evaluation picks queries evenly spaced over the query split, `maumjax.eval.runner`);
  report.json says whether they did.
* imbalance.png (with more than one fraction): R1 and mAP of the first setting over the
  fraction, one line per method row.

Standard deviations are over seeds with ddof = 1 (the README's tables); null with one seed.
With several fractions the CMC pictures are per fraction (cmc_<setting>_imb<fraction>.png).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from maumjax.eval import plots

RUN_FILE = "compare_run.json"
# maumjax.eval.protocol.METRIC_KEYS, with the tables' names (that module imports JAX).
NAMES = {"r1": "R1", "r5": "R5", "r10": "R10", "r20": "R20", "mAP": "mAP", "mINP": "mINP"}


def mean_std(values) -> tuple[float, float | None]:
  """(mean, sample standard deviation over seeds); the std is None for a single value."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else None)


def protocol_of(metrics: dict[str, Any]) -> dict[str, Any]:
  """What makes two evaluations comparable, from a metrics.json (or a re-evaluation)."""
  p = metrics["protocol"]
  settings = [s["setting"] for s in p["settings"]]
  split = [s.split("/") for s in settings if "/" in s]
  selected = metrics["run"]["selected"] if "run" in metrics else \
      {"rule": "last", "step": metrics.get("step")}
  return {"dataset": p["dataset"], "direction": p.get("direction"), "settings": settings,
          "modes": list(dict.fromkeys(m for m, _ in split)),
          "shots": list(dict.fromkeys(s for _, s in split)),
          "sampler": p.get("sampler", "-"),  # RegDB has no gallery draw
          "trials": len(p["trials"]) if isinstance(p.get("trials"), list) else p.get("trial"),
          "distance": p["distance"], "feature_dim": p.get("feature_dim"),
          "flip": p["flip_tta"], "reranking": p["reranking"], "cmc": p["cmc"],
          "selection": selected["rule"]}


def count_params(run_dir: Path) -> int | None:
  """Trained parameters (`params` of the train state) in the run's last checkpoint, read from
  the checkpoint's metadata (no array is loaded); None without a checkpoint."""
  from maumjax.train import checkpoint

  steps = checkpoint.saved_steps(run_dir)
  if not steps:
    return None
  import orbax.checkpoint as ocp

  meta = ocp.StandardCheckpointHandler().metadata(
      run_dir / "checkpoints" / str(steps[-1]) / "state")
  return int(sum(np.prod(m.shape, dtype=np.int64) for m in _leaves(meta["params"])))


def _leaves(tree):
  if hasattr(tree, "shape"):
    yield tree
  elif hasattr(tree, "values"):
    for value in tree.values():
      yield from _leaves(value)
  elif isinstance(tree, (list, tuple)):
    for value in tree:
      yield from _leaves(value)


def data_of(config: dict[str, Any]) -> dict[str, Any]:
  """What a run trained on and started from, from its config.json: the dataset, the synthetic
  generator's settings (or the real data's folder), the pretrained file's name."""
  data = config["data"]
  out = {"dataset": data["name"]}
  if data.get("manual_dir"):
    out["manual_dir"] = data["manual_dir"]
  else:
    keys = ("seed", "num_identities", "images_per_camera" if data["name"] == "sysu_mm01"
            else "images_per_modality", "nir")
    out["synthetic"] = {k: data["synthetic"].get(k, 0.0) for k in keys}
  out["pretrained"] = Path(config["model"].get("pretrained") or "").name
  return out


def data_line(runs: list[dict[str, Any]]) -> str:
  """report.md's line on the data and the start of every run (each distinct value once)."""
  starts: dict[str, set[str]] = {}  # data source -> the starts of the runs on it
  for d in (r["data"] for r in runs):
    if "synthetic" in d:
      g = d["synthetic"]
      per = g.get("images_per_camera", g.get("images_per_modality"))
      source = (f"synthetic {d['dataset']} (generator seed {g['seed']}, {g['num_identities']} "
                f"identities, {per} images per folder, near-infrared weight {g['nir']})")
    else:
      source = f"{d['dataset']} from {d['manual_dir']}"
    starts.setdefault(source, set()).add(d["pretrained"])
  parts = []
  for source, names in sorted(starts.items()):
    files = sorted(n for n in names if n)
    start = ([f"pretrained {', '.join(files)}"] if files else []) + (
        ["from scratch"] if "" in names else [])
    parts.append(f"{source}, {' and '.join(start)}")
  return "Data and start: " + "; ".join(parts) + "."


def read_run(workdir: Path, folder: Path) -> dict[str, Any] | None:
  """One run's record for report.json (paths relative to `workdir`); None when its result is
  not there yet."""
  desc = json.loads((folder / RUN_FILE).read_text())
  result = folder / desc["result"]
  if not result.is_file():
    return None
  metrics = json.loads(result.read_text())
  evaluations = {}  # sampler -> the run's own evaluation first, then the re-evaluations
  for m in [metrics] + [json.loads(p.read_text())
                        for p in sorted(result.parent.glob("metrics_*.json"))]:
    evaluations.setdefault(protocol_of(m)["sampler"], {
        "summary": m["summary"], "protocol": protocol_of(m),
        "cmc_mean": {s["setting"]: s["cmc_mean"] for s in m["protocol"]["settings"]}})
  stages = [folder / s / "metrics.json" for s in desc["stages"]] or [result]
  config = json.loads((result.parent / "config.json").read_text())
  return {
      **{k: desc[k] for k in ("method", "row", "imbalance", "seed", "order", "preset")},
      "folder": str(folder.relative_to(workdir)),
      "train_seconds": sum(json.loads(p.read_text())["run"]["train_seconds"] for p in stages),
      "train_images_per_s": metrics["run"]["train_images_per_s"],
      "params": count_params(result.parent),
      "num_ranked": config["eval"]["num_ranked"],
      "queries": metrics["protocol"].get("queries"),
      "ranked_png": str((result.parent / "eval" / f"ranked_{metrics['protocol']['dataset']}.png")
                        .relative_to(workdir)),
      "sampler": protocol_of(metrics)["sampler"],
      "data": data_of(config),
      "evaluations": evaluations,
  }


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and std over seeds per method, row, fraction, sampler and setting (run order)."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for run in sorted(runs, key=lambda r: (r["imbalance"], r["order"], r["method"], r["row"],
                                         r["seed"])):
    for sampler, ev in run["evaluations"].items():
      for setting in ev["summary"]:
        key = (run["method"], run["row"], run["imbalance"], sampler, setting)
        groups.setdefault(key, []).append(run)
  out = []
  for (method, row, imbalance, sampler, setting), members in groups.items():
    summaries = [m["evaluations"][sampler]["summary"][setting] for m in members]
    stats = {k: mean_std([s[k] for s in summaries]) for k in NAMES}
    cost = {}
    for k in ("train_seconds", "train_images_per_s"):
      known = [m[k] for m in members if m[k] is not None]
      cost[k] = mean_std(known) if known else (None, None)
    out.append({
        "method": method, "row": row, "imbalance": imbalance, "sampler": sampler,
        "setting": setting, "seeds": [m["seed"] for m in members],
        "mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()},
        **{k: {"mean": v[0], "std": v[1]} for k, v in cost.items()},
        "params": members[0]["params"],
        "feature_dim": members[0]["evaluations"][sampler]["protocol"]["feature_dim"],
    })
  return out


def _pm(mean: float | None, std: float | None, digits: int = 1) -> str:
  if mean is None:
    return "-"
  return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def protocol_line(protocols: list[dict[str, Any]]) -> str:
  """One line naming the protocol (the gallery sampler is each table's), or every distinct
  one when the runs differ."""
  texts = list(dict.fromkeys(
      f"{p['dataset']} ({p['direction'] or 'both directions'}), settings "
      f"{', '.join(p['settings'])}, {p['trials']} trial(s), {p['distance']} distance, flip TTA "
      f"{'on' if p['flip'] else 'off'}, re-ranking {'on' if p['reranking'] else 'off'}, "
      f"CMC {p['cmc']}, model selection {p['selection']}" for p in protocols))
  samplers = ", ".join(dict.fromkeys(str(p["sampler"]) for p in protocols))
  if len(texts) == 1:
    return f"Protocol: {texts[0]}; gallery sampler(s) {samplers}."
  return "Protocols differ between runs: " + "; ".join(f"({i + 1}) {t}" for i, t in
                                                        enumerate(texts)) + "."


def _markdown(rows, protocols, runs) -> str:
  lines = ["# Method comparison", "", protocol_line(protocols), "", data_line(runs), "",
           "Percent; mean ± standard deviation over seeds (ddof 1).", ""]
  sections = dict.fromkeys((r["imbalance"], r["sampler"]) for r in rows)
  for imbalance, sampler in sections:
    lines += [f"## Infrared fraction {imbalance}, gallery sampler {sampler}", "",
              "| method / row | setting | seeds | " + " | ".join(NAMES.values()) + " |",
              "| --- | --- | --- |" + " --- |" * len(NAMES)]
    for r in rows:
      if (r["imbalance"], r["sampler"]) == (imbalance, sampler):
        cells = [_pm(r["mean"][k], r["std"][k]) for k in NAMES]
        lines.append(f"| {r['method']} / {r['row']} | {r['setting']} | {len(r['seeds'])} | "
                     + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## Cost", "", "| method / row | infrared fraction | seeds | feature dim | "
            "parameters | training s | images/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
  seen = set()
  for r in rows:
    key = (r["method"], r["row"], r["imbalance"])
    if key not in seen:
      seen.add(key)
      params = "-" if r["params"] is None else f"{r['params']:,}"
      lines.append(f"| {r['method']} / {r['row']} | {r['imbalance']} | {len(r['seeds'])} | "
                   f"{r['feature_dim']} | {params} | {_pm(**r['train_seconds'], digits=0)} | "
                   f"{_pm(**r['train_images_per_s'], digits=0)} |")
  return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _cmc_pngs(runs, out: Path, fractions) -> list[Path]:
  """cmc_<setting>[_imb<f>].png: each method row's mean over seeds of its runs' mean CMC."""
  files = []
  for fraction in fractions:
    members = [r for r in runs if r["imbalance"] == fraction]
    settings = dict.fromkeys(s for r in members for s in r["evaluations"][r["sampler"]]["cmc_mean"])
    for setting in settings:
      curves: dict[str, list] = {}
      for r in members:
        cmc = r["evaluations"][r["sampler"]]["cmc_mean"].get(setting)
        if cmc is not None:
          curves.setdefault(f"{r['method']} / {r['row']}", []).append(cmc)
      suffix = f"_imb{fraction!r}" if len(fractions) > 1 else ""
      files.append(plots.plot_cmc(
          {k: np.mean(v, axis=0) / 100.0 for k, v in curves.items()},
          out / f"cmc_{_slug(setting)}{suffix}.png",
          title=f"{setting} CMC, mean over seeds (infrared fraction {fraction})"))
  return files


def _figure(rows: int, height: float = 3.6) -> Figure:
  fig = Figure(figsize=(8.0, height * rows), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _map_bars(rows, out: Path, fractions) -> Path:
  """map_bars.png: mAP mean with std error bars per method row, one group per setting."""
  fig = _figure(len(fractions))
  for i, fraction in enumerate(fractions):
    ax = fig.add_subplot(len(fractions), 1, i + 1)
    sel = [r for r in rows if r["imbalance"] == fraction and r["sampler"] == rows[0]["sampler"]]
    settings = list(dict.fromkeys(r["setting"] for r in sel))
    names = list(dict.fromkeys(f"{r['method']} / {r['row']}" for r in sel))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
      by = {r["setting"]: r for r in sel if f"{r['method']} / {r['row']}" == name}
      x = np.arange(len(settings)) + (j - (len(names) - 1) / 2) * width
      ax.bar(x, [by[s]["mean"]["mAP"] if s in by else 0 for s in settings], width,
             yerr=[(by[s]["std"]["mAP"] or 0) if s in by else 0 for s in settings],
             capsize=3, label=name)
    ax.set_xticks(np.arange(len(settings)), settings)
    ax.set_ylabel("mAP (%)")
    ax.set_title(f"mAP, mean ± std over seeds (infrared fraction {fraction}, "
                 f"{rows[0]['sampler']} gallery sampler)")
    ax.grid(True, axis="y", alpha=0.4)
    # Beside the axes: inside, it hid the bars of the last setting.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.set_figwidth(10.0)
  fig.tight_layout()
  fig.savefig(out / "map_bars.png", format="png")
  return out / "map_bars.png"


def _imbalance(rows, out: Path, fractions) -> Path:
  """imbalance.png: R1 and mAP of the first setting over the fraction, per method row."""
  sel = [r for r in rows if r["sampler"] == rows[0]["sampler"]]
  setting = "all/single" if any(r["setting"] == "all/single" for r in sel) else sel[0]["setting"]
  sel = [r for r in sel if r["setting"] == setting]
  fig = _figure(1, 4.0)
  for i, metric in enumerate(("r1", "mAP")):
    ax = fig.add_subplot(1, 2, i + 1)
    for name in dict.fromkeys(f"{r['method']} / {r['row']}" for r in sel):
      line = sorted((r for r in sel if f"{r['method']} / {r['row']}" == name),
                    key=lambda r: r["imbalance"])
      ax.errorbar([r["imbalance"] for r in line], [r["mean"][metric] for r in line],
                  yerr=[r["std"][metric] or 0 for r in line], marker="o", capsize=3, label=name)
    ax.set_xlabel("infrared fraction")
    ax.set_ylabel(f"{NAMES[metric]} (%)")
    ax.set_title(f"{setting} {NAMES[metric]}")
    ax.grid(True, alpha=0.4)
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(out / "imbalance.png", format="png")
  return out / "imbalance.png"


def _ranked(runs, workdir: Path, fraction) -> tuple[Path | None, dict[str, Any]]:
  """ranked.png: the first seed's ranked-list sheet of each method row, stacked, labelled."""
  chosen: dict[str, dict[str, Any]] = {}
  for r in runs:  # sorted by write_report: the first seed of each method row comes first
    if r["imbalance"] == fraction and (workdir / r["ranked_png"]).is_file():
      chosen.setdefault(f"{r['method']} / {r['row']}", r)
  if not chosen:
    return None, {"runs": [], "same_queries": None}
  # The evaluation picks num_ranked queries evenly spaced over the query split: the same
  # queries wherever the dataset, its query count and num_ranked agree.
  keys = {(r["evaluations"][r["sampler"]]["protocol"]["dataset"], r["num_ranked"],
           r["queries"]) for r in chosen.values()}
  same = len(keys) == 1
  font = ImageFont.load_default()
  sheets = [Image.open(workdir / r["ranked_png"]).convert("RGB") for r in chosen.values()]
  label_h = 22
  canvas = Image.new("RGB", (max(s.width for s in sheets),
                             sum(s.height + label_h for s in sheets)), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  y = 0
  for (name, r), sheet in zip(chosen.items(), sheets):
    note = "" if same else " (other queries than the sheets above: data or num_ranked differ)"
    draw.text((6, y + 5), f"{name} (seed {r['seed']}, infrared fraction {fraction}){note}",
              fill=(0, 0, 0), font=font)
    canvas.paste(sheet, (0, y + label_h))
    y += sheet.height + label_h
  out = workdir / "report" / "ranked.png"
  canvas.save(out, format="PNG")
  return out, {"runs": [r["folder"] for r in chosen.values()],
                              "same_queries": same}


def write_report(workdir: str | Path) -> dict[str, Any]:
  """Writes `<workdir>/report/` from the run folders (module docstring); returns
  {'dir', 'files', 'table' (report.md's text), 'runs', 'aggregates'}.

  Raises:
    FileNotFoundError: no finished run under `<workdir>/runs`.
  """
  workdir = Path(workdir).absolute()
  folders = sorted(p.parent for p in workdir.glob(f"runs/*/imb*/seed*/{RUN_FILE}"))
  read = {f: read_run(workdir, f) for f in folders}
  runs = [r for r in read.values() if r is not None]
  missing = [str(f) for f, r in read.items() if r is None]
  if not runs:
    raise FileNotFoundError(f"no finished run under {workdir / 'runs'}; run "
                            "python -m experiments.compare --workdir=... first")
  runs.sort(key=lambda r: (r["order"], r["method"], r["row"], r["imbalance"], r["seed"]))
  rows = aggregate(runs)
  # Feature dimensions differ between methods by design; the rest must agree to compare.
  shared = [{k: v for k, v in ev["protocol"].items() if k != "feature_dim"}
            for r in runs for ev in r["evaluations"].values()]
  protocols = list({json.dumps(p, sort_keys=True): p for p in shared}.values())
  fractions = sorted({r["imbalance"] for r in runs})
  out = workdir / "report"
  out.mkdir(parents=True, exist_ok=True)
  files = _cmc_pngs(runs, out, fractions)
  files.append(_map_bars(rows, out, fractions))
  if len(fractions) > 1:
    files.append(_imbalance(rows, out, fractions))
  ranked_png, ranked = _ranked(runs, workdir, 1.0 if 1.0 in fractions else fractions[0])
  if ranked_png is not None:
    files.append(ranked_png)
  table = _markdown(rows, protocols, runs)
  (out / "report.md").write_text(table)
  record = {"units": "percent",
            "std": "sample standard deviation over seeds (ddof 1); null with one seed",
            "protocols": protocols, "runs": runs, "missing": missing, "aggregates": rows,
            "ranked": ranked, "files": [p.name for p in files]}
  (out / "report.json").write_text(json.dumps(record, indent=1))
  files += [out / "report.md", out / "report.json"]
  return {"dir": str(out), "files": [str(p) for p in files], "table": table, "runs": runs,
          "aggregates": rows}
