"""MMM's paper pipeline (`mmm.pipeline='paper_online'`) through `experiments.mmm`: one online
stage on the smoke data (its own file, so it runs beside the offline pipeline's tests).

The online step and epoch start are tested in tests/methods/test_mmm.py.
"""

from __future__ import annotations

import numpy as np

from experiments import mmm as mmm_cli
from tests.methods.test_mmm import _smoke
from tests.methods.test_mmm_pipeline import _final_states


def test_the_paper_pipeline_trains_one_online_stage(tmp_path, monkeypatch):
  """`pipeline='paper_online'` (preset smoke_paper): one stage, re-clustered and matched at
  every epoch start, evaluated; the sampler's labels are the infrared clusters and the visible
  clusters moved into their label space, as the per-record ids in the state say; the joint
  memory holds one row per joint cluster."""
  from maumjax.train import writers

  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path / "cache"))
  config = _smoke("smoke_paper")
  assert config["stages"] == "online" and config["mmm"]["pipeline"] == "paper_online"
  results = mmm_cli.run_stages(config, tmp_path / "run")
  assert set(results) == {"online"}
  assert 0.0 <= results["online"]["summary"]["all/single"]["r1"] <= 100.0
  diag = writers.read_log(tmp_path / "run" / "online", "pseudo_labels")
  assert [r["epoch"] for r in diag] == [0, 1]
  assert all(r["matched_classes"] >= 1 and 0 <= r["correspondence"] <= 1 for r in diag)
  assert [r["epoch"] for r in writers.read_log(tmp_path / "run" / "online", "gmm")] == [0, 1]
  ((arrays, meta),) = _final_states(tmp_path / "run" / "online")
  labels = np.asarray(meta["labels"])
  ids = np.asarray(arrays["method_state"]["ids"])
  from maumjax.train import inputs

  pipe = inputs.prepare(mmm_cli.stage_config(config, "online", tmp_path / "run"))[2]
  modality = np.asarray(pipe.metadata["modality"])
  ir = modality == 1
  np.testing.assert_array_equal(labels[ir], ids[ir, 0])  # infrared labels: their clusters
  assert labels[~ir].max() <= ids[ir, 0].max()  # visible labels: in the infrared label space
  np.testing.assert_array_equal(labels[~ir] >= 0, ids[~ir, 0] >= 0)
  joint = np.asarray(arrays["method_state"]["all"])
  assert np.count_nonzero(np.any(joint != 0, axis=1)) == ids[:, 1].max() + 1
