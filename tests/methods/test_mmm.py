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
