"""MMM as a method: stage 2's alternating per-modality / joint steps against a NumPy memory
update of independently computed features, the final stage's prototypes and GMM weights
against a brute-force aggregation, the labels stored by path, the stage list, one run of every
stage through `experiments.mmm` (finished stages are not rerun) and a run that does not
change when the training identity labels are permuted (training never reads them).

The clustering, the memories' update, ClusterNCE, MMLM and the SCA losses have their own tests
(tests/test_cluster.py, tests/test_cluster_memory.py, tests/losses/).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import mmm as mmm_cli
from experiments.configs import mmm as mmm_configs
from maumjax import cluster as cluster_lib
from maumjax.data import augment
from maumjax.data import pipeline as pipeline_lib
from maumjax.errors import UserError
from maumjax.methods import api
from maumjax.methods import mmm
from maumjax.train import step as step_lib

H, W, B = 32, 16, 8
MOMENTUM = 0.1


def _smoke() -> dict:
  config = mmm_configs.get_config("smoke")
  config.eval.update(trials=1, modes=("all",), shots=(1,))
  return json.loads(json.dumps(config.to_dict()))


def _stage_config(stage: str, workdir: Path = Path("/unused"), **mmm_fields) -> dict:
  config = mmm_cli.stage_config(_smoke(), stage, workdir, num_classes=5)
  config["mmm"].update(init_from="", **mmm_fields)
  config["data"]["pipeline"].update(augment_rgb="none", augment_ir="none")
  return config


def _setup(config: dict, num_records: int = 40) -> api.Setup:
  data = api.DataInfo(num_classes=5, image_shape=(H, W), steps_per_epoch=4,
                      classes_rgb=np.ones(5, bool), classes_ir=np.ones(5, bool),
                      num_records=num_records)
  return mmm.init(config, data, seed=0)


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _batch(rng: np.random.Generator, labels: dict[str, np.ndarray]) -> dict:
  cfg = augment.preset("none")
  out = {}
  for m, name in enumerate(("rgb", "ir")):
    out[name] = {"image": rng.integers(0, 256, (B, H, W, 3), dtype=np.uint8),
                 "aug": augment.draw_params_batch(rng, cfg, B, H, W),
                 "label": labels[name], "index": np.arange(B, dtype=np.int32) + m * B,
                 "modality": np.full(B, m, np.int32)}
  return out


def test_stage2_alternates_per_modality_and_joint_steps():
  """Even steps: ClusterNCE against the visible / infrared memories with column-0 labels, which
  alone change; odd steps: both modalities against the joint memory with column-1 labels,
  visible samples first. Each changed memory equals a sequential NumPy update with the step's
  features recomputed from the pre-step parameters."""
  config = _stage_config("stage2", max_clusters=12)
  setup = _setup(config)
  rng = np.random.default_rng(0)
  mem = {k: jnp.asarray(_unit(rng.normal(size=(12, setup.config.feature_dim)))
                        .astype(np.float32)) for k in mmm.MEMORIES}
  state = setup.state.replace(method_state=mem)
  labels = {n: np.stack([rng.integers(0, 6, B), rng.integers(6, 12, B)], 1).astype(np.int32)
            for n in ("rgb", "ir")}
  labels["rgb"][3, 0] = labels["rgb"][5, 0]  # a shared label: the update order matters
  batch = _batch(rng, labels)
  pipe = pipeline_lib.PipelineConfig(augment_rgb="none", augment_ir="none")
  parts = mmm.step_parts(setup, 0, api.StepContext())
  step = jax.jit(step_lib.make_train_step(parts, tx=setup.tx, pipeline=pipe,
                                          ctx=api.StepContext()))
  norm = augment.preset("none")
  for parity in (0, 1):
    before = state.replace(step=jnp.asarray(parity, jnp.int32))
    after, metrics = step(before, batch)
    assert float(metrics["finite"]) == 1.0
    # The step's features, recomputed: [view 1; view 2 (channel exchange)] and infrared.
    key = jax.random.fold_in(before.rng, before.step)
    v1 = augment.normalize_jax(jnp.asarray(batch["rgb"]["image"]), mean=norm.mean,
                               std=norm.std)
    v2 = mmm.exchange_view({"pixels": jnp.asarray(batch["rgb"]["image"]),
                            "aug": batch["rgb"]["aug"]}, key, norm)
    ir = augment.normalize_jax(jnp.asarray(batch["ir"]["image"]), mean=norm.mean, std=norm.std)
    out, _ = setup.model.apply({"params": before.params["model"],
                                "batch_stats": before.batch_stats},
                               jnp.concatenate([v1, v2]), ir, train=True,
                               mutable=["batch_stats"])
    bn = np.asarray(out["global"]["bn"][:, 0])
    f_rgb, f_ir = bn[:2 * B], bn[2 * B:]
    y_rgb = np.concatenate([labels["rgb"][:, parity]] * 2)
    y_ir = labels["ir"][:, parity]

    def numpy_update(m, feats, ys):
      m = np.array(m, np.float64)
      for x, y in zip(_unit(feats), ys):
        m[y] = _unit(MOMENTUM * m[y] + (1 - MOMENTUM) * x)
      return m

    old = {k: np.asarray(v) for k, v in mem.items()}
    new = {k: np.asarray(v) for k, v in after.method_state.items()}
    if parity == 0:
      expect = {"rgb": numpy_update(old["rgb"], f_rgb, y_rgb),
                "ir": numpy_update(old["ir"], f_ir, y_ir), "all": old["all"]}
    else:
      joint = numpy_update(numpy_update(old["all"], f_rgb, y_rgb), f_ir, y_ir)
      expect = {"rgb": old["rgb"], "ir": old["ir"], "all": joint}
    for k in mmm.MEMORIES:
      np.testing.assert_allclose(new[k], expect[k], atol=2e-5, err_msg=f"{k}, step {parity}")
    changed = {k for k in mmm.MEMORIES if not np.array_equal(new[k], old[k])}
    assert changed == ({"rgb", "ir"} if parity == 0 else {"all"})
    # The loss is ClusterNCE against the memories the step used, before its update.
    m_rgb, m_ir = (old["all"], old["all"]) if parity else (old["rgb"], old["ir"])

    def nce(f, y, m):
      logits = _unit(f) @ m.T / 0.05
      logits = logits - logits.max(1, keepdims=True)
      return np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y])

    np.testing.assert_allclose(float(metrics["nce_rgb"]), nce(f_rgb, y_rgb, m_rgb), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["nce_ir"]), nce(f_ir, y_ir, m_ir), rtol=1e-4)


def test_a_joint_step_on_four_devices_equals_one_device():
  """shard_map over 4 simulated devices vs 1: the same loss, parameters and memories after a
  joint (odd) step: the two visible views and the labels are gathered in the same order."""
  from maumjax.train import parallel
  from tests.train.test_parallel import _assert_same

  config = _stage_config("stage2", max_clusters=12)
  setup = _setup(config)
  rng = np.random.default_rng(3)
  mem = {k: jnp.asarray(_unit(rng.normal(size=(12, setup.config.feature_dim)))
                        .astype(np.float32)) for k in mmm.MEMORIES}
  state = setup.state.replace(method_state=mem, step=jnp.asarray(1, jnp.int32))
  labels = {n: np.stack([rng.integers(0, 6, B), rng.integers(6, 12, B)], 1).astype(np.int32)
            for n in ("rgb", "ir")}
  batch = _batch(rng, labels)
  pipe = pipeline_lib.PipelineConfig(augment_rgb="none", augment_ir="none")
  results = {}
  for mode, devices in (("none", 1), ("shard_map", 4)):
    ctx = api.StepContext(axis_name=None if devices == 1 else parallel.DATA_AXIS,
                          devices=devices)
    fn = step_lib.method_step(mmm, setup, 0, pipeline=pipe, ctx=ctx)
    compiled = parallel.CompiledStep(fn, mode)
    out, metrics = compiled(compiled.put_state(state), compiled.put_batch(batch))
    results[mode] = (compiled.get_state(out), compiled.get_metrics(metrics))
  (s1, m1), (s4, m4) = results["none"], results["shard_map"]
  for term in ("loss", "nce_rgb", "nce_ir"):
    np.testing.assert_allclose(m1[term], m4[term], rtol=1e-5, err_msg=term)
  _assert_same(jax.tree.map(np.asarray, s4.params), jax.tree.map(np.asarray, s1.params),
               "params (shard_map vs none)")
  for k in mmm.MEMORIES:
    np.testing.assert_allclose(np.asarray(s4.method_state[k]), np.asarray(s1.method_state[k]),
                               atol=2e-5, err_msg=k)
  assert not np.array_equal(np.asarray(s1.method_state["all"]), np.asarray(mem["all"]))


class _Images:
  def __init__(self, images):
    self.images = images

  def __call__(self, i):
    return self.images[i]


def test_final_epoch_start_builds_prototypes_and_gmm_weights(tmp_path):
  """At the start of an epoch after the first SCA epoch: prototypes = per-label sums of the
  weighted pre-BN features over the label's count (old prototype where a label is unseen),
  then the GMM weights of the per-sample CE (visible views together, infrared alone)."""
  rng = np.random.default_rng(1)
  n = 40
  modality = np.repeat([0, 1], n // 2)
  labels = np.concatenate([rng.integers(0, 4, n // 2), rng.integers(0, 4, n // 2)])
  labels[[0, 25]] = -1  # outliers: no weight change, no prototype contribution
  paths = np.asarray([f"p{i:03d}.png" for i in range(n)])
  order = rng.permutation(n)  # stored in another order: read back by path
  np.savez(tmp_path / "labels.npz", path=paths[order], label=labels[order])
  config = _stage_config("final", labels_file=str(tmp_path / "labels.npz"), num_classes=5,
                         warm_epochs=1, gmm_pass_mode="eval")
  config["data"]["pipeline"]["warm_epochs"] = 1
  setup = _setup(config, num_records=n)
  images = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
  meta = {"modality": modality, "label": np.zeros(n, np.int64), "identity": np.zeros(n),
          "camera": np.zeros(n)}
  data = api.EpochData(metadata=meta, keep=np.ones(n, bool), labels=labels,
                       images=_Images(images), pipeline=None, paths=lambda: paths)
  assert np.array_equal(mmm.load_labels(tmp_path / "labels.npz", paths=paths), labels)
  weights = rng.uniform(0.1, 1.0, (n, 3)).astype(np.float32)
  proto = rng.normal(size=(3, 5, setup.config.feature_dim)).astype(np.float32)
  state = setup.state.replace(method_state={"weights": jnp.asarray(weights),
                                            "proto": jnp.asarray(proto)})
  # The file's labels are in record order already here, so no relabelling is returned.
  got, new_labels = mmm.on_epoch_start(setup, state, 2, data)
  assert new_labels is None
  rgb = np.flatnonzero((modality == 0) & (labels >= 0))
  ir = np.flatnonzero((modality == 1) & (labels >= 0))
  rs = np.random.default_rng([2, 7])
  exchange = rs.integers(0, 3, size=len(rgb))
  outs = [mmm.extract(setup, state, data, rgb), mmm.extract(setup, state, data, rgb,
                                                             exchange=exchange),
          mmm.extract(setup, state, data, ir)]
  expect = proto.copy()
  for k, (idx, col) in enumerate(((rgb, 0), (rgb, 1), (ir, 2))):
    for c in range(5):
      members = [j for j, i in enumerate(idx) if labels[i] == c]
      if members:
        expect[k, c] = sum(weights[idx[j], col] * outs[k]["pre"][j] for j in members) / len(
            members)
  np.testing.assert_allclose(np.asarray(got.method_state["proto"]), expect, rtol=1e-5,
                             atol=1e-6)
  kernel = np.asarray(state.params["classifier"])
  ce = []
  for k, idx in enumerate((rgb, rgb, ir)):
    logits = outs[k]["bn"].astype(np.float64) @ kernel
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ce.append(lse - logits[np.arange(len(idx)), labels[idx]])
  w1, w2 = cluster_lib.clean_probability(ce[0], ce[1])
  (wi,) = cluster_lib.clean_probability(ce[2])
  new_w = np.asarray(got.method_state["weights"])
  np.testing.assert_allclose(new_w[rgb, 0], w1, atol=1e-4)
  np.testing.assert_allclose(new_w[rgb, 1], w2, atol=1e-4)
  np.testing.assert_allclose(new_w[ir, 2], wi, atol=1e-4)
  np.testing.assert_array_equal(new_w[[0, 25]], weights[[0, 25]])
  # The code's train-mode pass: every record gets one finite CE per view, the BN running
  # statistics move (and nothing else does), the weights follow the GMM of those CEs, and the
  # pass is a function of the epoch.
  train_setup = _setup(dict(config, mmm=dict(config["mmm"], gmm_pass_mode="train")),
                       num_records=n)
  c1, c2, ci, stats = mmm.train_mode_losses(train_setup, state, data, rgb, ir, labels, 2)
  assert c1.shape == c2.shape == (len(rgb),) and ci.shape == (len(ir),)
  assert all(np.all(np.isfinite(c)) and np.all(c >= 0) for c in (c1, c2, ci))
  assert not np.allclose(c1, ce[0], atol=1e-3)  # augmented, train-mode BN: not the eval CE
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), stats, state.batch_stats)
  assert any(jax.tree.leaves(moved))
  again = mmm.train_mode_losses(train_setup, state, data, rgb, ir, labels, 2)
  np.testing.assert_array_equal(again[0], c1)
  got_t, _ = mmm.on_epoch_start(train_setup, state, 2, data)
  w1, w2 = cluster_lib.clean_probability(c1, c2)
  np.testing.assert_allclose(np.asarray(got_t.method_state["weights"])[rgb, 0], w1, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, got_t.batch_stats, stats)
  jax.tree.map(np.testing.assert_array_equal, got_t.params, state.params)


def test_labels_are_read_by_path(tmp_path):
  np.savez(tmp_path / "l.npz", path=np.asarray(["b", "a", "c"]), label=np.asarray([1, 0, -1]))
  got = mmm.load_labels(tmp_path / "l.npz", paths=np.asarray(["a", "b", "c"]))
  np.testing.assert_array_equal(got, [0, 1, -1])
  with pytest.raises(ValueError, match="no label for 1 train records"):
    mmm.load_labels(tmp_path / "l.npz", paths=np.asarray(["a", "b", "d"]))
  with pytest.raises(FileNotFoundError, match="run the 'mmlm' stage first"):
    mmm.load_labels(tmp_path / "missing.npz")


def test_stage_lists_are_checked():
  assert mmm_cli.parse_stages("stage1, stage2") == ("stage1", "stage2")
  for bad in ("stage2,stage1", "stage3", "", "final,final"):
    with pytest.raises(UserError):
      mmm_cli.parse_stages(bad)
  assert mmm_configs.get_config("sysu_cmc").stages == "stage1,stage2"
  with pytest.raises(ValueError, match="mmm.labels_file"):
    mmm.MMMConfig(stage="final")


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
  for stage in mmm_cli.TRAINED:
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
  assert [r["epoch"] for r in gmm] == [1, 2]  # every epoch after the warm-up
  assert (work / "diagnostics.png").stat().st_size > 0
  stamps = {s: (work / s / "metrics.json").stat().st_mtime_ns for s in mmm_cli.TRAINED}
  capsys.readouterr()
  again = mmm_cli.run_stages(_smoke(), work)
  out = capsys.readouterr().out
  assert out.count("not run again") == 4
  assert {s: (work / s / "metrics.json").stat().st_mtime_ns for s in mmm_cli.TRAINED} == stamps
  assert again["final"]["summary"] == results["final"]["summary"]
  config = _smoke()
  config["stages"] = "final"
  with pytest.raises(UserError, match="mmlm.json"):
    mmm_cli.run_stages(config, tmp_path / "other")


def test_training_never_reads_the_identity_labels(smoke_run, tmp_path, monkeypatch):
  """Stage 1 trained again with the training identities and labels permuted before the
  pipeline is built ends with the same parameters, memories, statistics and pseudo-labels as
  the smoke run's stage 1."""
  from maumjax.train import checkpoint as checkpoint_lib
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
  runs = []
  for run_dir in (work / "stage1", tmp_path / "permuted"):
    with checkpoint_lib.Checkpointer(run_dir) as ckpt:
      runs.append((ckpt.restore_arrays(), ckpt.read_meta()))
  (a, meta_a), (b, meta_b) = runs
  assert meta_a["step"] == meta_b["step"] == config["num_epochs"] * 2
  for part in ("params", "method_state", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, a[part], b[part])
  np.testing.assert_array_equal(meta_a["labels"], meta_b["labels"])
