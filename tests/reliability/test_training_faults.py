"""Faults injected into training runs: what the trainer guarantees when things go wrong.

* a step with NaN gradients (finite loss) is not applied, is never saved, and the advice it
  prints (lower the learning rate, `config_change=('optim',)`) can be followed;
* a state that overflows without a non-finite gradient is never saved;
* a second run on a locked workdir is refused, and the lock dies with its holder (kill -9);
* a save that fails (file-size limit standing in for a full disk) ends the process promptly
  with one line naming the folder;
* kill -9 in the middle of a save resumes to the same parameters as an uninterrupted run;
* a resumed run logs each step once and reports the whole run's training time.

The runs use `tiny_method` (the trainer's guarantees do not depend on the method, and its
model compiles in about a second), which can break one chosen step on purpose.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.configs import maum as maum_configs
from maumjax import methods
from maumjax.train import checkpoint as checkpoint_lib
from maumjax.train import evaluation
from maumjax.train import loop
from maumjax.train import workdir as workdir_lib
from maumjax.train import writers
from tests.reliability import tiny_method

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One synthetic dataset build for the module (MAUMJAX_CACHE), prepared once."""
  path = tmp_path_factory.mktemp("reliability_cache")
  old = os.environ.get("MAUMJAX_CACHE")
  os.environ["MAUMJAX_CACHE"] = str(path)
  from maumjax.train import inputs
  inputs.prepare(loop._as_dict(_config()))
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(methods.METHODS, "tiny", tiny_method.make())
    yield path
  if old is None:
    os.environ.pop("MAUMJAX_CACHE")
  else:
    os.environ["MAUMJAX_CACHE"] = old


def _config(method: str = "tiny", **train):
  config = maum_configs.get_config("smoke")
  config.method = method
  config.parallel = "none"
  config.train.update(**{"checkpoint_every_steps": 1, "keep_checkpoints": 10, **train})
  config.eval.trials = 1
  return config


def _params(workdir: Path, step: int | None = None):
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    return jax.tree.map(np.asarray, ckpt.restore_arrays(step))


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_nan_gradient_step_is_not_applied_nor_saved_and_the_advice_works(
    cache, tmp_path, monkeypatch):
  monkeypatch.setitem(methods.METHODS, "tiny", tiny_method.make("nan_grad", 3, min_lr=0.05))
  config = _config()
  config.optim.lr = 0.1
  with pytest.raises(loop.NonFiniteLossError) as err:
    loop.train_and_evaluate(config, tmp_path, max_steps=5)
  message = str(err.value)
  assert "non-finite step 3" in message and "\n" not in message
  assert "grad_norm=nan" in message  # the loss itself was finite: the gradient tripped it
  assert f"last good checkpoint is step 2 in {tmp_path / 'checkpoints'}" in message
  assert "--config.optim.lr=0.01 --config_change=optim" in message
  assert checkpoint_lib.saved_steps(tmp_path) == [1, 2]
  for step in (1, 2):
    assert _all_finite(_params(tmp_path, step))
  rows = writers.read_log(tmp_path, "train")
  assert max(r["step"] for r in rows) <= 3

  # The advice as given: same workdir, lower lr, --config_change=optim.
  config.optim.lr = 0.01
  with pytest.raises(workdir_lib.WorkdirError, match="--config_change=optim"):
    loop.train_and_evaluate(config, tmp_path, max_steps=4)  # not without the flag
  result = loop.train_and_evaluate(config, tmp_path, max_steps=4, config_change=["optim"])
  assert result["stopped_at_step"] == 4
  assert _all_finite(_params(tmp_path, 4))
  history = workdir_lib.read_history(tmp_path)
  assert history[-1]["event"] == "resume_with_changes" and history[-1]["step"] == 2
  assert history[-1]["changed"]["optim.lr"] == [0.1, 0.01]
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 0.01
  steps = [r["step"] for r in writers.read_log(tmp_path, "train")]
  assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # step 3's failed record was dropped


def test_first_step_non_finite_says_no_checkpoint_and_accepts_a_new_config(
    cache, tmp_path, monkeypatch):
  monkeypatch.setitem(methods.METHODS, "tiny", tiny_method.make("nan_grad", 1, min_lr=0.05))
  config = _config()
  config.optim.lr = 0.1
  with pytest.raises(loop.NonFiniteLossError) as err:
    loop.train_and_evaluate(config, tmp_path, max_steps=2)
  assert "None" not in str(err.value) and "No checkpoint was written yet" in str(err.value)
  assert checkpoint_lib.saved_steps(tmp_path) == []
  config.optim.lr = 0.01  # no checkpoint: a corrected config needs no flag
  assert loop.train_and_evaluate(config, tmp_path, max_steps=1)["stopped_at_step"] == 1
  assert workdir_lib.read_history(tmp_path)[-1]["event"] == "restart_without_checkpoint"


def test_a_state_that_overflows_is_never_saved(cache, tmp_path, monkeypatch):
  monkeypatch.setitem(methods.METHODS, "tiny", tiny_method.make("inf_state", 2))
  with pytest.raises(loop.NonFiniteLossError, match="after step 2 holds NaN/inf") as err:
    loop.train_and_evaluate(_config(), tmp_path, max_steps=3)
  assert "last good checkpoint is step 1" in str(err.value)
  assert checkpoint_lib.saved_steps(tmp_path) == [1]
  assert _all_finite(_params(tmp_path, 1))


_HOLD = textwrap.dedent("""
    import sys, time
    from maumjax.train.workdir import WorkdirLock
    lock = WorkdirLock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_locked_workdir_is_refused_and_the_lock_dies_with_its_holder(cache, tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirLockedError) as err:
      loop.train_and_evaluate(_config(), tmp_path, max_steps=1)
    assert f"pid {holder.pid} on host" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "config.json").exists()  # refused before touching the run
    with pytest.raises(workdir_lib.WorkdirLockedError):  # in-process: a second lock fails too
      with workdir_lib.WorkdirLock(tmp_path):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lib.WorkdirLock(tmp_path):  # kill -9 released it
    with pytest.raises(workdir_lib.WorkdirLockedError):
      workdir_lib.WorkdirLock(tmp_path)


_CLI = textwrap.dedent("""
    import sys
    from experiments import cli, launch
    from experiments.configs import maum as maum_configs
    from maumjax import methods
    from tests.reliability import tiny_method

    methods.METHODS["tiny"] = tiny_method.make(state_floats=50_000)  # 200 kB checkpoints

    def main(argv):
      config = maum_configs.get_config("smoke")
      config.method = "tiny"
      config.parallel = "none"
      config.num_epochs = 1
      config.eval.trials = 1
      config.train.update(checkpoint_every_steps=1)
      launch.run("tiny", config, argv[1])

    cli.run(main)
""")


def _limit_file_size():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_a_failed_save_ends_the_process_promptly_with_one_line(cache, tmp_path):
  """A checkpoint file over the file-size limit cannot be written (EFBIG, as a full disk):
  the command line exits with status 2 and one line naming the folder, and does not hang."""
  start = time.monotonic()
  done = subprocess.run([sys.executable, "-c", _CLI, str(tmp_path)], cwd=ROOT,
                        env=dict(os.environ, MAUMJAX_CACHE=str(cache)), capture_output=True,
                        text=True, timeout=120, preexec_fn=_limit_file_size)
  assert done.returncode == 2, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, done.stderr[-3000:]
  assert f"{tmp_path / 'checkpoints'}" in errors[0] and "File too large" in errors[0]
  # No traceback through our code (tensorstore's native callbacks may print bare "Event loop
  # is closed" tracebacks of their own from the failed background write).
  assert "maumjax/" not in done.stderr and "experiments/" not in done.stderr, done.stderr[-3000:]
  assert "ERROR:absl" not in done.stderr and "never retrieved" not in done.stderr
  assert time.monotonic() - start < 110
  assert checkpoint_lib.saved_steps(tmp_path) == []


_KILL_IN_SAVE = textwrap.dedent("""
    import os, signal, sys
    from experiments.configs import maum as maum_configs
    from maumjax import methods
    from maumjax.train import checkpoint, loop
    from tests.reliability import tiny_method

    original = checkpoint.Checkpointer.save

    def save(self, step, state, meta, *, force=False):
      out = original(self, step, state, meta, force=force)
      if step == 3:  # the async save of step 3 has started: kill -9 before it can finish
        os.kill(os.getpid(), signal.SIGKILL)
      return out

    checkpoint.Checkpointer.save = save
    methods.METHODS["tiny"] = tiny_method.make()
    config = maum_configs.get_config("smoke")
    config.method = "tiny"
    config.parallel = "none"
    config.eval.trials = 1
    config.train.update(checkpoint_every_steps=1, keep_checkpoints=10)
    loop.train_and_evaluate(config, sys.argv[1], max_steps=5)
""")


def test_kill_during_a_save_resumes_to_the_uninterrupted_parameters(cache, tmp_path):
  reference = tmp_path / "reference"
  loop.train_and_evaluate(_config(), reference, max_steps=5)
  killed = tmp_path / "killed"
  proc = subprocess.run([sys.executable, "-c", _KILL_IN_SAVE, str(killed)], cwd=ROOT,
                        env=dict(os.environ, MAUMJAX_CACHE=str(cache)), capture_output=True,
                        text=True, timeout=240)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert max(checkpoint_lib.saved_steps(killed)) in (2, 3)  # 3 only if its save won the race
  with (killed / "log.jsonl").open("a") as f:
    f.write('{"step": 3, "kind": "tra')  # a record cut short by the kill
  assert loop.train_and_evaluate(_config(), killed, max_steps=5)["stopped_at_step"] == 5
  ref, got = _params(reference, 5), _params(killed, 5)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  steps = [r["step"] for r in writers.read_log(killed, "train")]
  assert steps == [1, 2, 3, 4, 5]


def _event_steps(path: Path) -> tuple[list[int], int | None]:
  """(scalar event steps, purge step) of a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  data, steps, purge = path.read_bytes(), [], None
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
    if event.HasField("session_log") and event.session_log.status == event.session_log.START:
      purge = event.step
    elif event.HasField("summary"):
      steps.append(event.step)
  return steps, purge


def test_a_resumed_run_logs_each_step_once_and_keeps_the_run_training_time(
    cache, tmp_path, monkeypatch):
  config = _config(checkpoint_every_steps=2, tensorboard=True)
  config.num_epochs = 1
  loop.train_and_evaluate(config, tmp_path, max_steps=5)  # checkpoints 2, 4 and 5
  # As if killed after logging step 5 but before its checkpoint: drop checkpoint 5.
  import shutil
  shutil.rmtree(tmp_path / "checkpoints" / "5")
  before = {f.name for f in (tmp_path / "tensorboard").iterdir()}

  class Killed(Exception):
    pass

  real_evaluate = evaluation.evaluate

  def evaluate(*args, full, **kwargs):  # kill the process in its final evaluation
    if full:
      raise Killed
    return real_evaluate(*args, full=full, **kwargs)

  monkeypatch.setattr(evaluation, "evaluate", evaluate)
  with pytest.raises(Killed):
    loop.train_and_evaluate(config, tmp_path)
  monkeypatch.setattr(evaluation, "evaluate", real_evaluate)
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    meta = ckpt.read_meta()
  total = meta["step"]
  assert meta["train_seconds"] > 0 and meta["timed_images"] > 0
  result = loop.train_and_evaluate(config, tmp_path)  # nothing left to train: evaluates
  run = result["run"]
  assert run["steps"] == total and run["train_seconds"] >= meta["train_seconds"] - 0.01
  assert run["train_images_per_s"] == pytest.approx(
      meta["timed_images"] / meta["timed_seconds"], rel=1e-2)
  assert run["train_seconds_this_process"] < run["train_seconds"]
  steps = [r["step"] for r in writers.read_log(tmp_path, "train")]
  assert steps == list(range(1, total + 1))
  assert len(writers.read_log(tmp_path, "final")) == 1
  new = [f for f in (tmp_path / "tensorboard").iterdir() if f.name not in before]
  purges = [_event_steps(f)[1] for f in sorted(new)]
  assert purges[0] == 5  # the second process hides the first one's events from step 5 on


def test_a_run_says_where_it_starts_each_phase_and_each_quick_evaluation(
    cache, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(methods.METHODS, "tiny", tiny_method.make(phases=True))
  config = _config(checkpoint_every_steps=0, eval_every_epochs=1)
  spe = loop.train_and_evaluate(config, tmp_path / "a", max_steps=1)["total_steps"] // 2
  out = capsys.readouterr().out
  assert f"tiny: training from step 0 of {2 * spe}" in out
  loop.train_and_evaluate(config, tmp_path / "a", max_steps=spe + 1)
  out = capsys.readouterr().out.splitlines()
  resumed = [i for i, line in enumerate(out) if line.startswith("tiny: resuming at step 1 of")]
  quick = [i for i, line in enumerate(out)
           if line.startswith("epoch 0 quick evaluation: all/single R1 ")]
  phase = [i for i, line in enumerate(out)
           if line == "epoch 1: phase one of the tiny method starts"]
  assert len(resumed) == len(quick) == len(phase) == 1, out
  assert resumed[0] < quick[0] < phase[0]
  rows = writers.read_log(tmp_path / "a", "eval")
  assert len(rows) == 1 and f"{rows[0]['all/single/r1_pct']:.1f}%" in out[quick[0]]
