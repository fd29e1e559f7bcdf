"""The training loop: data, compiled step, checkpoints, logs and evaluation of one run.

    final = loop.train_and_evaluate(config, workdir)

`config` is the plain-dict form of an experiments config (`method`, and sections data, model,
loss, optim, train, eval; see experiments/configs/). The method comes from
`maumjax.methods.METHODS[config['method']]` and is driven only through the interface of
`maumjax.methods.api`: one compiled step per training phase of the method, its optional
`on_epoch_start` hook (new state and, optionally, new training labels) at every epoch start.
The workdir receives:

* `config.json`: the resolved config (a restart checks it matches);
* `checkpoints/<step>/`: Orbax checkpoints (train state, data-iterator state, epoch, and the
  training labels when the method relabelled the data);
* `log.jsonl`, `tensorboard/`: training and evaluation scalars (`maumjax.train.writers`);
* `eval/`: the final protocol's JSON record, CMC plot and ranked lists;
* `metrics.json`: the final evaluation summary, timings and run facts.

Restarting with the same workdir resumes from the latest checkpoint, with the same batches
and the same parameters as an uninterrupted run. A non-finite loss stops the run
(`NonFiniteLossError`); the step that produced it is not applied and no checkpoint is written
after it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from maumjax import methods
from maumjax.data import pipeline as pipeline_lib
from maumjax.methods import api
from maumjax.train import checkpoint as checkpoint_lib
from maumjax.train import evaluation
from maumjax.train import inputs
from maumjax.train import optim
from maumjax.train import parallel
from maumjax.train import step as step_lib
from maumjax.train import writers

# Config sections that must match when a run resumes (train/eval settings may change).
RESUME_SECTIONS = ("data", "model", "loss", "optim", "method", "seed", "num_epochs")


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the message names the step and the last checkpoint."""


def _as_dict(config) -> dict[str, Any]:
  """A plain JSON-normalised dict (tuples become lists), as config.json stores it."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config))


def _check_resume_config(workdir: Path, config: dict[str, Any], *, write: bool = True) -> None:
  path = workdir / "config.json"
  if path.exists():
    old = json.loads(path.read_text())
    changed = [k for k in RESUME_SECTIONS if old.get(k) != config.get(k)]
    if changed:
      raise ValueError(f"{workdir} holds a run with a different config (sections {changed} "
                       f"differ from {path}); resume with the same config or use a new --workdir")
  if write:
    path.write_text(json.dumps(config, indent=1, sort_keys=True))


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

  def rate(self) -> float | None:
    seconds = self.seconds + (0.0 if self._since is None else time.perf_counter() - self._since)
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


def train_and_evaluate(config, workdir: str | os.PathLike, *,
                       max_steps: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) one run and evaluates it; returns the contents of metrics.json.

  Args:
    config: ConfigDict or dict (see the module docstring).
    workdir: run directory (checkpoints, logs, metrics.json).
    max_steps: stop this process after so many optimiser steps in total (a checkpoint is
      written first); the run continues from there when started again. None: run to the end.

  Raises:
    NonFiniteLossError: the loss became NaN/inf.
    ValueError: the workdir holds a run with a different config, or an unknown method.
  """
  config = _as_dict(config)
  method = methods.get(config["method"])
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  if config.get("distributed"):
    initialize_distributed(config)
  is_main = jax.process_index() == 0
  _main_first("config", lambda: _check_resume_config(workdir, config, write=is_main))
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
  state, meta = setup.state, {}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(setup.state)
  step = int(state.step)
  # The training labels in force and the epoch the current iterator starts at: a method that
  # relabels the data gets a new pipeline (same epoch length) from that epoch on.
  labels = meta.get("labels")
  iter_start = int(meta.get("iterator_start_epoch", 0))

  base_pipe = pipe

  def open_iterator(labels_, start_epoch):
    nonlocal pipe
    pipe = base_pipe if labels_ is None else pipeline_lib.make_train_pipeline(
        source, pipe_cfg, metadata=base_pipe.metadata, labels=labels_,
        steps_per_epoch=steps_per_epoch, store=base_pipe.store)
    return pipe.iterator(config["num_epochs"] - start_epoch, start_epoch=start_epoch)

  iterator = open_iterator(None if labels is None else np.asarray(labels, np.int64), iter_start)
  if meta.get("data_iterator") is not None:
    iterator.set_state(meta["data_iterator"])
  placement = steps(method.phase(setup, step // steps_per_epoch))
  dstate = placement.put_state(state)
  del state

  def save(force: bool = False):
    meta = {"step": step, "epoch": step // steps_per_epoch, "data_iterator": iterator.get_state(),
            "iterator_start_epoch": iter_start}
    if labels is not None:
      meta["labels"] = [int(x) for x in labels]
    ckpt.save(step, placement.get_state(dstate), meta, force=force)

  def check_finite(s: int, m) -> None:
    if not placement.get_metrics({"finite": m["finite"]})["finite"]:
      values = {k: v for k, v in placement.get_metrics(m).items() if k != "finite"}
      raise NonFiniteLossError(
          f"non-finite loss at step {s} (epoch {(s - 1) // steps_per_epoch}): {values}. The "
          f"step was not applied and nothing after it was saved; the last good checkpoint is "
          f"step {ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr, check the data, or "
          "use model.dtype='float32'.")

  writer = writers.MetricWriter(workdir, tensorboard=tc["tensorboard"]) if is_main else None
  bar = writers.progress(total_steps, step, disable=not (tc["progress"] and is_main))
  limit = total_steps if max_steps is None else min(total_steps, max_steps)
  t_start = time.perf_counter()
  timer = _Throughput()
  ran = set()  # phases whose step has run (compiled) in this process
  pending = None
  try:
    while step < limit:
      epoch = step // steps_per_epoch
      if on_epoch_start is not None and step % steps_per_epoch == 0:
        if pending is not None:
          check_finite(*pending)
          pending = None
        jax.block_until_ready(dstate)
        timer.pause()
        host_state, new_labels = on_epoch_start(setup, placement.get_state(dstate), epoch,
                                                _epoch_data(base_pipe, pipe, pipe_cfg))
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
        report = evaluation.evaluate(method, setup, placement.get_state(dstate), prepared,
                                     config, full=False)
        timer.resume()
        if writer:
          writer.write(step, evaluation.scalars(evaluation.summarize(report)), kind="eval",
                       epoch=epoch - 1)
    jax.block_until_ready(dstate)
    timer.pause()
    train_seconds = time.perf_counter() - t_start
    if step < total_steps:  # stopped early by max_steps: leave a checkpoint to resume from
      if ckpt.latest_step() != step:
        save(force=True)
      ckpt.wait()
      return {"stopped_at_step": step, "total_steps": total_steps}
    if ckpt.latest_step() != step:
      save(force=True)
    ckpt.wait()
  finally:
    bar.close()
    iterator.close()
    ckpt.close()
    if writer:
      writer.close()

  state = placement.get_state(dstate)
  t0 = time.perf_counter()
  report = evaluation.evaluate(method, setup, state, prepared, config, full=True,
                               out_dir=workdir / "eval" if is_main else None)
  eval_seconds = time.perf_counter() - t0
  result = {
      "summary": evaluation.summarize(report),
      "table": report.table,
      "protocol": report.record,
      "run": {
          "method": config["method"],
          "steps": total_steps, "epochs": config["num_epochs"],
          "steps_per_epoch": steps_per_epoch, "images_per_step": 2 * pairs,
          "train_seconds_this_process": round(train_seconds, 2),
          "train_images_per_s": None if timer.rate() is None else round(timer.rate(), 2),
          "eval_seconds": round(eval_seconds, 2), "parallel": mode, "devices": devices,
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


def _epoch_data(base: pipeline_lib.TrainPipeline, current: pipeline_lib.TrainPipeline,
                pipe_cfg) -> api.EpochData:
  """What `on_epoch_start` may read: dataset metadata, in-use mask, labels in force, images."""
  return api.EpochData(metadata=base.metadata, keep=base.keep,
                       labels=current.metadata["label"], images=base.store.__getitem__,
                       pipeline=pipe_cfg)
