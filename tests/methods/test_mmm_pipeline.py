"""MMM through `experiments.mmm`: one smoke run of every stage (finished stages are not rerun,
the final stage trains on the MMLM labels, diagnostics logged and drawn) and a stage-1 run that
does not change when the training identity labels are permuted (training never reads them).

The step and epoch-start pieces are tested in tests/methods/test_mmm.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments import mmm as mmm_cli
from maumjax.data import pipeline as pipeline_lib
from maumjax.errors import UserError
from tests.methods.test_mmm import _smoke

OFFLINE_TRAINED = ("stage1", "stage2", "final")


def _final_states(*run_dirs):
  """(arrays, meta) of the latest checkpoint of each run."""
  from maumjax.train import checkpoint as checkpoint_lib

  out = []
  for run_dir in run_dirs:
    with checkpoint_lib.Checkpointer(run_dir) as ckpt:
      out.append((ckpt.restore_arrays(), ckpt.read_meta()))
  return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """One run of every stage of the smoke preset: (workdir, results, cache dir)."""
  root = tmp_path_factory.mktemp("mmm")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MAUMJAX_CACHE", str(root / "cache"))
    results = mmm_cli.run_stages(_smoke(), root / "run")
  return root / "run", results, root / "cache"


def test_every_stage_runs_and_a_finished_stage_is_not_rerun(smoke_run, tmp_path, monkeypatch,
                                                             capsys):
  """`experiments.mmm` on the smoke preset: stage 1, stage 2, MMLM and the final stage, each
  evaluated; the final stage trains on the MMLM labels; the diagnostics are logged per
  clustering and drawn; started again, nothing is retrained; a stage without its inputs is
  refused with the missing file named."""
  work, results, cache = smoke_run
  monkeypatch.setenv("MAUMJAX_CACHE", str(cache))
  assert set(results) == {"stage1", "stage2", "mmlm", "final"}
  for stage in OFFLINE_TRAINED:
    assert (work / stage / "metrics.json").is_file()
    assert 0.0 <= results[stage]["summary"]["all/single"]["r1"] <= 100.0
  from maumjax.train import checkpoint as checkpoint_lib
  from maumjax.train import writers

  for stage in ("stage1", "stage2"):
    diag = writers.read_log(work / stage, "pseudo_labels")
    assert [r["epoch"] for r in diag] == [0, 1]  # re-clustered at every epoch start
    assert all(0 <= r["rgb_purity"] <= 1 and r["rgb_clusters"] >= 1 for r in diag)
  assert "correspondence" in writers.read_log(work / "stage2", "pseudo_labels")[0]
  mmlm_labels = np.load(work / "mmlm" / "labels.npz")["label"]
  assert mmlm_labels.max() + 1 == results["mmlm"]["num_classes"]
  with checkpoint_lib.Checkpointer(work / "final") as ckpt:
    meta = ckpt.read_meta()
  np.testing.assert_array_equal(np.asarray(meta["labels"]), mmlm_labels)
  gmm = writers.read_log(work / "final", "gmm")
  assert [r["epoch"] for r in gmm] == [1]  # every epoch after the warm-up
  assert (work / "diagnostics.png").stat().st_size > 0
  stamps = {s: (work / s / "metrics.json").stat().st_mtime_ns for s in OFFLINE_TRAINED}
  capsys.readouterr()
  again = mmm_cli.run_stages(_smoke(), work)
  out = capsys.readouterr().out
  assert out.count("not run again") == 4
  assert {s: (work / s / "metrics.json").stat().st_mtime_ns for s in OFFLINE_TRAINED} == stamps
  assert again["final"]["summary"] == results["final"]["summary"]
  config = _smoke()
  config["stages"] = "final"
  with pytest.raises(UserError, match="mmlm.json"):
    mmm_cli.run_stages(config, tmp_path / "other")


def test_training_never_reads_the_identity_labels(smoke_run, tmp_path, monkeypatch):
  """Stage 1 trained again with the training identities and labels permuted before the
  pipeline is built ends with the same parameters, memories, statistics and pseudo-labels as
  the smoke run's stage 1."""
  from maumjax.train import loop

  work, _, cache = smoke_run
  monkeypatch.setenv("MAUMJAX_CACHE", str(cache))
  config = mmm_cli.stage_config(_smoke(), "stage1", work)
  read = pipeline_lib.read_metadata

  def permuted(source, **kwargs):
    meta = read(source, **kwargs)
    out = dict(meta)
    for key in ("label", "identity"):
      values = np.unique(meta[key])
      perm = dict(zip(values.tolist(), np.random.default_rng(5).permutation(values).tolist()))
      out[key] = np.asarray([perm[v] for v in meta[key].tolist()], meta[key].dtype)
    assert not np.array_equal(out["identity"], meta["identity"])
    return out

  monkeypatch.setattr(pipeline_lib, "read_metadata", permuted)
  loop.train_and_evaluate(config, tmp_path / "permuted")
  (a, meta_a), (b, meta_b) = _final_states(work / "stage1", tmp_path / "permuted")
  assert meta_a["step"] == meta_b["step"] == config["num_epochs"] * 2
  for part in ("params", "method_state", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, a[part], b[part])
  np.testing.assert_array_equal(meta_a["labels"], meta_b["labels"])


def test_an_interrupted_stage_resumes_to_the_same_state(smoke_run, tmp_path, monkeypatch):
  """Stage 2 stopped mid-epoch (after a per-modality step, before its joint step) and started
  again ends bit for bit where the smoke run's uninterrupted stage 2 did: the two-column
  labels, the memories and the step parity come back from the checkpoint."""
  from maumjax.train import loop

  work, _, cache = smoke_run
  monkeypatch.setenv("MAUMJAX_CACHE", str(cache))
  config = mmm_cli.stage_config(_smoke(), "stage2", work)
  steps_per_epoch = config["data"]["pipeline"]["steps_per_epoch"]
  stop = steps_per_epoch + 1
  assert loop.train_and_evaluate(config, tmp_path / "run", max_steps=stop)["stopped_at_step"] \
      == stop
  loop.train_and_evaluate(config, tmp_path / "run")
  (a, meta_a), (b, meta_b) = _final_states(work / "stage2", tmp_path / "run")
  assert meta_a["step"] == meta_b["step"] == config["num_epochs"] * steps_per_epoch
  for part in ("params", "method_state", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, a[part], b[part])
  labels = np.asarray(meta_b["labels"])
  assert labels.ndim == 2 and labels.shape[1] == 2
  np.testing.assert_array_equal(np.asarray(meta_a["labels"]), labels)

