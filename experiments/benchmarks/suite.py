"""Every issue-5 measurement in a few commands, under a time budget, with its results in one folder.

  python -m experiments.benchmarks.suite --sections=env,step_bf16 --out_dir=DIR \
      [--budget_s=560] [--smoke]

Sections run in the order given, each as child processes (this process never imports JAX, so
it holds no GPU memory while a child measures):

  env                 versions (Python, jax, jaxlib, the CUDA plugin, flax, optax, orbax, grain,
                      TFDS, torch, ...), whether each lies in pyproject.toml's range, devices
  step_bf16           train_step.py, bf16, batches 64/128/256, PyTorch (eager) in the same run
  step_torch_compile  train_step.py, bf16, batch 64, PyTorch eager and torch.compile
  step_f32            train_step.py, float32, batches 64/128, PyTorch (eager)
  profile             train_step.py, bf16, batch 64, 5 steps traced; the summary goes into the
                      JSON line and the trace is copied to DIR/profile_bfloat16_64.xplane.pb
  eval                evaluation.py, the SYSU protocol given features
  input               input_pipeline.py at 288x144 with all host cores (decode each step, and
                      the RAM cache), augmentation left to the device as in the trainer
  trainer             python -m experiments.maum, the sysu preset (ResNet-50, bf16) on the
                      built-in synthetic data at 288x144 for a few epochs; its images/s is the
                      trainer's own (input pipeline, step, logging and checkpoints together)

DIR receives `results.jsonl` (one JSON object per measurement, the keys RESULTS.md names),
`suite.log` (every child's output) and the profile trace. A section that would start with less
than `--min_start_s` of the budget left is recorded as skipped; a child still running at the
end of the budget is killed and recorded with an error, so the suite ends inside the budget and
what it measured so far is kept. `--smoke` runs the same sections at CPU sizes (tiny ResNet,
small images, few steps, one evaluation setting and trial): the tests use it.

On the device machine, which has no network, the packages its image lacks travel as wheels
(`gpu_wheels.txt`, fetched here once with `--download_wheels=.whl`); RESULTS.md gives the
commands.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import app, flags

from experiments.benchmarks import report

REPO = Path(__file__).resolve().parents[2]
WHEELS = Path(__file__).with_name("gpu_wheels.txt")
SECTIONS = ("env", "step_bf16", "step_torch_compile", "step_f32", "profile", "eval", "input",
            "trainer")
# Distributions whose versions the env section reports (and checks against pyproject.toml).
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "flax",
            "optax", "orbax-checkpoint", "chex", "numpy", "grain", "tensorflow-datasets",
            "ml-collections", "pillow", "scipy", "scikit-learn", "safetensors", "tensorboardX",
            "torch", "torchvision")
PROFILE_FILE = "profile_bfloat16_64.xplane.pb"

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags; only when run as a program, so that importing defines none."""
  flags.DEFINE_list("sections", list(SECTIONS), f"Sections to run, in order: {SECTIONS}.")
  flags.DEFINE_string("out_dir", "", "Folder for results.jsonl, suite.log and the trace.")
  flags.DEFINE_float("budget_s", 560.0, "Wall-clock budget of the whole suite (s).")
  flags.DEFINE_float("min_start_s", 30.0, "A command starts only with this much budget left.")
  flags.DEFINE_bool("smoke", False, "CPU sizes (tiny ResNet, small images, few steps).")
  flags.DEFINE_integer("threads", 0, "Input-pipeline threads (0: all host cores).")
  flags.DEFINE_integer("trainer_epochs", 12, "Epochs of the trainer section.")
  flags.DEFINE_bool("env_only", False, "Print the env JSON line and exit (internal).")
  flags.DEFINE_string("download_wheels", "",
                      "Download gpu_wheels.txt's cp312 wheels into this folder and exit.")


@dataclasses.dataclass
class Command:
  """One child process of a section.

  Attributes:
    section: the section it belongs to.
    argv: the command (run from the repository root).
    appends: the child appends its own JSON lines to results.jsonl (`--out`); otherwise the
      suite appends the last JSON line the child prints.
    after: called with (out_dir, child stdout) when the child succeeded; returns result dicts
      to append (used where the result is read from files the child wrote).
  """
  section: str
  argv: list[str]
  appends: bool = False
  after: Callable[[Path, str], list[dict[str, Any]]] | None = None


def _py(module: str, *args: str) -> list[str]:
  return [sys.executable, "-m", module, *args]


def _step_args(smoke: bool) -> list[str]:
  if smoke:
    return ["--arch=tiny", "--height=32", "--width=16", "--num_parts=2", "--part_dim=16",
            "--num_classes=8", "--num_instances=2", "--steps=2", "--warmup=1"]
  return ["--steps=20", "--warmup=5"]


def plan(section: str, out_dir: Path, *, smoke: bool, threads: int,
         trainer_epochs: int) -> list[Command]:
  """The commands of one section (module docstring), at GPU sizes or, with smoke, CPU sizes."""
  results = str(out_dir / "results.jsonl")
  step = ["experiments.benchmarks.train_step", *_step_args(smoke), f"--out={results}"]

  def batches(full: str, small: str) -> str:
    return f"--batches={small if smoke else full}"

  if section == "env":
    return [Command(section, _py("experiments.benchmarks.suite", "--env_only"))]
  if section == "step_bf16":
    return [Command(section, _py(*step, "--dtypes=bfloat16", batches("64,128,256", "8,16"),
                                 "--torch"), appends=True)]
  if section == "step_torch_compile":
    return [Command(section, _py(*step, "--dtypes=bfloat16", batches("64", "8"), "--torch",
                                 "--torch_compile=both"), appends=True)]
  if section == "step_f32":
    return [Command(section, _py(*step, "--dtypes=float32", batches("64,128", "8,16"),
                                 "--torch"), appends=True)]
  if section == "profile":
    trace = out_dir / "trace"
    return [Command(section, _py(*step, "--dtypes=bfloat16", batches("64", "8"),
                                 "--profile_steps=5", f"--profile_dir={trace}"),
                    appends=True, after=_keep_trace)]
  if section == "eval":
    extra = ["--scale=0.05", "--repeats=1", "--skip_naive"] if smoke else []
    return [Command(section, _py("experiments.benchmarks.evaluation", *extra))]
  if section == "input":
    n = str(threads or os.cpu_count() or 1)
    size = (["--height=32", "--width=16", "--steps=3", "--warmup=1", "--synthetic_identities=8",
             "--num_instances=2", "--num_identities=4"] if smoke else ["--steps=60", "--warmup=5"])
    common = ["experiments.benchmarks.input_pipeline", *size, f"--threads={n}",
              "--augment_on=device"]
    return [Command(section, _py(*common)), Command(section, _py(*common, "--cache=ram"))]
  if section == "trainer":
    # Named here, made by the run (planning writes nothing); removed once its result is read.
    workdir = Path(tempfile.gettempdir()) / f"maumjax_suite_trainer_{os.getpid()}_{time.time_ns()}"
    epochs = 1 if smoke else trainer_epochs
    args = ["--config=experiments/configs/maum.py:sysu", "--config.model.dtype=bfloat16",
            f"--config.num_epochs={epochs}", "--config.loss.uni_start_epoch=1",
            "--config.optim.warmup_epochs=1",
            f"--config.data.synthetic.num_identities={12 if smoke else 100}",
            f"--config.data.pipeline.num_threads={threads or os.cpu_count() or 1}",
            f"--config.train.checkpoint_every_epochs={epochs}",
            "--config.train.progress=False", "--config.train.eval_every_epochs=0"]
    if smoke:  # the same overrides at CPU size
      args += ["--config.model.arch=tiny", "--config.data.height=32", "--config.data.width=16",
               "--config.model.num_parts=2", "--config.model.part_dim=16",
               "--config.data.pipeline.num_identities=4", "--config.data.pipeline.num_instances=2",
               # A shorter epoch (4 images per camera folder, drawn at 64x32) and one
               # single-shot all-search trial: the smoke run checks the plumbing, not the rate.
               "--config.data.synthetic.images_per_camera=4",
               "--config.data.synthetic.height=64", "--config.data.synthetic.width=32",
               "--config.eval.trials=1", "--config.eval.modes=('all',)",
               "--config.eval.shots=(1,)"]
    args.append(f"--workdir={workdir}")
    return [Command(section, _py("experiments.maum", *args),
                    after=lambda out, _stdout: [_trainer_result(workdir, args)])]
  raise app.UsageError(f"unknown section {section!r}; choose from {SECTIONS}")


def _keep_trace(out_dir: Path, _stdout: str) -> list[dict[str, Any]]:
  """Moves the newest trace up to out_dir (the device tool returns files 2 folders deep)."""
  found = sorted(glob.glob(str(out_dir / "trace" / "**" / "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if found:
    shutil.move(found[-1], out_dir / PROFILE_FILE)
  shutil.rmtree(out_dir / "trace", ignore_errors=True)
  return []


def _trainer_result(workdir: Path, args: list[str]) -> dict[str, Any]:
  """The trainer section's result, read from the run's metrics.json."""
  metrics = json.loads((workdir / "metrics.json").read_text())
  run = metrics["run"]
  rate = run.get("train_images_per_s")
  result = {
      "benchmark": "trainer", "device": run.get("device_kind") or run.get("backend"),
      "commit": report.commit(), "dtype": "bfloat16" if "--config.model.dtype=bfloat16" in args
      else "float32", "batch": run["images_per_step"], "images_per_s": rate,
      "steps": run["steps"], "epochs": run["epochs"], "steps_per_epoch": run["steps_per_epoch"],
      "train_seconds": run["train_seconds_this_process"], "eval_seconds": run["eval_seconds"],
      "parallel": run["parallel"], "devices": run["devices"], "dataset": run["dataset"],
      "synthetic_data": run["synthetic_data"], "args": args,
  }
  if rate:
    # The SYSU-MM01 recipe: 81 epochs of 696 steps of 64 images (README, maum.md §6).
    result["sysu_81_epochs_hours_at_this_rate"] = round(81 * 696 * 64 / rate / 3600, 3)
  shutil.rmtree(workdir, ignore_errors=True)
  return result


def _pyproject_ranges() -> dict[str, str]:
  """{normalised distribution name: specifier} of pyproject.toml's dependencies."""
  import tomllib

  data = tomllib.loads((REPO / "pyproject.toml").read_text())
  ranges = {}
  for dep in data["project"]["dependencies"]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)$", dep)
    if m:
      ranges[_norm(m.group(1))] = m.group(3).split(";")[0].strip()
  return ranges


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def env_result() -> dict[str, Any]:
  """Versions, pyproject ranges they break, devices and host facts (the env section)."""
  ranges = _pyproject_ranges()
  versions, outside = {}, {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
      continue
    spec = ranges.get(_norm(name))
    if spec:
      try:
        from packaging.specifiers import SpecifierSet

        if versions[name] not in SpecifierSet(spec):
          outside[name] = f"{versions[name]} not in {spec}"
      except ImportError:
        pass
  result = {"benchmark": "env", "commit": report.commit(), "python": sys.version.split()[0],
            "versions": versions, "outside_pyproject_ranges": outside,
            "host_cpus": os.cpu_count()}
  try:
    import jax

    devices = jax.devices()
    result.update(device=devices[0].device_kind, platform=jax.default_backend(),
                  device_count=len(devices), devices=[str(d) for d in devices])
  except Exception as e:  # noqa: BLE001 - reported, not raised: the env line must come out
    result["jax_error"] = f"{type(e).__name__}: {e}"
  if shutil.which("nvidia-smi"):
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                           "--format=csv,noheader"], capture_output=True, text=True,
                          check=False)
    result["nvidia_smi"] = proc.stdout.strip() or proc.stderr.strip()
  return result


def _last_json(stdout: str) -> dict[str, Any] | None:
  for line in reversed(stdout.strip().splitlines()):
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        return None
  return None


def _append(path: Path, results: list[dict[str, Any]]) -> None:
  with path.open("a") as f:
    for r in results:
      f.write(json.dumps(r) + "\n")


def run_suite(sections: list[str], out_dir: Path, *, budget_s: float, min_start_s: float,
              smoke: bool, threads: int = 0, trainer_epochs: int = 12) -> list[dict[str, Any]]:
  """Runs the sections' commands in order within budget_s; returns the suite's own records.

  The records (one per command: section, status 'ok' | 'failed' | 'timed out' | 'skipped',
  seconds, and the error) are also printed; measurements go to out_dir/results.jsonl, and a
  failed, timed-out or skipped command leaves a line there too, with `error` or `skipped`.
  """
  for s in sections:
    if s not in SECTIONS:
      raise ValueError(f"unknown section {s!r}; choose from {SECTIONS}")
  out_dir.mkdir(parents=True, exist_ok=True)
  results, log = out_dir / "results.jsonl", out_dir / "suite.log"
  deadline = time.monotonic() + budget_s
  records = []
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  for section in sections:
    for cmd in plan(section, out_dir, smoke=smoke, threads=threads,
                    trainer_epochs=trainer_epochs):
      left = deadline - time.monotonic()
      record = {"section": section, "command": " ".join(cmd.argv[1:])}
      if left < min_start_s:
        record.update(status="skipped", seconds=0.0,
                      error=f"{left:.0f} s of the budget left (< {min_start_s:.0f} s)")
        _append(results, [{"benchmark": section, "commit": report.commit(),
                           "skipped": record["error"], "command": record["command"]}])
        records.append(record)
        print(json.dumps(record), flush=True)
        continue
      t0 = time.monotonic()
      proc = subprocess.Popen(cmd.argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
      try:
        stdout, stderr = proc.communicate(timeout=max(left, 1.0))
        status = "ok" if proc.returncode == 0 else "failed"
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status = "timed out"
      record.update(status=status, seconds=round(time.monotonic() - t0, 1))
      with log.open("a") as f:
        f.write(f"\n===== {section}: {record['command']} ({status}, {record['seconds']} s)\n")
        f.write(stdout)
        f.write("\n----- stderr\n")
        f.write(stderr)
      sys.stdout.write(stdout)
      if status == "ok":
        new = [] if cmd.appends else [r for r in [_last_json(stdout)] if r]
        if cmd.after is not None:
          new += cmd.after(out_dir, stdout)
        if not cmd.appends and not new:
          status = record["status"] = "failed"
          record["error"] = "the command printed no JSON line"
        _append(results, new)
      if status != "ok":
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        record.setdefault("error", (lines[-1] if lines else f"exit {proc.returncode}")[:500])
        if not cmd.appends or status == "timed out":
          _append(results, [{"benchmark": section, "commit": report.commit(),
                             "error": f"{status}: {record['error']}",
                             "command": record["command"]}])
        sys.stdout.write(stderr[-3000:])
      records.append(record)
      print(json.dumps(record), flush=True)
  return records


def download_wheels(dest: str) -> None:
  """Fetches gpu_wheels.txt's wheels for CPython 3.12 on x86-64 Linux into dest."""
  pins = [ln.split("#")[0].strip() for ln in WHEELS.read_text().splitlines()]
  pins = [p for p in pins if p]
  source_only = [p for p in pins if p.startswith("promise==")]  # sdist only: build a wheel
  binary = [p for p in pins if p not in source_only]
  platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                  "--python-version=3.12", "--implementation=cp", *platforms,
                  "--platform=manylinux2014_x86_64", "--platform=any", "-d", dest, *binary],
                 check=True)
  if source_only:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dest,
                    *source_only], check=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.env_only:
    report.emit(env_result())
    return 0
  if FLAGS.download_wheels:
    download_wheels(FLAGS.download_wheels)
    return 0
  if not FLAGS.out_dir:
    raise app.UsageError("--out_dir is required (on the device machine: --out_dir=$OUT)")
  for s in FLAGS.sections:
    if s not in SECTIONS:
      raise app.UsageError(f"--sections: unknown section {s!r}; choose from {SECTIONS}")
  records = run_suite(list(FLAGS.sections), Path(FLAGS.out_dir), budget_s=FLAGS.budget_s,
                      min_start_s=FLAGS.min_start_s, smoke=FLAGS.smoke, threads=FLAGS.threads,
                      trainer_epochs=FLAGS.trainer_epochs)
  print("\nsuite: " + ", ".join(f"{r['section']} {r['status']} ({r['seconds']} s)"
                                 for r in records))
  return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
  define_flags()
  app.run(main)
