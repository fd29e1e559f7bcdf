"""The training loop end to end on tiny synthetic data: outputs, resume, non-finite stop.

kill -9 in the middle of a checkpoint save, then resume, is tested in tests/reliability/.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.configs import maum as maum_configs
from maumjax.train import checkpoint as checkpoint_lib
from maumjax.train import evaluation
from maumjax.train import loop
from maumjax.train import writers



@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One synthetic dataset and TFDS build for the whole module (MAUMJAX_CACHE)."""
  path = tmp_path_factory.mktemp("maumjax_cache")
  old = os.environ.get("MAUMJAX_CACHE")
  os.environ["MAUMJAX_CACHE"] = str(path)
  yield path
  if old is None:
    os.environ.pop("MAUMJAX_CACHE")
  else:
    os.environ["MAUMJAX_CACHE"] = old


def _config(**train):
  config = maum_configs.get_config("smoke")
  # Epochs of 6 steps instead of the sampler's 43 (suite time): every check here needs two
  # epochs and a step boundary inside them, not the epoch's length.
  config.data.pipeline.steps_per_epoch = 6
  config.train.update(**train)
  return config


def _final_params(workdir):
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    meta = ckpt.read_meta()
    raw = ckpt.restore_arrays()
  return meta, jax.tree.map(np.asarray, raw["params"])


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = loop.train_and_evaluate(_config(), workdir)
  return workdir, result


def test_run_writes_checkpoints_logs_and_metrics(uninterrupted):
  workdir, result = uninterrupted
  saved = json.loads((workdir / "metrics.json").read_text())
  assert saved["summary"] == result["summary"]
  assert saved["units"] == saved["protocol"]["units"] == "percent"
  assert set(saved["summary"]) == {"all/single", "all/multi", "indoor/single", "indoor/multi"}
  for setting in saved["summary"].values():
    assert 0.0 <= setting["r1"] <= 100.0 and 0.0 < setting["mAP"] <= 100.0
  run = saved["run"]
  assert run["steps"] == run["epochs"] * run["steps_per_epoch"]
  train_rows = writers.read_log(workdir, "train")
  assert [r["step"] for r in train_rows] == list(range(1, run["steps"] + 1))  # log_every=1
  assert all(np.isfinite(r["loss"]) and r["images_per_s"] >= 0 for r in train_rows)
  # The cross-modality terms join at epoch 1 (uni_start_epoch=1) and are not computed before;
  # the logged total is the weighted sum of the logged terms (all weights 1 in the preset).
  uni = ("ir_to_rgb_parts", "rgb_to_ir_parts")
  for r in train_rows:
    assert all((k in r) == (r["epoch"] >= 1) for k in uni), r
    terms = ("ms_parts", "triplet") + (uni if r["epoch"] >= 1 else ())
    np.testing.assert_allclose(r["loss"], sum(r[k] for k in terms), rtol=1e-5)
  assert {r["epoch"] for r in train_rows} == {0, 1}
  assert writers.read_log(workdir, "final")
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "eval" / "eval_sysu_mm01.json").exists()
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    assert ckpt.latest_step() == run["steps"]
  assert json.loads((workdir / "config.json").read_text())["preset"] == "smoke"


def test_stop_and_resume_gives_the_same_parameters(uninterrupted, cache, tmp_path):
  ref_dir, ref = uninterrupted
  steps = ref["run"]["steps"]
  first = loop.train_and_evaluate(_config(), tmp_path, max_steps=steps // 2 + 1)
  assert first == {"stopped_at_step": steps // 2 + 1, "total_steps": steps}
  resumed = loop.train_and_evaluate(_config(), tmp_path)
  _, params = _final_params(tmp_path)
  _, ref_params = _final_params(ref_dir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, b)
  assert resumed["summary"] == ref["summary"]


def test_resume_with_a_different_config_is_refused(uninterrupted):
  workdir, _ = uninterrupted
  config = _config()
  config.loss.memory_size = 3
  with pytest.raises(ValueError, match="different config"):
    loop.train_and_evaluate(config, workdir)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cache, tmp_path):
  config = _config(checkpoint_every_steps=1)
  config.optim.lr = 1e30  # the first update makes the parameters overflow
  with pytest.raises(loop.NonFiniteLossError, match=r"non-finite step (\d+)") as err:
    loop.train_and_evaluate(config, tmp_path)
  bad_step = int(err.value.args[0].split("non-finite step ")[1].split()[0])
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    last = ckpt.latest_step()
  assert last == bad_step - 1 if bad_step > 1 else last is None
  if last is not None:
    _, params = _final_params(tmp_path)
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))
    assert f"checkpoint is step {last}" in str(err.value)


def test_evaluate_workdir_reproduces_the_final_metrics(uninterrupted):
  workdir, ref = uninterrupted
  result = evaluation.evaluate_workdir(workdir)
  assert result["summary"] == ref["summary"]
  assert Path(result["out_dir"], "metrics.json").exists()


def test_best_on_test_evaluates_the_state_of_the_best_quick_evaluation(cache, tmp_path,
                                                                       monkeypatch):
  """eval.select='best_on_test': the final protocol scores the best quick evaluation's state.

  The quick evaluations' Rank-1 is made to fall by 100 points per evaluation (after the real
  values are recorded), so the first one (after epoch 0) must be picked, not the final state.
  """
  real_summarize = evaluation.summarize
  seen = []

  def falling(report):
    out = real_summarize(report)
    if len(report.results[0].trials) == 1:  # a quick evaluation (the full one has 2 trials)
      seen.append(json.loads(json.dumps(out)))
      next(iter(out.values()))["r1"] -= 100.0 * len(seen)
    return out

  monkeypatch.setattr(evaluation, "summarize", falling)
  config = _config(eval_every_epochs=1)
  config.eval.select = "best_on_test"
  result = loop.train_and_evaluate(config, tmp_path)
  steps_per_epoch = result["run"]["steps_per_epoch"]
  assert len(seen) == 2  # after epoch 0, and the final state
  picked = result["run"]["selected"]
  assert (picked["rule"], picked["step"], picked["epoch"]) == ("best_on_test",
                                                               steps_per_epoch, 0)
  assert checkpoint_lib.saved_steps(tmp_path, "best") == [steps_per_epoch]
  # The full protocol's trial 0 of all/single is the quick evaluation's gallery: same state,
  # same Rank-1 as the real value recorded after epoch 0.
  record = json.loads((tmp_path / "eval" / "eval_sysu_mm01.json").read_text())
  trial0 = record["settings"][0]["trials"][0]
  assert record["settings"][0]["setting"] == "all/single"
  np.testing.assert_allclose(100 * trial0["r1"], seen[0]["all/single"]["r1"], atol=1e-6)
  evals = [r for r in writers.read_log(tmp_path) if r.get("kind") == "eval"]
  assert [r["step"] for r in evals] == [steps_per_epoch, 2 * steps_per_epoch]
  # Without quick evaluations there is nothing to select from: refused before training.
  config.train.eval_every_epochs = 0
  with pytest.raises(evaluation.EvalConfigError, match="eval_every_epochs=0"):
    loop.train_and_evaluate(config, tmp_path / "other")
  assert not (tmp_path / "other").exists()


def test_other_parallel_modes_train_the_same_run(cache, tmp_path):
  """The loop under pmap (4 devices) and on one device matches shard_map, step by step.

  Step 1 starts fresh in each mode; step 2 resumes the shard_map run's step-1 checkpoint in
  the other mode (batches from the restored iterator, state placed for that mode). Comparing
  each step from the same state keeps float32 rounding at its one-step size (it grows over
  steps at a CPU-dependent rate: 3e-6 after one step, 5e-5 after three on the 2-core CI VM,
  1.5e-2 after three on another machine). One shard_map reference serves both modes.
  """
  from tests.train.test_parallel import _assert_same

  ref_config = _config(checkpoint_every_steps=1, keep_checkpoints=3)
  loop.train_and_evaluate(ref_config, tmp_path / "shard_map", max_steps=2)
  for mode in ("pmap", "none"):
    config = _config()
    config.parallel = mode
    result = loop.train_and_evaluate(config, tmp_path / f"{mode}_1", max_steps=1)
    assert result == {"stopped_at_step": 1, "total_steps": result["total_steps"]}
    shutil.copytree(tmp_path / "shard_map", tmp_path / f"{mode}_2")
    shutil.rmtree(tmp_path / f"{mode}_2" / "checkpoints" / "2")
    loop.train_and_evaluate(config, tmp_path / f"{mode}_2", max_steps=2)
    for step in (1, 2):
      with checkpoint_lib.Checkpointer(tmp_path / "shard_map") as ckpt:
        ref = jax.tree.map(np.asarray, ckpt.restore_arrays(step)["params"])
      meta, params = _final_params(tmp_path / f"{mode}_{step}")
      assert meta["step"] == step
      _assert_same(params, ref, f"params after step {step} ({mode} vs shard_map)")
