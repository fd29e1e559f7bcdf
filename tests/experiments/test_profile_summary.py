"""profile_summary: interval arithmetic and the summary of hand-built and real traces."""

from __future__ import annotations

import glob

import jax
import jax.numpy as jnp
import pytest
from jax.profiler import ProfileData

from experiments.benchmarks import profile_summary as ps


def _xspace(planes: str) -> ProfileData:
  return ProfileData.from_text_proto(planes)


def _event(meta: int, start_us: float, dur_us: float, stats: str = "") -> str:
  return (f"events {{ metadata_id: {meta} offset_ps: {int(start_us * 1e6)} "
          f"duration_ps: {int(dur_us * 1e6)} {stats} }}")


def test_union_length_counts_overlaps_once():
  assert ps.union_length([]) == 0.0
  assert ps.union_length([(0, 2), (1, 3), (5, 6)]) == 4.0
  assert ps.union_length([(0, 10), (2, 3), (4, 12)]) == 12.0
  assert ps.union_length([(3, 4), (0, 1)]) == 2.0  # unsorted input
  assert ps.union_length([(0, 1), (1, 2)]) == 2.0  # touching intervals


@pytest.mark.parametrize("name,cat", [("fusion.12", "fusion"), ("custom-call.3", "custom-call"),
                                      ("%copy.1.2", "copy"), ("all-reduce", "all-reduce"),
                                      ("transpose_copy_fusion.50", "transpose_copy_fusion")])
def test_category_of(name, cat):
  assert ps.category_of(name) == cat


def test_summary_of_an_xla_ops_line_by_hand():
  # Two steps; ops at [0,2), [3,4), [5,7) us; the module line (ignored) spans all of it.
  # Window 7 us, busy 5 us: per step 3.5 / 2.5 us, idle 2/7. custom-call.3 is 4 of the 5 us.
  space = _xspace(f"""
  planes {{ id: 1 name: "/device:GPU:0"
    lines {{ id: 1 name: "XLA Modules" timestamp_ns: 0 {_event(9, 0, 7)} }}
    lines {{ id: 2 name: "XLA Ops" timestamp_ns: 0
      {_event(1, 0, 2, 'stats { metadata_id: 1 str_value: "convolution" }')}
      {_event(2, 3, 1)}
      {_event(1, 5, 2, 'stats { metadata_id: 1 str_value: "convolution" }')} }}
    event_metadata {{ key: 1 value {{ id: 1 name: "custom-call.3" }} }}
    event_metadata {{ key: 2 value {{ id: 2 name: "fusion.12" }} }}
    event_metadata {{ key: 9 value {{ id: 9 name: "jit_step" }} }}
    stat_metadata {{ key: 1 value {{ id: 1 name: "hlo_category" }} }} }}""")
  s = ps.summarize(space, steps=2)
  assert s["source"] == "device plane, XLA Ops line" and s["events"] == 3
  assert s["window_ms_per_step"] == pytest.approx(3.5e-3)
  assert s["busy_ms_per_step"] == pytest.approx(2.5e-3)
  assert s["idle_fraction"] == pytest.approx(round(2 / 7, 4))
  assert s["by_category"] == {"convolution": 0.8, "fusion": 0.2}
  top = s["top_ops"][0]
  assert (top["name"], top["category"], top["share"], top["calls_per_step"]) == (
      "custom-call.3", "convolution", 0.8, 1.0)
  assert top["ms_per_step"] == pytest.approx(2e-3)
  assert s["top_kernels"] == []
  assert "idle 28.6%" in ps.format_summary(s)


def test_summary_of_kernels_on_two_streams_by_hand():
  # No XLA Ops line: kernels carry hlo_op. Stream A: [0,4) conv kernel of custom-call.1;
  # stream B: [2,6) gemm kernel of fusion.7, overlapping A. One step: busy 6, window 6,
  # summed 8 (shares 0.5 / 0.5). An event without hlo_op (a memcpy) is not an operation.
  space = _xspace(f"""
  planes {{ id: 1 name: "/device:GPU:0"
    lines {{ id: 1 name: "Stream #13" timestamp_ns: 0
      {_event(1, 0, 4, 'stats { metadata_id: 1 str_value: "custom-call.1" }')}
      {_event(3, 10, 50)} }}
    lines {{ id: 2 name: "Stream #14" timestamp_ns: 0
      {_event(2, 2, 4, 'stats { metadata_id: 1 str_value: "fusion.7" }')} }}
    event_metadata {{ key: 1 value {{ id: 1 name: "sm90_xmma_fprop_conv" }} }}
    event_metadata {{ key: 2 value {{ id: 2 name: "gemm_fusion_kernel" }} }}
    event_metadata {{ key: 3 value {{ id: 3 name: "MemcpyD2H" }} }}
    stat_metadata {{ key: 1 value {{ id: 1 name: "hlo_op" }} }} }}""")
  s = ps.summarize(space, steps=1)
  assert s["source"] == "device planes, events with an hlo_op stat"
  assert s["busy_ms_per_step"] == pytest.approx(6e-3)
  assert s["window_ms_per_step"] == pytest.approx(6e-3) and s["idle_fraction"] == 0.0
  assert s["summed_op_ms_per_step"] == pytest.approx(8e-3)
  assert {r["name"] for r in s["top_ops"]} == {"custom-call.1", "fusion.7"}
  assert {r["name"] for r in s["top_kernels"]} == {"sm90_xmma_fprop_conv", "gemm_fusion_kernel"}
  assert s["by_category"] == {"custom-call": 0.5, "fusion": 0.5}


def test_summary_of_unnamed_kernels_by_hand():
  # Neither an XLA Ops line nor hlo_op stats: the stream lines' kernels, [0,2) and [5,6) us.
  space = _xspace(f"""
  planes {{ id: 1 name: "/device:GPU:0"
    lines {{ id: 1 name: "Stream #13" timestamp_ns: 0 {_event(1, 0, 2)} {_event(2, 5, 1)} }}
    lines {{ id: 2 name: "Launch Stats" timestamp_ns: 0 {_event(1, 0, 9)} }}
    event_metadata {{ key: 1 value {{ id: 1 name: "sm90_gemm" }} }}
    event_metadata {{ key: 2 value {{ id: 2 name: "loop_add_fusion" }} }} }}""")
  s = ps.summarize(space, steps=1)
  assert s["source"].startswith("device planes, stream events")
  assert s["busy_ms_per_step"] == pytest.approx(3e-3)
  assert s["window_ms_per_step"] == pytest.approx(6e-3) and s["idle_fraction"] == 0.5
  assert [r["name"] for r in s["top_ops"]] == ["sm90_gemm", "loop_add_fusion"]


def test_summary_refuses_empty_traces_and_zero_steps():
  space = _xspace('planes { id: 1 name: "/host:CPU" }')
  with pytest.raises(ValueError, match="no XLA operation events"):
    ps.summarize(space, steps=1)
  with pytest.raises(ValueError, match="at least one traced step"):
    ps.summarize(space, steps=0)


def test_summary_of_a_real_cpu_trace(tmp_path):
  x = jnp.ones((256, 256))
  f = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
  jax.block_until_ready(f(x))
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      y = f(x)
    jax.block_until_ready(y)
  [path] = glob.glob(str(tmp_path / "**" / "*.xplane.pb"), recursive=True)
  s = ps.summarize(path, steps=3)
  assert s["events"] >= 3
  assert 0 < s["busy_ms_per_step"] <= s["window_ms_per_step"] + 1e-9
  assert 0.0 <= s["idle_fraction"] < 1.0
  assert sum(s["by_category"].values()) == pytest.approx(1.0, abs=1e-3)
  # The two matmuls dominate a 256^3 program on any backend.
  assert any("dot" in c or "fusion" in c for c in list(s["by_category"])[:3]), s["by_category"]
