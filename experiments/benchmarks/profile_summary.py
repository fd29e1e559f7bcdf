"""Where the time of a profiled train step goes, read from a JAX profiler trace (`.xplane.pb`).

  summary = profile_summary.summarize("/tmp/trace/plugins/profile/<run>/<host>.xplane.pb",
                                      steps=3)

`train_step.py --profile_steps=N` traces N steps after its timed ones with
`jax.profiler.trace` and attaches this summary to its JSON line, so a run on a machine without
TensorBoard still shows the profile's evidence: how busy the device was, and which XLA
operations took the time. The trace file itself stays where `--profile_dir` put it, for
TensorBoard / XProf.

Which events count as the step's operations:

* a device plane (`/device:GPU:0`, ...) with a line named "XLA Ops": that line's events, one
  per HLO operation, named after it (the derived timeline XProf shows);
* else the events of the device planes that carry an `hlo_op` stat (kernels on the GPU's
  stream lines; several kernels of one operation add up under that operation);
* else every event on the device planes' stream lines ("Stream #N"), each kernel standing for
  itself (a trace whose kernels carry no operation names still shows busy time and kernels);
* else, on the CPU backend, the host plane's events that carry an `hlo_op` stat (XLA:CPU's
  thunks, run on several threads).

Busy time is the length of the union of those events' intervals (overlapping events, such as
kernels on two streams or thunks on two threads, count once); the window runs from the first
event's start to the last one's end, so `idle_fraction = 1 - busy / window` is the share of the
traced steps in which no operation ran: launch or host overhead, synchronisation, or the
input feed. Times per step are totals divided by `steps`. Shares are of the summed operation
time: on XLA:CPU a control-flow thunk (`cond`, `while`) is traced around the operations it runs,
so there they count twice; on a GPU's XLA Ops line operations do not nest.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable
from typing import Any

OPS_LINE = "XLA Ops"
# Derived or bookkeeping lines of a device plane whose events are not single operations.
NON_OP_LINES = ("XLA Modules", "Steps", "Launch Stats", "Source code", "XLA TraceMe",
                "TensorFlow Name Scope", "TensorFlow Ops", "Framework Name Scope", "Framework Ops")


def category_of(op_name: str) -> str:
  """The HLO opcode-like prefix of an operation name: 'fusion.12' -> 'fusion'."""
  name = op_name.lstrip("%")
  return re.sub(r"(\.\d+)+$", "", name).split(".")[0] or name


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
  """Total length covered by half-open [start, end) intervals, overlaps counted once."""
  total, cur_start, cur_end = 0.0, None, None
  for start, end in sorted(intervals):
    if cur_end is None or start > cur_end:
      if cur_end is not None:
        total += cur_end - cur_start
      cur_start, cur_end = start, end
    else:
      cur_end = max(cur_end, end)
  if cur_end is not None:
    total += cur_end - cur_start
  return total


def _stats(event) -> dict[str, Any]:
  try:
    return dict(event.stats)
  except Exception:  # noqa: BLE001 - a stat of a type the binding cannot convert
    return {}


def collect_ops(profile) -> tuple[str, list[dict[str, Any]]]:
  """The events that stand for XLA operations, by the rules of the module docstring.

  Args:
    profile: a `jax.profiler.ProfileData`.

  Returns:
    (source, events): source names the rule used; each event is a dict with op, kernel,
    category, start_ns and duration_ns.
  """
  planes = list(profile.planes)
  device = [p for p in planes if p.name.startswith("/device:")]

  def event_dict(e, stats, op):
    return {"op": op, "kernel": e.name,
            "category": stats.get("hlo_category") or category_of(op),
            "start_ns": float(e.start_ns), "duration_ns": float(e.duration_ns)}

  ops_lines = [ln for p in device for ln in p.lines if ln.name == OPS_LINE]
  if ops_lines:
    events = []
    for line in ops_lines:
      for e in line.events:
        stats = _stats(e)
        events.append(event_dict(e, stats, str(stats.get("hlo_op") or e.name)))
    return "device plane, XLA Ops line", events

  def with_hlo_op(selected_planes, skip_lines=()):
    events = []
    for p in selected_planes:
      for line in p.lines:
        if line.name in skip_lines:
          continue
        for e in line.events:
          stats = _stats(e)
          if stats.get("hlo_op"):
            events.append(event_dict(e, stats, str(stats["hlo_op"])))
    return events

  events = with_hlo_op(device, NON_OP_LINES)
  if events:
    return "device planes, events with an hlo_op stat", events
  events = [event_dict(e, _stats(e), e.name) for p in device for line in p.lines
            if line.name.startswith("Stream") for e in line.events]
  if events:
    return "device planes, stream events (kernels; no hlo_op stats)", events
  host = [p for p in planes if p.name.startswith("/host:CPU")]
  return "host CPU plane, events with an hlo_op stat", with_hlo_op(host)


def summarize(path_or_profile, *, steps: int, top: int = 15) -> dict[str, Any]:
  """Device busy time and the operations that took it, per step.

  Args:
    path_or_profile: an `.xplane.pb` path or a `jax.profiler.ProfileData`.
    steps: steps the trace holds (per-step figures divide by it).
    top: how many operations and kernels to list.

  Returns:
    A JSON-ready dict: source, steps, events, window_ms_per_step, busy_ms_per_step,
    idle_fraction, by_category (share of the summed operation time), top_ops and top_kernels
    (ms per step, share of the summed operation time, calls per step).

  Raises:
    ValueError: steps < 1, or the trace holds no operation events.
  """
  if steps < 1:
    raise ValueError(f"steps={steps}: a profile summary needs at least one traced step")
  profile = path_or_profile
  if isinstance(path_or_profile, (str, bytes)) or hasattr(path_or_profile, "__fspath__"):
    from jax.profiler import ProfileData

    profile = ProfileData.from_file(str(path_or_profile))
  source, events = collect_ops(profile)
  if not events:
    raise ValueError("the trace holds no XLA operation events (was the step run inside "
                     "jax.profiler.trace, and did it finish before the trace stopped?)")
  intervals = [(e["start_ns"], e["start_ns"] + e["duration_ns"]) for e in events]
  window = max(end for _, end in intervals) - min(start for start, _ in intervals)
  busy = union_length(intervals)
  summed = sum(e["duration_ns"] for e in events)

  def table(key: str) -> list[dict[str, Any]]:
    time, calls, cats = collections.Counter(), collections.Counter(), {}
    for e in events:
      time[e[key]] += e["duration_ns"]
      calls[e[key]] += 1
      cats.setdefault(e[key], e["category"])
    return [{"name": name, "category": cats[name], "ms_per_step": round(t / steps / 1e6, 4),
             "share": round(t / summed, 4) if summed else 0.0,
             "calls_per_step": round(calls[name] / steps, 2)}
            for name, t in time.most_common(top)]

  by_cat = collections.Counter()
  for e in events:
    by_cat[e["category"]] += e["duration_ns"]
  kernels = table("kernel") if any(e["kernel"] != e["op"] for e in events) else []
  return {
      "source": source, "steps": steps, "events": len(events),
      "window_ms_per_step": round(window / steps / 1e6, 4),
      "busy_ms_per_step": round(busy / steps / 1e6, 4),
      "summed_op_ms_per_step": round(summed / steps / 1e6, 4),
      "idle_fraction": round(1.0 - busy / window, 4) if window > 0 else 0.0,
      "by_category": _shares(by_cat, summed, top),
      "top_ops": table("op"), "top_kernels": kernels,
  }


def _shares(times: collections.Counter, total: float, top: int) -> dict[str, float]:
  """The `top` largest shares of `total`, the rest summed under 'other'."""
  ranked = times.most_common()
  shares = {c: round(t / total, 4) if total else 0.0 for c, t in ranked[:top]}
  rest = sum(t for _, t in ranked[top:])
  if rest:
    shares["other"] = round(rest / total, 4) if total else 0.0
  return shares


def format_summary(summary: dict[str, Any], rows: int = 10) -> str:
  """A few readable lines of a summary (busy/idle, then the costliest operations)."""
  head = (f"profile ({summary['source']}, {summary['steps']} steps): busy "
          f"{summary['busy_ms_per_step']:.3f} ms of a {summary['window_ms_per_step']:.3f} ms "
          f"window per step, idle {100 * summary['idle_fraction']:.1f}%")
  out = [head]
  cats = ", ".join(f"{c} {100 * s:.1f}%" for c, s in list(summary["by_category"].items())[:6])
  out.append(f"  by category: {cats}")
  for row in summary["top_ops"][:rows]:
    out.append(f"  {row['ms_per_step']:9.3f} ms  {100 * row['share']:5.1f}%  "
               f"x{row['calls_per_step']:<5g} {row['name']} ({row['category']})")
  return "\n".join(out)
