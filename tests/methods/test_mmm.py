"""MMM as a method: stage 2's alternating per-modality / joint steps against a NumPy memory
update of independently computed features (and on 4 devices), the final stage's prototypes
and GMM weights against a brute-force aggregation, the labels stored by path, the stage list.
The whole pipeline through `experiments.mmm` is tests/methods/test_mmm_pipeline.py.

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


def _smoke(preset: str = "smoke") -> dict:
  config = mmm_configs.get_config(preset)
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


def _step_features(setup: api.Setup, before, batch) -> dict[str, np.ndarray]:
  """The train step's global outputs {'bn', 'pre'} [3B, D] ([view 1; view 2 (channel
  exchange); infrared]), recomputed from the pre-step parameters."""
  norm = augment.preset("none")
  key = jax.random.fold_in(before.rng, before.step)
  v1 = augment.normalize_jax(jnp.asarray(batch["rgb"]["image"]), mean=norm.mean, std=norm.std)
  v2 = mmm.exchange_view({"pixels": jnp.asarray(batch["rgb"]["image"]),
                          "aug": batch["rgb"]["aug"]}, key, norm)
  ir = augment.normalize_jax(jnp.asarray(batch["ir"]["image"]), mean=norm.mean, std=norm.std)
  out, _ = setup.model.apply({"params": before.params["model"],
                              "batch_stats": before.batch_stats},
                             jnp.concatenate([v1, v2]), ir, train=True, mutable=["batch_stats"])
  return {k: np.asarray(v[:, 0], np.float64) for k, v in out["global"].items()}


def numpy_update(m, feats, ys):
  """The sequential memory update, sample by sample in batch order (-1 skipped)."""
  m = np.array(m, np.float64)
  for x, y in zip(_unit(feats), ys):
    if y >= 0:
      m[y] = _unit(MOMENTUM * m[y] + (1 - MOMENTUM) * x)
  return m


def nce(f, y, m):
  """ClusterNCE over the rows with a label >= 0 (all memory rows non-zero here)."""
  f, y = f[y >= 0], y[y >= 0]
  logits = _unit(f) @ m.T / 0.05
  logits = logits - logits.max(1, keepdims=True)
  return np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y])


def test_stage2_alternates_per_modality_and_joint_steps():
  """Even steps: ClusterNCE against the visible / infrared memories with column-0 labels, which
  alone change; odd steps: both modalities against the joint memory with column-1 labels,
  visible samples first. Each changed memory equals a sequential NumPy update with the step's
  features recomputed from the pre-step parameters; the joint step on 4 devices equals it."""
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
  for parity in (0, 1):
    before = state.replace(step=jnp.asarray(parity, jnp.int32))
    after, metrics = step(before, batch)
    assert float(metrics["finite"]) == 1.0
    # The step's features, recomputed: [view 1; view 2 (channel exchange)] and infrared.
    bn = _step_features(setup, before, batch)["bn"]
    f_rgb, f_ir = bn[:2 * B], bn[2 * B:]
    y_rgb = np.concatenate([labels["rgb"][:, parity]] * 2)
    y_ir = labels["ir"][:, parity]

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

    np.testing.assert_allclose(float(metrics["nce_rgb"]), nce(f_rgb, y_rgb, m_rgb), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["nce_ir"]), nce(f_ir, y_ir, m_ir), rtol=1e-4)
  # The joint step on 4 devices (shard_map) equals one device: the two visible views and the
  # labels are gathered in the same order, and the views draw the same channels.
  from maumjax.train import parallel
  from tests.train.test_parallel import _assert_same

  ctx = api.StepContext(axis_name=parallel.DATA_AXIS, devices=4)
  compiled = parallel.CompiledStep(step_lib.method_step(mmm, setup, 0, pipeline=pipe, ctx=ctx),
                                   "shard_map")
  out4, metrics4 = compiled(compiled.put_state(before), compiled.put_batch(batch))
  out4, metrics4 = compiled.get_state(out4), compiled.get_metrics(metrics4)
  for term in ("loss", "nce_rgb", "nce_ir"):
    np.testing.assert_allclose(metrics4[term], float(metrics[term]), rtol=1e-5, err_msg=term)
  _assert_same(jax.tree.map(np.asarray, out4.params), jax.tree.map(np.asarray, after.params),
               "params (shard_map vs one device)")
  for k in mmm.MEMORIES:
    np.testing.assert_allclose(np.asarray(out4.method_state[k]), new[k], atol=2e-5, err_msg=k)


def test_online_step_is_cmc_plus_sca_with_the_per_record_cluster_ids():
  """The paper pipeline's step: ClusterNCE of each record against the visible / infrared
  memories by its per-modality cluster id and against the joint memory by its joint id (joint
  outliers left out), squared-L2 Intra to the prototypes of the sampled matched labels and
  Inter; afterwards the three memories move sample by sample (joint: visible first)."""
  config = _stage_config("online", pipeline="paper_online", max_clusters=12, intra_form="l2sq",
                         inter_norm="paper", intra_start=0, inter_start=0, use_triplet=False)
  setup = _setup(config, num_records=2 * B)
  rng = np.random.default_rng(3)
  dim = setup.config.feature_dim
  unit_rows = lambda: jnp.asarray(_unit(rng.normal(size=(12, dim))).astype(np.float32))  # noqa
  ids = np.stack([rng.integers(0, 6, 2 * B), rng.integers(0, 12, 2 * B)], 1).astype(np.int32)
  ids[[2, 11], 1] = -1  # joint outliers
  ids[5, 0] = ids[7, 0]  # a shared visible cluster: the update order matters
  proto = rng.normal(size=(3, 12, dim)).astype(np.float32)
  mem = {"rgb": unit_rows(), "ir": unit_rows(), "all": unit_rows(), "ids": jnp.asarray(ids),
         "weights": jnp.ones((2 * B, 3), jnp.float32), "proto": jnp.asarray(proto)}
  before = setup.state.replace(method_state=mem)
  matched = np.repeat(np.arange(4), 2).astype(np.int32) + 3  # identity-major, P = 4, K = 2
  batch = _batch(rng, {"rgb": matched, "ir": matched})  # records 0..7 visible, 8..15 infrared
  assert mmm.phase(setup, 0) == 7
  pipe = pipeline_lib.PipelineConfig(augment_rgb="none", augment_ir="none")
  step = jax.jit(step_lib.make_train_step(mmm.step_parts(setup, 7, api.StepContext()),
                                          tx=setup.tx, pipeline=pipe, ctx=api.StepContext()))
  after, metrics = step(before, batch)
  out = _step_features(setup, before, batch)
  bn, pre = out["bn"], out["pre"]
  f_rgb, f_ir = bn[:2 * B], bn[2 * B:]
  id_rgb, id_ir = np.concatenate([ids[:B]] * 2), ids[B:]
  old = {k: np.asarray(mem[k]) for k in mmm.MEMORIES}
  expect = {"nce_rgb": nce(f_rgb, id_rgb[:, 0], old["rgb"]),
            "nce_ir": nce(f_ir, id_ir[:, 0], old["ir"]),
            "cmc_rgb": nce(f_rgb, id_rgb[:, 1], old["all"]),
            "cmc_ir": nce(f_ir, id_ir[:, 1], old["all"])}
  l2 = lambda x, p: np.mean(np.sum((x - p[matched]) ** 2, axis=1))  # noqa: E731
  expect["intra"] = (0.5 * (l2(pre[:B], proto[0]) + l2(pre[B:2 * B], proto[1]))
                     + l2(pre[2 * B:], proto[2]))
  for term, value in expect.items():
    np.testing.assert_allclose(float(metrics[term]), value, rtol=2e-4, err_msg=term)
  inter = mmm.losses.inter_modality_mmd([pre[:B], pre[B:2 * B]], pre[2 * B:], num_ids=4,
                                        norm="paper")
  np.testing.assert_allclose(float(metrics["inter"]), float(inter), rtol=1e-3)
  assert "tri" not in metrics  # the paper preset has no triplet
  total = sum(float(metrics[k]) for k in ("nce_rgb", "nce_ir", "cmc_rgb", "cmc_ir"))
  total += 0.5 * float(metrics["intra"]) + 0.05 * float(metrics["inter"])
  np.testing.assert_allclose(float(metrics["loss"]), total, rtol=1e-5)
  new = {k: np.asarray(after.method_state[k]) for k in mmm.MEMORIES}
  want = {"rgb": numpy_update(old["rgb"], f_rgb, id_rgb[:, 0]),
          "ir": numpy_update(old["ir"], f_ir, id_ir[:, 0]),
          "all": numpy_update(numpy_update(old["all"], f_rgb, id_rgb[:, 1]), f_ir, id_ir[:, 1])}
  for k in mmm.MEMORIES:
    np.testing.assert_allclose(new[k], want[k], atol=2e-5, err_msg=k)
  np.testing.assert_array_equal(np.asarray(after.method_state["ids"]), ids)


def test_online_epoch_start_clusters_matches_and_weights(monkeypatch):
  """The paper pipeline's epoch start, on features made to cluster by identity (the network's
  extraction replaced): the sampler's labels are the per-modality clusters with the visible
  ones moved to their Hungarian-matched infrared cluster (every identity one label across both
  modalities), the per-record ids hold the per-modality and joint clusters, the memories their
  means, the weights the GMM of each sample's ClusterNCE at its matched label against the
  infrared memory (brute force), and the prototypes the weighted per-label means."""
  ids_per, per_id = 4, 6
  n = 2 * ids_per * per_id
  rng = np.random.default_rng(5)
  config = _stage_config("online", pipeline="paper_online", max_clusters=12, intra_start=0,
                         k1=6, k2=3, joint_k1=12, joint_k2=6, eps=0.5, min_samples=2)
  config["mmm"].update(matching="hungarian", cost_sum_over="visible")
  setup = _setup(config, num_records=n)
  dim = setup.config.feature_dim
  identity = np.tile(np.repeat(np.arange(ids_per), per_id), 2)
  modality = np.repeat([0, 1], n // 2)
  centres = _unit(rng.normal(size=(ids_per, dim)))
  gap = np.where(modality[:, None] == 1, _unit(rng.normal(size=(1, dim))), 0.0)  # modality gap
  spread = rng.uniform(0.2, 1.0, (n, 1)) / np.sqrt(dim)  # per-sample: the losses differ
  noisy = lambda: _unit(centres[identity] + 0.5 * gap  # noqa: E731
                        + spread * rng.normal(size=(n, dim)))
  table = {"bn": noisy(), "flip_bn": noisy(), "pre": rng.normal(size=(n, dim)),
           "bn2": noisy(), "pre2": rng.normal(size=(n, dim))}
  calls = []

  def fake_extract(setup_, state_, data_, indices, *, flip=False, exchange=None):
    calls.append(exchange is not None)
    if exchange is None:
      out = {"pre": table["pre"][indices], "bn": table["bn"][indices]}
      if flip:
        out["flip_bn"] = table["flip_bn"][indices]
      return out
    return {"pre": table["pre2"][indices], "bn": table["bn2"][indices]}

  monkeypatch.setattr(mmm, "extract", fake_extract)
  meta = {"modality": modality, "label": np.zeros(n, np.int64), "identity": identity,
          "camera": np.zeros(n)}
  logged = []
  data = api.EpochData(metadata=meta, keep=np.ones(n, bool), labels=np.zeros(n), images=None,
                       pipeline=None, log=lambda v, kind: logged.append((kind, v)))
  got, labels = mmm.on_epoch_start(setup, setup.state, 0, data)
  assert calls == [False, True]  # one flipped pass over all records, one exchanged view
  for c in range(ids_per):  # one label per identity, shared by both modalities
    assert len(np.unique(labels[identity == c])) == 1
  assert len(np.unique(labels)) == ids_per and labels.min() >= 0
  ms = got.method_state
  feats = ((table["bn"] + table["flip_bn"]) / 2).astype(np.float32)  # unit rows already
  is_ir = modality == 1
  lab_rgb, lab_ir = mmm.cluster_modalities(feats, is_ir, setup.config.mmm)
  np.testing.assert_array_equal(labels[is_ir], lab_ir)
  np.testing.assert_array_equal(np.asarray(ms["ids"])[:, 0], np.concatenate([lab_rgb, lab_ir]))
  joint = np.asarray(ms["ids"])[:, 1]
  for c in range(ids_per):  # the joint clustering holds each identity's both modalities
    assert len(np.unique(joint[identity == c])) == 1
  for name, f, y in (("rgb", feats[~is_ir], lab_rgb), ("ir", feats[is_ir], lab_ir),
                     ("all", feats, joint)):
    for c in range(y.max() + 1):
      np.testing.assert_allclose(np.asarray(ms[name])[c], _unit(f[y == c].mean(0, keepdims=True))
                                 [0], atol=1e-5, err_msg=name)
  m_ir = np.asarray(ms["ir"])[:lab_ir.max() + 1]
  rgb, ir = np.flatnonzero(~is_ir), np.flatnonzero(is_ir)
  losses_ = [np.array([nce(table[k][i][None], labels[i][None], m_ir) for i in idx])
             for k, idx in (("bn", rgb), ("bn2", rgb), ("bn", ir))]
  w1, w2 = cluster_lib.clean_probability(losses_[0], losses_[1])
  (wi,) = cluster_lib.clean_probability(losses_[2])
  w = np.asarray(ms["weights"])
  np.testing.assert_allclose(w[rgb, 0], w1, atol=1e-4)
  np.testing.assert_allclose(w[rgb, 1], w2, atol=1e-4)
  np.testing.assert_allclose(w[ir, 2], wi, atol=1e-4)
  proto = np.asarray(ms["proto"])
  for k, (idx, pre, col) in enumerate(((rgb, "pre", 0), (rgb, "pre2", 1), (ir, "pre", 2))):
    for c in range(12):
      members = idx[labels[idx] == c]
      want = (sum(w[i, col] * table[pre][i] for i in members) / len(members) if len(members)
              else np.zeros(dim))
      np.testing.assert_allclose(proto[k, c], want, atol=1e-5, err_msg=f"stream {k}, {c}")
  diag = [v for kind, v in logged if kind == "pseudo_labels"][0]
  assert diag["correspondence"] == 1.0 and diag["joint_ari"] == 1.0
  assert diag["matched_classes"] == ids_per


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
  with pytest.raises(UserError, match="stage of its"):
    mmm_cli.parse_stages("stage1,online")
  with pytest.raises(UserError, match="paper_online"):
    mmm_cli.check_pipeline(_smoke(), ("online",))
  paper = mmm_configs.get_config("sysu_paper")
  mmm_cli.check_pipeline(paper, mmm_cli.parse_stages(paper.stages))
  with pytest.raises(ValueError, match="only stage"):
    mmm.MMMConfig(stage="stage1", pipeline="paper_online")
  with pytest.raises(ValueError, match="mmm.labels_file"):
    mmm.MMMConfig(stage="final")


def test_the_final_stage_draws_every_class_when_mmlm_leaves_fewer_than_p():
  """An infrared clustering that collapsed (seen with a quarter of the infrared data) leaves
  MMLM fewer classes than P; the identity sampler would refuse them, so P becomes that count."""
  config = _smoke()
  p = config["final"]["pipeline"]["num_identities"]
  assert p == 4
  final = mmm_cli.stage_config(config, "final", Path("/unused"), num_classes=3)
  assert final["data"]["pipeline"]["num_identities"] == 3
  assert final["mmm"]["num_classes"] == 3
  for classes in (4, 50):  # enough classes: P as configured
    final = mmm_cli.stage_config(config, "final", Path("/unused"), num_classes=classes)
    assert final["data"]["pipeline"]["num_identities"] == p
  from maumjax.data import sampler as sampler_lib

  labels = np.repeat(np.arange(3), 8)
  modality = np.tile(np.repeat([0, 1], 4), 3)
  with pytest.raises(ValueError, match="exceeds the 3 training identities"):
    sampler_lib.IdentitySampler(labels, modality, num_identities=p, num_instances=2)
  sampler_lib.IdentitySampler(labels, modality, num_identities=3, num_instances=2)


def test_stage2_can_start_from_stage1s_best_on_test_pick(tmp_path):
  """eval.select='best_on_test' (mmm.md §9 row 17): 'best' is the test mAP in stages 1-2 and
  Rank-1 in the final stage, and stage 2 starts from stage 1's <run>/best pick, not its latest
  checkpoint."""
  from maumjax.train import checkpoint as checkpoint_lib
  from maumjax.train import loop

  config = _smoke()
  config["eval"]["select"] = "best_on_test"
  s2 = mmm_cli.stage_config(config, "stage2", tmp_path)
  assert s2["mmm"]["init_best"] and s2["mmm"]["init_from"] == str(tmp_path / "stage1")
  assert s2["eval"]["select_metric"] == "mAP"
  assert mmm_cli.stage_config(config, "final", tmp_path)["eval"]["select_metric"] == "r1"
  assert not mmm_cli.stage_config(_smoke(), "stage2", tmp_path)["mmm"]["init_best"]

  class Saved:
    def save(self, step, state, meta, force):
      self.step = step

  saved, best = Saved(), None
  for step, (r1, m_ap) in enumerate(((10.0, 30.0), (20.0, 25.0), (15.0, 31.0)), start=1):
    summary = {"all/single": {"r1": r1, "mAP": m_ap}}
    best = loop._keep_best(saved, best, summary, step, step, None, metric="mAP")  # noqa: SLF001
  assert best["step"] == saved.step == 3  # the highest mAP, though not the highest R1
  # restore_variables: the latest checkpoint, or the best/ pick.
  import optax

  from maumjax.train import state as state_lib

  state = state_lib.TrainState.create(params={"model": {"w": jnp.zeros(3)}},
                                      batch_stats={"mean": jnp.ones(2)}, tx=optax.sgd(0.1),
                                      method_state={}, seed=0)
  other = jax.tree.map(lambda x: x + 1.0, state.params)
  for subdir, params in (("checkpoints", state.params), (checkpoint_lib.BEST_SUBDIR, other)):
    with checkpoint_lib.Checkpointer(tmp_path / "stage1", subdir=subdir) as ckpt:
      ckpt.save(4, state.replace(params=params), {"step": 4}, force=True)
  for best_, want in ((False, state.params), (True, other)):
    got, _ = mmm.restore_variables(tmp_path / "stage1", state, best=best_)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(FileNotFoundError, match="best/"):
    mmm.restore_variables(tmp_path / "nothing", state, best=True)
