"""Throughput of the full MAUM train step (forward, every loss, memory update, optimiser).

  python -m experiments.benchmarks.train_step [--arch=resnet50] [--height=288 --width=144] \
      [--batches=64,128,256] [--dtypes=float32,bfloat16] [--steps=20 --warmup=5] \
      [--torch [--torch_compile=off|on|both]] [--profile_steps=5] [--out=results.jsonl]

  # CPU-sized (tiny ResNet; 4 parts fit the 4-row feature map of a 64x32 input). On a CPU
  # shared with other work, pin the run (taskset -c 0): torch's OpenMP threads slow down by
  # an order of magnitude when another process takes one of their cores.
  taskset -c 0 python -m experiments.benchmarks.train_step --arch=tiny --height=64 \
      --width=32 --num_parts=4 --batches=64,128 --steps=10 --warmup=3 --torch

What is measured is the step the trainer runs (`maumjax.train.loop`): the per-device step of
`maumjax.train.step.method_step(maum, ...)` (phase 1: every MAUM term, bank fill and writes)
for the `sysu` preset's model, loss and optimiser
(ResNet-50, last stride 1, two-stream stem, 6 GeM parts x 256, Circle proxies, unidirectional
terms with a K=8 FIFO bank, batch-hard triplet, SGD Nesterov), wrapped by
`maumjax.train.parallel.CompiledStep` in `--parallel` mode, with the state donated. The train
state's step is set past `uni_start_epoch`, so the cross-modality and memory terms are on.

The batch (`--batches` is the number of images per step, visible + infrared) is random data
with the sampler's structure: batch / (2 K) identities, each K times in each modality. It is
built once and placed on the devices before timing; the benchmark measures the step, not the
input pipeline (see `input_pipeline.py`). With `--augment_on=device` (the trainer's default)
the images are uint8 plus augmentation parameters and the step applies AGW's pad/crop/flip and
normalisation itself; the PyTorch reference receives normalised float images (its augmentation
would run in DataLoader workers), so the comparison leaves that work to JAX alone.

Per (dtype, batch) it reports: trace+lower and compile time of the first step (AOT, through
`.lower(...).compile()`; the first call through the jitted step then reuses that executable),
the median and mean step time over `--steps` calls, each waited for with `block_until_ready`,
images/s (batch / median step), FLOPs per step from XLA's cost analysis of the compiled
program (times the devices; the unoptimised program's count, also reported, stands in when
the compiled one has none or less than half of it),
achieved FLOP/s and its fraction of the device's peak (`PEAKS`, stated in the output; null on
unknown devices), peak device memory (`memory_stats()['peak_bytes_in_use']`, null where the
backend has none, as on CPU, which reports the process's max RSS instead) and whether any
compilation happened after the first call (`recompiled`, from JAX's compile events and the
jitted function's cache size). `--torch` also runs `torch_reference.run` on the same sizes in
the same process (before JAX allocates) and adds `torch_images_per_s` and `ratio_vs_torch`.

`--profile_steps=N` traces N more steps after the timed ones with `jax.profiler.trace` (into
`--profile_dir`, default a new temporary folder) and adds `profile` (device busy/idle time per
step and the costliest XLA operations and kernels, from `profile_summary.summarize`) and
`profile_file` (the `.xplane.pb`, for TensorBoard / XProf) to the result.

Each combination runs in its own subprocess when there are several (`--isolate`, default), so
peak memory and compile time belong to that combination alone and an out-of-memory failure
of one is recorded (`error`) without losing the others. Each result is printed with
`report.emit` (a table, then one JSON line) and appended to `--out` as one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags

from experiments.benchmarks import report

FLAGS = flags.FLAGS
NOMINAL_STEPS_PER_EPOCH = 100  # only places the step counter past uni_start_epoch
DTYPES = ("float32", "bfloat16")

# Dense (no sparsity) peak TFLOP/s per device, from the vendors' data sheets. Matched on JAX's
# device_kind in order, first hit wins (so the more specific names come first). float32 uses the
# TF32 tensor-core peak: XLA's default precision on these GPUs runs float32 convolutions and
# matmuls through TF32 tensor cores (torch does the same for convolutions by default).
PEAKS: tuple[tuple[str, str, dict[str, float], str], ...] = (
    ("H100 PCIe", "H100 PCIe", {"bfloat16": 756.0, "float32": 378.0, "float32_no_tf32": 51.2},
     "NVIDIA H100 data sheet (PCIe), dense"),
    ("H100 NVL", "H100 NVL", {"bfloat16": 835.0, "float32": 417.5, "float32_no_tf32": 60.0},
     "NVIDIA H100 data sheet (NVL), dense"),
    ("H200 NVL", "H200 NVL", {"bfloat16": 835.0, "float32": 417.5, "float32_no_tf32": 60.0},
     "NVIDIA H200 data sheet (NVL), dense"),
    ("H100", "H100 SXM", {"bfloat16": 989.4, "float32": 494.7, "float32_no_tf32": 66.9},
     "NVIDIA H100 data sheet (SXM), dense"),
    ("H200", "H200 SXM", {"bfloat16": 989.4, "float32": 494.7, "float32_no_tf32": 66.9},
     "NVIDIA H200 data sheet (SXM; same compute as H100 SXM), dense"),
    ("A100", "A100", {"bfloat16": 312.0, "float32": 156.0, "float32_no_tf32": 19.5},
     "NVIDIA A100 data sheet, dense"),
)


def define_flags() -> None:
  """Defines the flags; only when run as a program, so that importing defines none."""
  flags.DEFINE_string("arch", "resnet50", "Backbone: resnet50, resnet18 or tiny (CPU).")
  flags.DEFINE_integer("height", 288, "Input height.")
  flags.DEFINE_integer("width", 144, "Input width.")
  flags.DEFINE_string("batches", "64,128,256",
                      "Comma list of images per step (visible + infrared); multiples of "
                      "2 * num_instances.")
  flags.DEFINE_string("dtypes", "float32,bfloat16", "Comma list of compute dtypes.")
  flags.DEFINE_integer("steps", 20, "Timed steps.")
  flags.DEFINE_integer("warmup", 5, "Untimed steps after the first (compiling) one.")
  flags.DEFINE_integer("num_classes", 395, "Training identities C (SYSU-MM01: 395).")
  flags.DEFINE_integer("num_instances", 4, "K, images per identity per modality.")
  flags.DEFINE_integer("num_parts", 6, "Part stripes (at most the feature map's height).")
  flags.DEFINE_integer("part_dim", 256, "Reduced dimension per part.")
  flags.DEFINE_enum("parallel", "shard_map", ["shard_map", "pmap", "none"],
                    "How the step is wrapped (maumjax.train.parallel).")
  flags.DEFINE_enum("phase", "cross", ["cross", "early"],
                    "MAUM phase timed: 'cross' (every term, banks; the step of most epochs) or "
                    "'early' (before uni_start_epoch: no cross-modality terms, no banks).")
  flags.DEFINE_enum("augment_on", "device", ["device", "host"],
                    "device: uint8 images, augmentation inside the step (trainer default).")
  flags.DEFINE_bool("torch", False, "Also run the PyTorch reference (torch_reference.py).")
  flags.DEFINE_enum("torch_compile", "off", ["off", "on", "both"],
                    "torch.compile for the reference; 'both' runs eager and compiled and "
                    "compares with the faster.")
  flags.DEFINE_bool("torch_channels_last", True, "channels_last memory format for the reference.")
  flags.DEFINE_string("torch_device", "", "Device of the reference ('' = cuda when JAX runs on "
                      "a GPU and torch sees one, else cpu).")
  flags.DEFINE_bool("compilation_cache", False,
                    "Use the persistent compilation cache (compile_s then measures a cache "
                    "load, not a compilation).")
  flags.DEFINE_bool("isolate", True, "Run each (dtype, batch) in its own subprocess when there "
                    "are several.")
  flags.DEFINE_string("out", "", "Append each result as a JSON line to this file.")
  flags.DEFINE_integer("seed", 0, "Seed of the parameters and the synthetic batch.")
  flags.DEFINE_integer("profile_steps", 0,
                       "After timing, trace this many more steps with jax.profiler and attach "
                       "profile_summary.summarize's busy time and costliest operations (0: off).")
  flags.DEFINE_string("profile_dir", "", "Where the trace goes ('' = a new temporary folder); "
                      "the .xplane.pb path is reported as profile_file.")


def parse_list(text: str, cast=str) -> list[Any]:
  """'a,b' -> [cast('a'), cast('b')], blanks dropped."""
  return [cast(t.strip()) for t in text.split(",") if t.strip()]


def flops_of(cost: Any) -> float | None:
  """FLOPs in an XLA cost analysis: a dict, a list of dicts (one per module) or None.

  Args:
    cost: what `Compiled.cost_analysis()` or `Lowered.cost_analysis()` returns.

  Returns:
    The summed 'flops' entries, or None when there are none (or they are all zero).
  """
  if cost is None:
    return None
  entries = [cost] if isinstance(cost, dict) else list(cost)
  total = sum(float(e.get("flops", 0.0) or 0.0) for e in entries if isinstance(e, dict))
  return total if total > 0 else None


def peak_tflops(device_kind: str, dtype: str) -> tuple[float | None, str | None]:
  """(dense peak TFLOP/s of one device for `dtype`, its description) or (None, None)."""
  for key, name, peaks, source in PEAKS:
    if key.lower() in device_kind.lower():
      kind = "bf16 tensor core" if dtype == "bfloat16" else "tf32 tensor core"
      return peaks[dtype], f"{name} {kind} {peaks[dtype]} TFLOP/s ({source})"
  return None, None


def host_cpus() -> int:
  """CPU cores this process may run on (fewer than the machine's under `taskset`)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def device_name() -> str:
  """JAX's device kind on accelerators; 'cpu:<usable cores> cores (<processor>)' on the CPU."""
  import jax

  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return f"cpu:{host_cpus()} cores ({platform.processor() or platform.machine()})"
  return dev.device_kind


def synthetic_batch(pairs: int, height: int, width: int, *, num_instances: int,
                    num_classes: int, augment_on: str, seed: int = 0) -> dict[str, Any]:
  """One step's host batch {'rgb'|'ir': {'image', 'label'[, 'aug']}} with the sampler's layout.

  `pairs // num_instances` distinct identities, identity-major: each label appears
  `num_instances` times in each modality, at the same slots in both (as
  `maumjax.data.sampler.IdentitySampler` lays them out).

  Raises:
    ValueError: pairs not a multiple of num_instances, or more identities than classes.
  """
  from maumjax.data import augment as augment_lib

  if pairs % num_instances or pairs < num_instances:
    raise ValueError(f"{2 * pairs} images per step is not a multiple of 2 * num_instances = "
                     f"{2 * num_instances}")
  ids = pairs // num_instances
  if ids > num_classes:
    raise ValueError(f"{ids} identities per step exceed num_classes={num_classes}")
  rng = np.random.default_rng(seed)
  labels = np.repeat(rng.choice(num_classes, ids, replace=False), num_instances).astype(np.int32)
  batch = {}
  for name in ("rgb", "ir"):
    if augment_on == "device":
      part = {"image": rng.integers(0, 256, (pairs, height, width, 3), dtype=np.uint8),
              "aug": augment_lib.draw_params_batch(rng, augment_lib.preset("agw"), pairs,
                                                   height, width)}
    else:
      part = {"image": rng.standard_normal((pairs, height, width, 3), dtype=np.float32)}
    part["label"] = labels
    batch[name] = part
  return batch


def _init(config: dict[str, Any], num_classes: int, image_shape: tuple[int, int], seed: int):
  """`maum.init` with non-partitionable threefry for its random draws.

  XLA:CPU compiles the model's jitted init about 4x faster that way (3 s instead of 14 s for
  the tiny ResNet on 2 cores); only the initial values change, and the train step draws no
  random numbers, so what is timed is unaffected.
  """
  import jax

  import numpy as np

  from maumjax.methods import api, maum

  every = np.ones(num_classes, bool)
  data = api.DataInfo(num_classes, tuple(image_shape), NOMINAL_STEPS_PER_EPOCH, every, every)
  with jax.threefry_partitionable(False):
    return maum.init(config, data, seed=seed)


def build_step(*, arch: str, height: int, width: int, dtype: str, batch: int, num_classes: int,
               num_instances: int, num_parts: int, part_dim: int, parallel_mode: str,
               augment_on: str, seed: int = 0, phase: str = "cross"):
  """The trainer's compiled MAUM step, a placed state in `phase` and a placed batch.

  `phase` 'cross' places the state past uni_start (and past the bank fill); 'early' times
  the phase-0 step at step 0.

  Returns:
    (compiled: CompiledStep, state, batch) with state and batch already on the devices.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from experiments.configs import maum as maum_configs
  from maumjax.data import pipeline as pipeline_lib
  from maumjax.methods import api, maum
  from maumjax.train import parallel
  from maumjax.train import step as step_lib

  if batch % (2 * num_instances):
    raise ValueError(f"batch {batch} is not a multiple of 2 * num_instances = "
                     f"{2 * num_instances}")
  config = maum_configs.get_config("sysu").to_dict()
  config["model"].update(arch=arch, dtype=dtype, num_parts=num_parts, part_dim=part_dim)
  pairs = batch // 2
  pipe = pipeline_lib.PipelineConfig(num_identities=pairs // num_instances,
                                     num_instances=num_instances, augment_on=augment_on)
  setup = _init(config, num_classes, (height, width), seed)
  mode = parallel.check_mode(parallel_mode)
  devices = parallel.device_count(mode)
  ctx = api.StepContext(axis_name=None if mode == "none" else parallel.DATA_AXIS,
                        devices=devices, sync_bn=config["model"]["sync_bn"])
  epoch = setup.config.uni_start_epoch if phase == "cross" else 0
  step_fn = step_lib.method_step(maum, setup, maum.phase(setup, epoch), pipeline=pipe, ctx=ctx)
  compiled = parallel.CompiledStep(step_fn, mode)
  # 'cross': past the start of the cross-modality phase (and past the step that fills the banks).
  start = epoch * NOMINAL_STEPS_PER_EPOCH + (1 if phase == "cross" else 0)
  state = setup.state.replace(step=jnp.asarray(start, jnp.int32))
  host = synthetic_batch(pairs, height, width, num_instances=num_instances,
                         num_classes=num_classes, augment_on=augment_on, seed=seed)
  dbatch = compiled.put_batch(host)
  if compiled.mode == "pmap":  # put_batch only reshapes for pmap: place the shards once here
    sharding = NamedSharding(parallel.make_mesh(jax.local_devices()), P(parallel.DATA_AXIS))
    dbatch = jax.device_put(dbatch, sharding)
  dstate = compiled.put_state(state)
  jax.block_until_ready((dstate, dbatch))
  return compiled, dstate, dbatch


def _cache_size(fn) -> int | None:
  size = getattr(fn, "_cache_size", None)
  try:
    return int(size()) if callable(size) else None
  except Exception:  # noqa: BLE001 - a private API; absent or changed means "unknown"
    return None


def measure_jax(*, arch: str, height: int, width: int, dtype: str, batch: int,
                num_classes: int, num_instances: int, num_parts: int, part_dim: int,
                parallel_mode: str, augment_on: str, steps: int, warmup: int,
                seed: int = 0, profile_steps: int = 0,
                profile_dir: str = "", phase: str = "cross") -> dict[str, Any]:
  """Compiles and times the MAUM train step once; returns the JAX side of a result.

  With `profile_steps > 0`, that many more steps run inside `jax.profiler.trace` after the
  timed ones (so tracing never slows the timed steps); the result gains `profile` (the
  `profile_summary.summarize` dict) and `profile_file`.
  """
  import jax

  from maumjax import compilation_cache

  t0 = time.perf_counter()
  compiled, dstate, dbatch = build_step(
      arch=arch, height=height, width=width, dtype=dtype, batch=batch, num_classes=num_classes,
      num_instances=num_instances, num_parts=num_parts, part_dim=part_dim,
      parallel_mode=parallel_mode, augment_on=augment_on, seed=seed, phase=phase)
  init_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  lowered = compiled.step.lower(dstate, dbatch)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  executable = lowered.compile()
  compile_s = time.perf_counter() - t0
  # Both count one device's program (shard_map and pmap compile one program per device).
  flops_compiled = flops_of(executable.cost_analysis())
  flops_lowered = flops_of(lowered.cost_analysis())
  flops, flops_source = flops_compiled, "compiled"
  if flops_compiled is None or (flops_lowered and flops_compiled < 0.5 * flops_lowered):
    # A backend whose compiled-module analysis misses work (e.g. library calls it cannot
    # see into) would understate the FLOPs; the unoptimised program's count stands in.
    flops, flops_source = flops_lowered, "lowered"
  flops = None if flops is None else flops * compiled.devices
  mem = executable.memory_analysis()

  # The first call goes through the jitted step as the trainer's does; it finds the executable
  # compiled above in JAX's in-memory cache (counted: a compilation here would show up).
  with compilation_cache.count_compilations() as first:
    t0 = time.perf_counter()
    dstate, metrics = compiled(dstate, dbatch)
    jax.block_until_ready(metrics["loss"])
    first_step_s = time.perf_counter() - t0
  cache_after_first = _cache_size(compiled.step)

  with compilation_cache.count_compilations() as later:
    for _ in range(warmup):
      dstate, metrics = compiled(dstate, dbatch)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      dstate, metrics = compiled(dstate, dbatch)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t0)
  cache_after = _cache_size(compiled.step)
  recompiled = later.count > 0 or (cache_after is not None and cache_after_first is not None
                                   and cache_after > cache_after_first)
  profile = None
  if profile_steps > 0:
    dstate, metrics, profile = _profile(compiled, dstate, dbatch, profile_steps, profile_dir)
  values = compiled.get_metrics(metrics)
  terms = sorted(k for k in values if k not in ("loss", "finite", "grad_norm"))

  step_s = statistics.median(times)
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  peak, peak_desc = peak_tflops(dev.device_kind, dtype)
  achieved = flops / step_s / 1e12 if flops else None
  result = {
      "images_per_s": round(batch / step_s, 2),
      "step_ms": round(1e3 * step_s, 3),
      "step_ms_mean": round(1e3 * statistics.fmean(times), 3),
      "step_ms_min": round(1e3 * min(times), 3),
      "init_s": round(init_s, 2), "lower_s": round(lower_s, 3), "compile_s": round(compile_s, 3),
      "trace_compile_s": round(lower_s + compile_s, 3),
      "first_step_s": round(first_step_s, 3), "first_step_compiles": first.backend,
      "recompiled": bool(recompiled), "compiles_after_first": later.count,
      "jit_cache_size": cache_after,
      "flops_per_step": flops, "flops_per_image": flops / batch if flops else None,
      "flops_source": flops_source,
      "flops_per_step_lowered": flops_lowered * compiled.devices if flops_lowered else None,
      "tflops_achieved": round(achieved, 3) if achieved is not None else None,
      "peak_tflops": peak * compiled.devices if peak else None, "peak_source": peak_desc,
      "mfu": round(achieved / (peak * compiled.devices), 4) if achieved and peak else None,
      "peak_memory_bytes": int(stats["peak_bytes_in_use"])
                           if stats and "peak_bytes_in_use" in stats else None,
      "xla_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
      "xla_argument_bytes": getattr(mem, "argument_size_in_bytes", None),
      "loss": round(values["loss"], 5), "finite": values["finite"] == 1.0,
      "loss_terms": terms, "parallel": compiled.mode, "devices": compiled.devices,
  }
  if profile is not None:
    result.update(profile)
  del dstate, dbatch, compiled, executable, lowered
  return result


def _profile(compiled, dstate, dbatch, steps: int, profile_dir: str):
  """Traces `steps` steps; returns (state, metrics, {'profile': summary, 'profile_file': path})."""
  import glob
  import tempfile

  import jax

  from experiments.benchmarks import profile_summary

  directory = profile_dir or tempfile.mkdtemp(prefix="maumjax_profile_")
  before = set(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))
  with jax.profiler.trace(directory):
    for _ in range(steps):
      dstate, metrics = compiled(dstate, dbatch)
    jax.block_until_ready((dstate, metrics))
  new = sorted(set(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))
               - before, key=os.path.getmtime)
  if not new:
    raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {directory}")
  try:
    summary = profile_summary.summarize(new[-1], steps=steps)
  except ValueError as e:  # keep the timing and the trace even if the summary cannot be made
    return dstate, metrics, {"profile_error": str(e), "profile_file": new[-1]}
  print(profile_summary.format_summary(summary))
  return dstate, metrics, {"profile": summary, "profile_file": new[-1]}


def _torch_device(requested: str) -> str:
  if requested:
    return requested
  import jax
  import torch

  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def run_combination(dtype: str, batch: int) -> dict[str, Any]:
  """One (dtype, batch) result: the torch reference first (if asked), then the JAX step."""
  import jax

  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}; choose from {DTYPES}")
  sizes = {"arch": FLAGS.arch, "height": FLAGS.height, "width": FLAGS.width, "dtype": dtype,
           "batch": batch, "num_classes": FLAGS.num_classes}
  model = {"num_instances": FLAGS.num_instances, "num_parts": FLAGS.num_parts,
           "part_dim": FLAGS.part_dim}
  torch_runs = {}
  if FLAGS.torch:
    from experiments.benchmarks import torch_reference

    # Before JAX allocates: torch returns its cached blocks afterwards (empty_cache).
    device = _torch_device(FLAGS.torch_device)
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[FLAGS.torch_compile]
    for use_compile in modes:
      torch_runs[use_compile] = torch_reference.run(
          **sizes, compile=use_compile, channels_last=FLAGS.torch_channels_last,
          steps=FLAGS.steps, warmup=FLAGS.warmup + 1, device=device, seed=FLAGS.seed, **model)

  result = {"benchmark": "train_step", "device": device_name(),
            "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "commit": report.commit(), **sizes, **model, "augment_on": FLAGS.augment_on,
            "steps": FLAGS.steps, "warmup": FLAGS.warmup, "phase": FLAGS.phase,
            "compilation_cache": FLAGS.compilation_cache}
  result.update(measure_jax(**sizes, **model, parallel_mode=FLAGS.parallel,
                            augment_on=FLAGS.augment_on, steps=FLAGS.steps,
                            warmup=FLAGS.warmup, seed=FLAGS.seed,
                            profile_steps=FLAGS.profile_steps, profile_dir=FLAGS.profile_dir,
                            phase=FLAGS.phase))
  result["host_cpus"] = host_cpus()
  if sys.platform.startswith("linux"):  # ru_maxrss is in KiB on Linux
    result["host_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  if torch_runs:
    best = max(torch_runs, key=lambda c: torch_runs[c]["images_per_s"])
    for use_compile, r in torch_runs.items():
      tag = "torch_compiled" if use_compile else "torch_eager"
      result[f"{tag}_images_per_s"] = r["images_per_s"]
      result[f"{tag}_compile_s"] = r["compile_s"]
    ref = torch_runs[best]
    result.update({
        "torch_images_per_s": ref["images_per_s"], "torch_step_ms": ref["step_ms"],
        "torch_step_ms_min": ref["step_ms_min"],
        "torch_compile": best, "torch_channels_last": ref["channels_last"],
        "torch_device": ref["device"], "torch_threads": ref["threads"],
        "torch_version": ref["torch_version"],
        "torch_model_source": ref["model_source"],
        "torch_peak_memory_bytes": ref["peak_memory_bytes"],
        "ratio_vs_torch": round(result["images_per_s"] / ref["images_per_s"], 3),
    })
  result["jax_version"] = jax.__version__
  return result


def _append(path: str, result: dict[str, Any]) -> None:
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(result) + "\n")


def _error_line(stderr: str) -> str:
  """The last 'SomeError: message' line of a traceback (else the last line), shortened."""
  lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
  errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", ln)]
  return (errors or lines or [""])[-1][:500]


def _run_isolated(combos: list[tuple[str, int]], argv: list[str]) -> int:
  """Runs every combination in a child process; prints and appends what each returns."""
  passthrough = [a for a in argv[1:] if not a.startswith(("--batches", "--dtypes", "--out",
                                                          "--isolate", "--noisolate"))]
  failures = 0
  for dtype, batch in combos:
    cmd = [sys.executable, "-m", "experiments.benchmarks.train_step", *passthrough,
           f"--dtypes={dtype}", f"--batches={batch}", "--noisolate"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.stdout.write(proc.stdout)
    sys.stdout.flush()
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
      result = json.loads(lines[-1])
    else:
      failures += 1
      result = {"benchmark": "train_step", "commit": report.commit(), "arch": FLAGS.arch,
                "height": FLAGS.height, "width": FLAGS.width, "dtype": dtype, "batch": batch,
                "error": _error_line(proc.stderr) or f"exit status {proc.returncode}"}
      sys.stderr.write(proc.stderr[-5000:])
      report.emit(result)
    _append(FLAGS.out, result)
  return 1 if failures else 0


def main(argv):
  if FLAGS.torch and "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ:
    # JAX would otherwise reserve 75% of GPU memory at start-up, leaving torch too little.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  combos = [(d, b) for d in parse_list(FLAGS.dtypes) for b in parse_list(FLAGS.batches, int)]
  for d, b in combos:
    if d not in DTYPES:
      raise app.UsageError(f"--dtypes: {d!r} is not one of {DTYPES}")
    if b % (2 * FLAGS.num_instances):
      raise app.UsageError(f"--batches: {b} is not a multiple of 2 * num_instances = "
                           f"{2 * FLAGS.num_instances}")
  if FLAGS.isolate and len(combos) > 1:
    return _run_isolated(combos, sys.argv)
  if FLAGS.compilation_cache:
    from maumjax import compilation_cache

    compilation_cache.enable()
  for dtype, batch in combos:
    result = run_combination(dtype, batch)
    report.emit(result)
    _append(FLAGS.out, result)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
