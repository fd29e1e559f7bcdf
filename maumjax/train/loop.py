"""The training loop: data, compiled step, checkpoints, logs and evaluation of one run.

    final = loop.train_and_evaluate(config, workdir)

`config` is the plain-dict form of an experiments config (`method`, and sections data, model,
loss, optim, train, eval; see experiments/configs/). The method comes from
`maumjax.methods.METHODS[config['method']]` and is driven only through the interface of
`maumjax.methods.api`: one compiled step per training phase of the method, its optional
`on_epoch_start` hook (new state and, optionally, new training labels) at every epoch start.
The workdir receives:

* `.lock`: held (flock) by the run's main process for its whole life; a second run on the
  same workdir is refused (`maumjax.train.workdir`);
* `config.json`, `config_history.jsonl`: the resolved config (a restart with checkpoints checks
  that it matches, unless `config_change` names the changed sections) and every start's
  changes;
* `checkpoints/<step>/`: Orbax checkpoints (train state, data-iterator state, epoch, and the
  training labels when the method relabelled the data);
* `log.jsonl`, `tensorboard/`: training and evaluation scalars (`maumjax.train.writers`);
* `eval/`: the final protocol's JSON record, CMC plot and ranked lists;
* `metrics.json`: the final evaluation summary, timings and run facts.

Restarting with the same workdir resumes from the latest checkpoint, with the same batches
and the same parameters as an uninterrupted run. A step whose loss, gradient norm or update
norm is not finite is not applied and stops the run (`NonFiniteLossError`), and a state that is
not finite is never saved: every checkpoint holds finite values only. A failed save ends the
run with `checkpoint.CheckpointSaveError` (one line: the folder and the OS reason).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maumjax import methods
from maumjax.data import pipeline as pipeline_lib
from maumjax.errors import UserError
from maumjax.methods import api
from maumjax.train import checkpoint as checkpoint_lib
from maumjax.train import evaluation
from maumjax.train import inputs
from maumjax.train import optim
from maumjax.train import parallel
from maumjax.train import step as step_lib
from maumjax.train import workdir as workdir_lib
from maumjax.train import writers

RESUME_SECTIONS = workdir_lib.RESUME_SECTIONS  # re-exported


class NonFiniteLossError(UserError, RuntimeError):
  """A step or the state became NaN/inf; the message names the step, the last good
  checkpoint and how to restart from it."""


def _as_dict(config) -> dict[str, Any]:
  """A plain JSON-normalised dict (tuples become lists), as config.json stores it."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))


def _main_first(tag: str, fn):
  """Runs `fn` on process 0 first, then, after a barrier, on the other processes.

  For work on shared files (the dataset build, config.json): on a shared filesystem the others
  then find process 0's result instead of racing it; on per-host disks each host still builds
  its own copy. One process: just `fn()`.
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils

  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"maumjax:{tag}")
  return result if jax.process_index() == 0 else fn()


def initialize_distributed(config: dict[str, Any]) -> None:
  """`jax.distributed.initialize` with the config's coordinator settings (where set).

  Unset fields ('' / 0 / -1) are left to JAX's cluster detection. Does nothing when JAX's
  distributed system is already up (a caller initialised it).
  """
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if config.get("coordinator_address"):
    kwargs["coordinator_address"] = config["coordinator_address"]
  if config.get("num_processes", 0) > 0:
    kwargs["num_processes"] = config["num_processes"]
  if config.get("process_id", -1) >= 0:
    kwargs["process_id"] = config["process_id"]
  jax.distributed.initialize(**kwargs)


class _Throughput:
  """Training images per second over the timed steps (those that compiled nothing)."""

  def __init__(self):
    self.seconds, self.images, self._since = 0.0, 0, None

  def pause(self) -> None:
    if self._since is not None:
      self.seconds += time.perf_counter() - self._since
      self._since = None

  def resume(self) -> None:
    self._since = time.perf_counter()

  def add(self, images: int) -> None:
    self.images += images

  def elapsed(self) -> float:
    return self.seconds + (0.0 if self._since is None else time.perf_counter() - self._since)

  def rate(self) -> float | None:
    seconds = self.elapsed()
    return self.images / seconds if self.images and seconds > 0 else None


class _Steps:
  """One compiled train step per training phase of the method, built on first use."""

  def __init__(self, method, setup: api.Setup, pipe_cfg, mode: str, ctx: api.StepContext):
    self._args = (method, setup, pipe_cfg, mode, ctx)
    self._compiled: dict[int, parallel.CompiledStep] = {}

  def __call__(self, phase: int) -> parallel.CompiledStep:
    if phase not in self._compiled:
      method, setup, pipe_cfg, mode, ctx = self._args
      fn = step_lib.method_step(method, setup, phase, pipeline=pipe_cfg, ctx=ctx)
      self._compiled[phase] = parallel.CompiledStep(fn, mode)
    return self._compiled[phase]


BEST_SUBDIR = checkpoint_lib.BEST_SUBDIR  # <workdir>/best: the eval.select='best_on_test' pick


def train_and_evaluate(config, workdir: str | os.PathLike, *, max_steps: int | None = None,
                       config_change: Sequence[str] = ()) -> dict[str, Any]:
  """Trains (or resumes) one run and evaluates it; returns the contents of metrics.json.

  Args:
    config: ConfigDict or dict (see the module docstring).
    workdir: run directory (checkpoints, logs, metrics.json).
    max_steps: stop this process after so many optimiser steps in total (a checkpoint is
      written first); the run continues from there when started again. None: run to the end.
    config_change: sections of `RESUME_SECTIONS` that may differ from the config of the run
      being resumed (e.g. ('optim',) to lower the learning rate after a non-finite stop); the
      change is recorded in `config_history.jsonl`.

  Raises:
    NonFiniteLossError: a step or the state became NaN/inf.
    workdir.WorkdirError: the workdir is a file, or holds a run with a different config.
    workdir.WorkdirLockedError: another process is running in the workdir.
    checkpoint.CheckpointSaveError: a checkpoint could not be written.
    evaluation.EvalConfigError: an `eval` field names an unknown choice.
    ValueError: an unknown method.
  """
  config = _as_dict(config)
  method = methods.get(config["method"])
  evaluation.check_config(config)
  workdir = workdir_lib.ensure_workdir(workdir)
  if config.get("distributed"):
    initialize_distributed(config)
  # One lock per run, held by its main process (the others share the main process's workdir).
  lock = workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    return _train_and_evaluate(method, config, workdir, max_steps, tuple(config_change))
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(method, config: dict[str, Any], workdir: Path, max_steps: int | None,
                        config_change: tuple[str, ...]) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  steps_saved = checkpoint_lib.saved_steps(workdir)
  _main_first("config", lambda: workdir_lib.check_config(
      workdir, config, checkpoint_step=steps_saved[-1] if steps_saved else None,
      allow_change=config_change, write=is_main))
  tc = config["train"]
  prepared, pipe_cfg, pipe, source = _main_first("data", lambda: inputs.prepare(config))
  data = inputs.data_info(pipe, config)
  steps_per_epoch = data.steps_per_epoch
  setup = method.init(config, data, seed=config["seed"])
  mode = parallel.check_mode(config["parallel"])
  devices = parallel.device_count(mode)
  ctx = api.StepContext(axis_name=None if mode == "none" else parallel.DATA_AXIS,
                        devices=devices, sync_bn=config["model"]["sync_bn"])
  steps = _Steps(method, setup, pipe_cfg, mode, ctx)
  total_steps = config["num_epochs"] * steps_per_epoch
  pairs = pipe.local_batch * jax.process_count()
  on_epoch_start = getattr(method, "on_epoch_start", None)

  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=tc["keep_checkpoints"])
  # eval.select='best_on_test': the state of the best quick evaluation so far, in <workdir>/best
  # (its metadata is the record of the pick, so a resumed run knows it).
  best_ckpt, best = None, None
  if config["eval"].get("select", "last") == "best_on_test":
    best_ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=1, subdir=BEST_SUBDIR)
    if best_ckpt.latest_step() is not None:
      best = best_ckpt.read_meta()["best"]
  state, meta = setup.state, {}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(setup.state)
  step = int(state.step)
  # Training time of the earlier processes of this run (a resumed run reports the whole run's).
  before = {k: float(meta.get(k, 0.0)) for k in ("train_seconds", "timed_seconds", "timed_images")}
  # The training labels in force and the epoch the current iterator starts at: a method that
  # relabels the data gets a new pipeline (same epoch length) from that epoch on.
  labels = None if meta.get("labels") is None else np.asarray(meta["labels"], np.int64)
  iter_start = int(meta.get("iterator_start_epoch", 0))

  base_pipe = pipe

  def open_iterator(labels_, start_epoch):
    nonlocal pipe
    pipe = base_pipe if labels_ is None else pipeline_lib.make_train_pipeline(
        source, pipe_cfg, metadata=base_pipe.metadata, labels=labels_,
        steps_per_epoch=steps_per_epoch, store=base_pipe.store)
    return pipe.iterator(config["num_epochs"] - start_epoch, start_epoch=start_epoch)

  paths = functools.cache(lambda: pipeline_lib.read_paths(source))
  iterator = open_iterator(None if labels is None else np.asarray(labels, np.int64), iter_start)
  if meta.get("data_iterator") is not None:
    iterator.set_state(meta["data_iterator"])
  placement = steps(method.phase(setup, step // steps_per_epoch))
  dstate = placement.put_state(state)
  del state

  def run_times() -> dict[str, float]:
    """This run's training time so far, over all its processes."""
    return {"train_seconds": before["train_seconds"] + time.perf_counter() - t_start,
            "timed_seconds": before["timed_seconds"] + timer.elapsed(),
            "timed_images": before["timed_images"] + timer.images}

  def save(force: bool = False):
    if not bool(_all_finite(dstate)):  # on the devices, before copying the state out
      raise NonFiniteLossError(
          f"the train state after step {step} holds NaN/inf values (a step whose loss and "
          f"gradients were finite overflowed the parameters or statistics); it was not "
          f"saved. {_restart_advice(ckpt, config)}")
    meta = {"step": step, "epoch": step // steps_per_epoch, "data_iterator": iterator.get_state(),
            "iterator_start_epoch": iter_start,
            **{k: round(v, 3) for k, v in run_times().items()}}
    if labels is not None:
      meta["labels"] = np.asarray(labels, np.int64).tolist()  # [N] or [N, L] label columns
    ckpt.save(step, placement.get_state(dstate), meta, force=force)

  def check_finite(s: int, m) -> None:
    if not placement.get_metrics({"finite": m["finite"]})["finite"]:
      values = {k: v for k, v in placement.get_metrics(m).items() if k != "finite"}
      shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items()
                        if k in ("loss", "grad_norm"))
      raise NonFiniteLossError(
          f"non-finite step {s} (epoch {(s - 1) // steps_per_epoch}: {shown}); it was not "
          f"applied and nothing after it was saved. {_restart_advice(ckpt, config)}")

  def quick_evaluation(host_state, epoch_: int) -> dict[str, dict[str, float]]:
    """The in-training check (`eval.quick_trials`), logged at the current step."""
    summary = evaluation.summarize(evaluation.evaluate(method, setup, host_state, prepared,
                                                       config, full=False))
    if writer:
      writer.write(step, evaluation.scalars(summary), kind="eval", epoch=epoch_)
    return summary

  def say(message: str) -> None:
    if is_main:
      bar.write(message)

  writer = (writers.MetricWriter(workdir, tensorboard=tc["tensorboard"], resume_step=step)
            if is_main else None)
  bar = writers.progress(total_steps, step, disable=not (tc["progress"] and is_main))
  limit = total_steps if max_steps is None else min(total_steps, max_steps)
  t_start = time.perf_counter()
  timer = _Throughput()
  ran = set()  # phases whose step has run (compiled) in this process
  pending = None
  describe = getattr(method, "describe_phase", None)
  shown_phase = method.phase(setup, step // steps_per_epoch) if step else None
  if step < limit:
    say(f"{config['method']}: {'resuming at' if step else 'training from'} step {step} of "
        f"{total_steps} ({config['num_epochs']} epochs of {steps_per_epoch} steps, "
        f"{2 * pairs} images per step, {devices} {jax.default_backend()} device(s)); "
        f"checkpoints in {ckpt.directory}")
  completed = False
  try:
    while step < limit:
      epoch = step // steps_per_epoch
      if on_epoch_start is not None and step % steps_per_epoch == 0:
        if pending is not None:
          check_finite(*pending)
          pending = None
        jax.block_until_ready(dstate)
        timer.pause()
        log = None if writer is None else (
            lambda values, kind, s=step, e=epoch: writer.write(s, values, kind=kind, epoch=e))
        host_state, new_labels = on_epoch_start(setup, placement.get_state(dstate), epoch,
                                                _epoch_data(base_pipe, pipe, pipe_cfg, log,
                                                            paths))
        dstate = placement.put_state(host_state)
        del host_state
        if new_labels is not None:
          labels = inputs.check_labels(new_labels, len(base_pipe.metadata["label"]),
                                       config["method"])
          iterator.close()
          iter_start = epoch
          iterator = open_iterator(labels, iter_start)
        timer.resume()
      phase = method.phase(setup, epoch)
      if phase != shown_phase:
        note = describe(setup, phase) if describe is not None else None
        if note:
          say(f"epoch {epoch}: {note}")
        shown_phase = phase
      compiles = phase not in ran
      ran.add(phase)
      if compiles:  # a phase's first step includes its compilation: keep it out of the rate
        jax.block_until_ready(dstate)
        timer.pause()
      compiled = steps(phase)
      batch = next(iterator)
      dstate, metrics = compiled(dstate, compiled.put_batch({"rgb": batch["rgb"],
                                                             "ir": batch["ir"]}))
      step += 1
      if compiles:
        jax.block_until_ready(metrics)
        timer.resume()
      else:
        timer.add(2 * pairs)
      # Finiteness is checked one step late, so the host never waits on the step it just
      # dispatched; before a checkpoint, an evaluation or the end it is checked at once.
      if pending is not None:
        check_finite(*pending)
      pending = (step, metrics)
      epoch_end = step % steps_per_epoch == 0
      if step % tc["log_every"] == 0 or epoch_end or step == limit:
        values = compiled.get_metrics(metrics)
        rate = timer.rate() or 0.0
        values.update(images_per_s=rate, **optim.learning_rates(
            optim.OptimConfig(**config["optim"]), steps_per_epoch, step - 1))
        if writer:
          writer.write(step, values, epoch=(step - 1) // steps_per_epoch)
        bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{rate:.0f}")
      bar.update(1)
      epoch = step // steps_per_epoch
      if step == limit or epoch_end or (tc["checkpoint_every_steps"]
                                        and step % tc["checkpoint_every_steps"] == 0):
        check_finite(*pending)
        pending = None
      if epoch_end and (epoch % tc["checkpoint_every_epochs"] == 0 or step == total_steps):
        save()
      elif tc["checkpoint_every_steps"] and step % tc["checkpoint_every_steps"] == 0:
        save()
      if (epoch_end and tc["eval_every_epochs"] and epoch % tc["eval_every_epochs"] == 0
          and step < total_steps):
        timer.pause()
        host_state = placement.get_state(dstate)
        summary = quick_evaluation(host_state, epoch - 1)
        timer.resume()
        say(f"epoch {epoch - 1} quick evaluation: {_headline(summary)}")
        if best_ckpt is not None:
          best = _keep_best(best_ckpt, best, summary, step, epoch - 1, host_state,
                            metric=config["eval"].get("select_metric", "r1"))
        del host_state
    jax.block_until_ready(dstate)
    timer.pause()
    train_seconds = time.perf_counter() - t_start
    if ckpt.latest_step() != step:
      save(force=True)
    ckpt.wait()
    times = run_times()
    if step < total_steps:  # stopped early by max_steps: the checkpoint above resumes it
      completed = True
      return {"stopped_at_step": step, "total_steps": total_steps}
    state = placement.get_state(dstate)
    selected = {"rule": "last", "step": step}
    if best_ckpt is not None:  # the final state is a candidate too
      summary = quick_evaluation(state, config["num_epochs"] - 1)
      say(f"final quick evaluation: {_headline(summary)}")
      best = _keep_best(best_ckpt, best, summary, step, config["num_epochs"] - 1, state,
                        metric=config["eval"].get("select_metric", "r1"))
      best_ckpt.wait()
      if best["step"] != step:
        state, _ = best_ckpt.restore(setup.state)
      selected = {"rule": "best_on_test", **best}
      say(f"eval.select='best_on_test': evaluating the state after epoch {best['epoch']} "
          f"(step {best['step']}, quick {best['setting']} R1 {best['r1_pct']:.1f}%); it was "
          "chosen on the test set, so its numbers are optimistic")
    completed = True
  finally:
    bar.close()
    iterator.close()
    for manager in (ckpt, best_ckpt):
      if manager is None:
        continue
      if completed:
        manager.close()
      else:  # an error is on its way up: close without letting a second error replace it
        try:
          manager.close()
        except Exception:  # noqa: BLE001
          pass
    if writer:
      writer.close()

  t0 = time.perf_counter()
  report = evaluation.evaluate(method, setup, state, prepared, config, full=True,
                               out_dir=workdir / "eval" if is_main else None)
  eval_seconds = time.perf_counter() - t0
  result = {
      **evaluation.result_record(report),
      "run": {
          "method": config["method"],
          "steps": total_steps, "epochs": config["num_epochs"],
          "steps_per_epoch": steps_per_epoch, "images_per_step": 2 * pairs,
          "train_seconds": round(times["train_seconds"], 2),
          "train_seconds_this_process": round(train_seconds, 2),
          "train_images_per_s": (round(times["timed_images"] / times["timed_seconds"], 2)
                                 if times["timed_images"] and times["timed_seconds"] > 0
                                 else None),
          "eval_seconds": round(eval_seconds, 2), "selected": selected,
          "parallel": mode, "devices": devices,
          "num_classes": data.num_classes, "dataset": prepared.name,
          "synthetic_data": prepared.synthetic,
          "pretrained_sha256": getattr(setup.load_report, "sha256", None),
          "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      },
  }
  if is_main:
    with writers.MetricWriter(workdir, tensorboard=tc["tensorboard"]) as w:
      w.write(total_steps, evaluation.scalars(result["summary"]), kind="final")
    (workdir / "metrics.json").write_text(json.dumps(result, indent=1))
  return result


@jax.jit
def _all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _restart_advice(ckpt: checkpoint_lib.Checkpointer, config: dict[str, Any]) -> str:
  """How to go on after a non-finite stop: from which checkpoint, with which flags."""
  lr = config["optim"]["lr"]
  flags = f"--config.optim.lr={lr / 10:g} --config_change=optim"
  last = ckpt.latest_step()
  if last is None:
    return (f"No checkpoint was written yet: run again with the same --workdir and a lower "
            f"learning rate ({flags}), or check the data, or use model.dtype='float32'")
  return (f"The last good checkpoint is step {last} in {ckpt.directory}: resume from it with "
          f"the same --workdir and a lower learning rate ({flags}), or check the data, or use "
          "model.dtype='float32'")


def _keep_best(best_ckpt: checkpoint_lib.Checkpointer, best: dict[str, Any] | None,
               summary: dict[str, dict[str, float]], step: int, epoch: int,
               state, *, metric: str = "r1") -> dict[str, Any]:
  """Saves the state in `best_ckpt` when this quick evaluation's first-setting `metric` ('r1'
  or 'mAP', `eval.select_metric`) beats `best` (ties keep the earlier state); returns the
  record of the best so far."""
  setting, values = next(iter(summary.items()))
  if best is not None and values[metric] <= best[f"{metric}_pct"]:
    return best
  best = {"step": step, "epoch": epoch, "setting": setting, "r1_pct": values["r1"],
          "mAP_pct": values["mAP"]}
  best_ckpt.save(step, state, {"step": step, "best": best}, force=True)
  return best


def _headline(summary: dict[str, dict[str, float]]) -> str:
  """`all/single R1 12.3% mAP 20.1%` for the first setting of an evaluation summary."""
  setting, values = next(iter(summary.items()))
  return f"{setting} R1 {values['r1']:.1f}% mAP {values['mAP']:.1f}%"


def _epoch_data(base: pipeline_lib.TrainPipeline, current: pipeline_lib.TrainPipeline,
                pipe_cfg, log=None, paths=None) -> api.EpochData:
  """What `on_epoch_start` may read: dataset metadata, in-use mask, labels in force, images,
  the records' paths and the run's scalar log."""
  return api.EpochData(metadata=base.metadata, keep=base.keep,
                       labels=current.metadata["label"], images=base.store.__getitem__,
                       pipeline=pipe_cfg, log=log, paths=paths)
