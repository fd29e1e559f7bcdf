"""Multi-process training (jax.distributed) on the CPU: 2 processes x 2 devices vs 1 x 4.

Each process reads its share of every batch (the pipeline shards identities by process), the
step all-gathers features and averages BatchNorm statistics over all 4 devices, and Orbax
writes one checkpoint from both processes. The parameters and memory banks after the first
step (bank fill, cross-modality terms, bank write: uni_start_epoch=0) must equal those of one
process with 4 devices on the same data, within float tolerance. One step, because the
gradient all-reduce may sum in another order across processes and training amplifies that
rounding over later steps at a CPU-dependent rate (tests/train/test_loop.py measures it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.configs import maum as maum_configs
from maumjax.data import prepare as prepare_lib
from maumjax.train import checkpoint as checkpoint_lib
from maumjax.train import evaluation
from maumjax.train import loop
from tests.train.test_parallel import _assert_same

ROOT = Path(__file__).resolve().parents[2]
STEPS = 1

# One process of a run: its device count must be set before JAX starts.
WORKER = """
import os, sys, json
pid, n, port, workdir, steps = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                int(sys.argv[5]))
# The test session's XLA flags (tests/conftest.py), with this process's share of the 4 devices.
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + [f"--xla_force_host_platform_device_count={4 // n}"])
from maumjax import compilation_cache
compilation_cache.enable()  # the test session's cache (MAUMJAX_COMPILATION_CACHE), as entry points do
from experiments.configs import maum as maum_configs
from maumjax.train import loop
config = maum_configs.get_config("smoke")
config.train.progress = False
config.loss.uni_start_epoch = 0  # the unidirectional terms and the banks from step 1
if n > 1:
  config.distributed = True
  config.coordinator_address = f"127.0.0.1:{port}"
  config.num_processes, config.process_id = n, pid
result = loop.train_and_evaluate(config, workdir, max_steps=steps)
import jax
print("RESULT " + json.dumps({**result, "process_index": jax.process_index(),
                              "process_count": jax.process_count(),
                              "device_count": jax.device_count()}))
"""


def _single_config():
  """WORKER's config for one process (n=1)."""
  config = maum_configs.get_config("smoke")
  config.train.progress = False
  config.loss.uni_start_epoch = 0
  return config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(pid: int, n: int, port: int, workdir: Path, env: dict) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", WORKER, str(pid), str(n), str(port),
                           str(workdir), str(STEPS)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
  try:
    out, err = proc.communicate(timeout=400)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
  assert proc.returncode == 0, err[-4000:]
  [line] = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
  return json.loads(line[len("RESULT "):])


def _state(workdir: Path):
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    meta = ckpt.read_meta()
    raw = ckpt.restore_arrays()
  return meta, jax.tree.map(np.asarray, {"params": raw["params"],
                                         "method_state": raw["method_state"]})


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, monkeypatch):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "MAUMJAX_CACHE": str(tmp_path / "cache")}
  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path / "cache"))
  # Build the smoke data once, so the runs only read it.
  prepare_lib.prepare_from_config(maum_configs.get_config("smoke").to_dict()["data"])

  port = _free_port()
  multi = [_launch(pid, 2, port, tmp_path / "two", env) for pid in range(2)]
  # The one-process reference runs in this process (4 devices, the same XLA flags and
  # compilation cache as WORKER's; suite time: no third interpreter), while the two run.
  try:
    single = {**loop.train_and_evaluate(_single_config(), tmp_path / "one", max_steps=STEPS),
              "process_count": jax.process_count(), "device_count": jax.device_count()}
  except BaseException:
    for p in multi:
      p.kill()
    raise
  results = [_result(p) for p in multi]

  assert [(r["process_index"], r["process_count"], r["device_count"]) for r in results] == [
      (0, 2, 4), (1, 2, 4)]
  assert (single["process_count"], single["device_count"]) == (1, 4)
  assert all(r["stopped_at_step"] == STEPS for r in [*results, single])
  meta2, two = _state(tmp_path / "two")
  meta1, one = _state(tmp_path / "one")
  assert meta1["step"] == meta2["step"] == STEPS
  assert jax.tree.structure(one) == jax.tree.structure(two)
  _assert_same(two["params"], one["params"], "params")
  _assert_same(two["method_state"], one["method_state"], "method_state")
  # Both runs trained (non-zero gradients) and logged the same losses, from process 0 only.
  logs = [[json.loads(ln) for ln in (tmp_path / d / "log.jsonl").read_text().splitlines()]
          for d in ("one", "two")]
  assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]] and logs[0][-1]["step"] == STEPS
  for a, b in zip(*logs):
    assert a["grad_norm"] > 0
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)

  # The 2-process checkpoint also evaluates in this one process (another device topology);
  # one trial of the one setting read here.
  report = evaluation.evaluate_workdir(tmp_path / "two", overrides={
      "trials": 1, "modes": ("all",), "shots": (1,)})
  assert report["step"] == STEPS and 0 <= report["summary"]["all/single"]["r1"] <= 100
