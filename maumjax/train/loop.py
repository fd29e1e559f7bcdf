"""The training loop: data, compiled step, checkpoints, logs and evaluation of one run.

    final = loop.train_and_evaluate(config, workdir)

`config` is the plain-dict form of an experiments config (sections data, model, loss, optim,
train, eval; see experiments/configs/maum.py). The workdir receives:

* `config.json`: the resolved config (a restart checks it matches);
* `checkpoints/<step>/`: Orbax checkpoints (train state, data-iterator state, epoch);
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

from maumjax.data import pipeline as pipeline_lib
from maumjax.data import summary
from maumjax.methods import maum as maum_method
from maumjax.train import checkpoint as checkpoint_lib
from maumjax.train import evaluation
from maumjax.train import optim
from maumjax.train import parallel
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


def prepare(config: dict[str, Any]):
  """Prepares the dataset and the training pipeline of a config."""
  prepared = summary.prepare_from_dict(config["data"])
  source = pipeline_lib.open_train_source(prepared.builder)
  pipe_cfg = pipeline_lib.PipelineConfig(**config["data"]["pipeline"])
  return prepared, pipe_cfg, pipeline_lib.make_train_pipeline(source, pipe_cfg)


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
    ValueError: the workdir holds a run with a different config.
  """
  config = _as_dict(config)
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  if config.get("distributed"):
    initialize_distributed(config)
  is_main = jax.process_index() == 0
  _main_first("config", lambda: _check_resume_config(workdir, config, write=is_main))
  tc = config["train"]
  prepared, pipe_cfg, pipe = _main_first("data", lambda: prepare(config))
  steps_per_epoch = pipe.steps_per_epoch
  num_classes = int(pipe.metadata["label"][pipe.keep].max()) + 1
  setup = maum_method.init(config, num_classes=num_classes,
                           image_shape=(config["data"]["height"], config["data"]["width"]),
                           steps_per_epoch=steps_per_epoch, seed=config["seed"])
  mode = parallel.check_mode(config["parallel"])
  devices = parallel.device_count(mode)
  step_fn = maum_method.make_train_step(
      setup, steps_per_epoch=steps_per_epoch, pipeline=pipe_cfg,
      axis_name=None if mode == "none" else parallel.DATA_AXIS, devices=devices,
      sync_bn=config["model"]["sync_bn"])
  compiled = parallel.CompiledStep(step_fn, mode)
  total_steps = config["num_epochs"] * steps_per_epoch
  pairs = pipe.local_batch * jax.process_count()

  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=tc["keep_checkpoints"])
  state, iter_state = setup.state, None
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(setup.state)
    iter_state = meta["data_iterator"]
  step = int(state.step)
  iterator = pipe.iterator(config["num_epochs"])
  if iter_state is not None:
    iterator.set_state(iter_state)
  dstate = compiled.put_state(state)
  del state

  def save(force: bool = False):
    meta = {"step": step, "epoch": step // steps_per_epoch, "data_iterator": iterator.get_state()}
    ckpt.save(step, compiled.get_state(dstate), meta, force=force)

  def check_finite(s: int, m) -> None:
    if not compiled.get_metrics({"finite": m["finite"]})["finite"]:
      values = {k: v for k, v in compiled.get_metrics(m).items() if k != "finite"}
      raise NonFiniteLossError(
          f"non-finite loss at step {s} (epoch {(s - 1) // steps_per_epoch}): {values}. The "
          f"step was not applied and nothing after it was saved; the last good checkpoint is "
          f"step {ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr, check the data, or "
          "use model.dtype='float32'.")

  writer = writers.MetricWriter(workdir, tensorboard=tc["tensorboard"]) if is_main else None
  bar = writers.progress(total_steps, step, disable=not (tc["progress"] and is_main))
  limit = total_steps if max_steps is None else min(total_steps, max_steps)
  t_start, images, t_mark, images_mark = time.perf_counter(), 0, None, 0
  pending = None
  try:
    while step < limit:
      batch = next(iterator)
      dstate, metrics = compiled(dstate, compiled.put_batch({"rgb": batch["rgb"],
                                                             "ir": batch["ir"]}))
      step += 1
      images += 2 * pairs
      if t_mark is None:  # the first step includes compilation; time from its end
        jax.block_until_ready(metrics)
        t_mark, images_mark = time.perf_counter(), images
      # Finiteness is checked one step late, so the host never waits on the step it just
      # dispatched; before a checkpoint, an evaluation or the end it is checked at once.
      if pending is not None:
        check_finite(*pending)
      pending = (step, metrics)
      epoch_end = step % steps_per_epoch == 0
      if step % tc["log_every"] == 0 or epoch_end or step == limit:
        values = compiled.get_metrics(metrics)
        now = time.perf_counter()
        rate = (images - images_mark) / max(now - t_mark, 1e-9) if images > images_mark else 0.0
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
        report = evaluation.evaluate(setup, compiled.get_state(dstate), prepared, config,
                                     full=False)
        if writer:
          writer.write(step, evaluation.scalars(evaluation.summarize(report)), kind="eval",
                       epoch=epoch - 1)
    jax.block_until_ready(dstate)
    t_end = time.perf_counter()
    train_seconds = t_end - t_start
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

  state = compiled.get_state(dstate)
  t0 = time.perf_counter()
  report = evaluation.evaluate(setup, state, prepared, config, full=True,
                    out_dir=workdir / "eval" if is_main else None)
  eval_seconds = time.perf_counter() - t0
  result = {
      "summary": evaluation.summarize(report),
      "table": report.table,
      "protocol": report.record,
      "run": {
          "steps": total_steps, "epochs": config["num_epochs"],
          "steps_per_epoch": steps_per_epoch, "images_per_step": 2 * pairs,
          "train_seconds_this_process": round(train_seconds, 2),
          "train_images_per_s": round((images - images_mark) / max(t_end - t_mark, 1e-9), 2)
                                if t_mark and images > images_mark else None,
          "eval_seconds": round(eval_seconds, 2), "parallel": mode, "devices": devices,
          "num_classes": num_classes, "dataset": prepared.name,
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
