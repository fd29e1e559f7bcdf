"""MPANet as a method: the mean classifiers' EMA, the cross-modal teachers, the terms of each
ablation row, the loss normalisations, and one step equal on 4 devices and on 1.

The loss functions and the model have their own tests (tests/losses/test_center.py,
test_distill.py, test_pattern.py, tests/models/test_mpanet.py); here they are composed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import mpanet as mpanet_configs
from maumjax import losses
from maumjax.methods import api
from maumjax.methods import mpanet
from maumjax.models import mpanet as mpanet_model
from maumjax.train import parallel
from maumjax.train import step as step_lib

NUM_CLASSES, P, K, H, W = 6, 4, 2, 32, 16  # 32 x 16: a step compiles in seconds


def _config(row: str = "mpanet", **loss):
  config = mpanet_configs.get_config("smoke").to_dict()
  row_cfg = mpanet_configs.ROWS[row]
  config["loss"].update(row_cfg["loss"], **loss)
  config["model"].update(row_cfg["model"])
  return config


def _setup(config, seed=0, shape=(H, W)):
  data = api.DataInfo(num_classes=NUM_CLASSES, image_shape=shape, steps_per_epoch=5,
                      classes_rgb=np.ones(NUM_CLASSES, bool), classes_ir=np.ones(NUM_CLASSES, bool))
  return mpanet.init(config, data, seed=seed)


def _batch(seed=0, devices=1, shape=(H, W)):
  rng = np.random.default_rng(seed)
  labels = np.repeat(rng.choice(NUM_CLASSES, P, replace=False), K).astype(np.int32)
  def part():
    return {"image": rng.normal(size=(P * K, *shape, 3)).astype(np.float32), "label": labels}
  return {"rgb": part(), "ir": part()}


def _ctx(devices=1):
  return api.StepContext(axis_name=None if devices == 1 else parallel.DATA_AXIS, devices=devices,
                         sync_bn=True)


def test_ema_rate_schedules():
  code = mpanet.LossConfig()
  np.testing.assert_allclose(mpanet.ema_rate(code, 0), 0.2)
  np.testing.assert_allclose(mpanet.ema_rate(code, 98), 0.2)  # 1-based epoch 99: 100/100
  np.testing.assert_allclose(mpanet.ema_rate(code, 139), 0.2 * 100 / 141, rtol=1e-6)
  fixed = mpanet.LossConfig(ema_schedule="fixed")
  np.testing.assert_allclose(mpanet.ema_rate(fixed, 139), 0.2)


def _loss_and_parts(setup, ctx=None):
  parts = mpanet.step_parts(setup, 0, ctx or _ctx())
  return parts


def test_means_move_before_the_loss_from_the_pre_update_students():
  setup = _setup(_config())
  state = setup.state
  # Make the students differ from the means, so the update is visible.
  params = jax.tree.map(lambda x: x, state.params)
  kv = mpanet_model.CLASSIFIERS["visible"]
  kr = mpanet_model.CLASSIFIERS["infrared"]
  params["model"][kv]["kernel"] = params["model"][kv]["kernel"] + 1.0
  params["model"][kr]["kernel"] = params["model"][kr]["kernel"] - 2.0
  state = state.replace(params=params, step=jnp.asarray(5 * 120, jnp.int32))  # epoch 120
  parts = _loss_and_parts(setup)
  means = parts.before(state)
  rate = 0.2 * 100 / 122
  for which, name in (("visible", kv), ("infrared", kr)):
    expected = ((1 - rate) * np.asarray(setup.state.method_state[which])
                + rate * np.asarray(params["model"][name]["kernel"]))
    np.testing.assert_allclose(means[which], expected, rtol=1e-6, atol=1e-6)
  # Through the whole step: the saved means are those of `before`, from the students as they
  # were before this step's optimiser update (a write from the updated students would differ).
  pipe = mpanet_configs.get_config("smoke").data.pipeline.to_dict()
  from maumjax.data import pipeline as pipeline_lib
  pipe = pipeline_lib.PipelineConfig(**{**pipe, "augment_rgb": "none", "augment_ir": "none",
                                        "augment_on": "host"})
  step = jax.jit(step_lib.make_train_step(parts, tx=setup.tx, pipeline=pipe, ctx=_ctx()))
  new, metrics = step(state, _batch())
  assert float(metrics["finite"]) == 1.0
  for which in ("visible", "infrared"):
    np.testing.assert_allclose(new.method_state[which], means[which], rtol=1e-6, atol=1e-6)
  assert not np.allclose(new.params["model"][kv]["kernel"], params["model"][kv]["kernel"])


def _out(setup, batch):
  images = jnp.concatenate([batch["rgb"]["image"], batch["ir"]["image"]])
  return jax.jit(lambda v, x: setup.model.apply(v, x, train=False))(
      {"params": setup.state.params["model"], "batch_stats": setup.state.batch_stats}, images)


def test_terms_match_a_direct_computation_with_cross_modal_teachers():
  setup = _setup(_config())
  means = {"visible": setup.state.method_state["visible"] + 0.05,
           "infrared": setup.state.method_state["infrared"] - 0.03}
  batch = _batch(1)
  out = _out(setup, batch)
  labels = jnp.concatenate([batch["rgb"]["label"], batch["ir"]["label"]])
  n = P * K
  for norm in ("batch_mean", "per_modality_sum"):
    loss = mpanet.LossConfig(loss_norm=norm)
    terms = mpanet.compute_losses(out, labels, means, loss, num_rgb=n)
    ce = np.asarray(losses.softmax_cross_entropy(out["logits"], labels))
    expect_id = ce.mean() if norm == "batch_mean" else ce[:n].mean() + ce[n:].mean()
    np.testing.assert_allclose(terms["id"], expect_id, rtol=1e-5)
    bn = np.asarray(out["bn"], np.float64)
    t_rgb = bn[:n] @ np.asarray(means["infrared"], np.float64)  # visible rows: infrared means
    t_ir = bn[n:] @ np.asarray(means["visible"], np.float64)
    s_rgb = np.asarray(out["logits_v"][:n], np.float64)
    s_ir = np.asarray(out["logits_r"][n:], np.float64)

    def kl(s, t):
      ls = s - np.log(np.exp(s).sum(1, keepdims=True))
      lt = t - np.log(np.exp(t).sum(1, keepdims=True))
      return (np.exp(ls) * (ls - lt)).sum(1)

    k_rgb, k_ir = kl(s_rgb, t_rgb), kl(s_ir, t_ir)
    expect_kl = (np.concatenate([k_rgb, k_ir]).mean() if norm == "batch_mean"
                 else k_rgb.mean() + k_ir.mean())
    np.testing.assert_allclose(terms["kl"], expect_kl, rtol=1e-4, atol=1e-6)
    sid = (np.asarray(losses.softmax_cross_entropy(out["logits_v"][:n], labels[:n])).mean()
           + np.asarray(losses.softmax_cross_entropy(out["logits_r"][n:], labels[n:])).mean())
    np.testing.assert_allclose(terms["sid"], sid, rtol=1e-5)
    np.testing.assert_allclose(terms["cc"], losses.center_cluster_loss(out["feat"], labels),
                               rtol=1e-5)
    np.testing.assert_allclose(terms["sep"], losses.pattern_separation_loss(out["maps"]),
                               rtol=1e-5)


@pytest.mark.parametrize("row,terms", [
    ("baseline", {"id"}), ("cc", {"id", "cc"}), ("ml", {"id", "sid", "kl"}),
    ("ml_cc", {"id", "cc", "sid", "kl"}), ("pam", {"id", "cc", "sid", "kl", "sep"}),
    ("mpanet", {"id", "cc", "sid", "kl", "sep"})])
def test_each_row_has_its_terms_and_weights(row, terms):
  setup = _setup(_config(row))
  parts = mpanet.step_parts(setup, 0, _ctx())
  assert set(parts.weights) == terms
  assert (parts.before is None) == ("kl" not in terms)
  assert parts.weights.get("sid", 1.0) == 1.0 and parts.weights.get("kl", 2.5) == 2.5
  got, _ = jax.eval_shape(parts.loss, setup.state.params, setup.state, _batch(2),
                          jax.random.PRNGKey(0))  # traced, not run
  assert set(got) == terms


def test_real_data_presets_follow_the_released_recipe():
  """mpanet.md §2.3, §5, §6, written out here: SYSU and RegDB inputs, batches, schedule, eval."""
  from maumjax.train import evaluation
  sysu = mpanet_configs.get_config("sysu")
  regdb = mpanet_configs.get_config("regdb")
  for c in (sysu, regdb):
    assert (c.num_epochs, c.optim.name, c.optim.lr, c.optim.weight_decay) == (
        140, "adam", 3.5e-4, 5e-4)
    assert c.data.pipeline.sampler == "mpanet" and c.data.pipeline.augment_rgb == "mpanet"
    assert (c.model.arch, c.model.last_stride, c.model.num_parts) == ("resnet50", 1, 6)
    assert c.eval.sampling == "official"
  assert (sysu.data.height, sysu.data.width, tuple(sysu.optim.decay_epochs)) == (384, 128,
                                                                                 (80, 120))
  assert (sysu.data.pipeline.num_identities, sysu.data.pipeline.num_instances) == (16, 4)
  assert sysu.eval.distance == "cosine"  # L2-normalised features
  assert (regdb.data.height, regdb.data.width, tuple(regdb.optim.decay_epochs)) == (256, 128,
                                                                                    (110,))
  assert (regdb.data.pipeline.num_identities, regdb.data.pipeline.num_instances) == (12, 5)
  assert (regdb.eval.distance, regdb.eval.regdb_cmc) == ("euclidean", "dedup")
  for data in mpanet_configs.DATA:
    for row, spec in mpanet_configs.ROWS.items():
      config = mpanet_configs.get_config(f"{data}_{row}")
      evaluation.check_config(config)
      assert {k: config.model[k] for k in spec["model"]} == spec["model"]
      assert {k: config.loss[k] for k in spec["loss"]} == spec["loss"]
  assert mpanet_configs.get_config("sysu_se").model.mam_variant == "se"


def test_no_gradient_reaches_the_means_or_through_the_teacher_features():
  setup = _setup(_config())
  batch = _batch(3)
  labels = jnp.concatenate([batch["rgb"]["label"], batch["ir"]["label"]])
  images = jnp.concatenate([batch["rgb"]["image"], batch["ir"]["image"]])
  loss = mpanet.LossConfig(cc=False)

  def kl_only(params, means):
    out = setup.model.apply({"params": params["model"], "batch_stats": setup.state.batch_stats},
                            images, train=False)
    return mpanet.compute_losses(out, labels, means, loss, num_rgb=P * K)["kl"]

  g_params, g_means = jax.jit(jax.grad(kl_only, argnums=(0, 1)))(setup.state.params,
                                                                setup.state.method_state)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_means))
  # The students train; the shared classifier (not in the KL) gets nothing.
  kv = mpanet_model.CLASSIFIERS["visible"]
  ks = mpanet_model.CLASSIFIERS["shared"]
  assert float(jnp.abs(g_params["model"][kv]["kernel"]).max()) > 0
  assert float(jnp.abs(g_params["model"][ks]["kernel"]).max()) == 0


def test_a_step_on_four_devices_equals_one_device():
  """shard_map over 4 simulated devices vs 1 device: same loss, parameters and mean
  classifiers after one step (float32 rounding of one step only)."""
  from tests.train.test_parallel import _assert_same
  from maumjax.data import pipeline as pipeline_lib

  config = _config()
  # SGD: Adam's first update, g / (|g| + eps), turns float32 rounding of near-zero gradients
  # into differences of order lr; the optimiser is not what this test is about.
  config["optim"].update(name="sgd", lr=0.1)
  # 64 x 32: on the 2 x 1 maps of 32 x 16 inputs the MAM's instance norm divides by the spread
  # of two values and turns float32 reduction-order differences into 1e-3 parameter changes.
  setup = _setup(config, shape=(64, 32))
  pipe = pipeline_lib.PipelineConfig(**{**config["data"]["pipeline"], "augment_rgb": "none",
                                        "augment_ir": "none", "augment_on": "host"})
  batch = _batch(4, shape=(64, 32))
  results = {}
  for mode, devices in (("none", 1), ("shard_map", 4)):
    ctx = _ctx(devices)
    fn = step_lib.method_step(mpanet, setup, 0, pipeline=pipe, ctx=ctx)
    compiled = parallel.CompiledStep(fn, mode)
    state, metrics = compiled(compiled.put_state(setup.state), compiled.put_batch(batch))
    results[mode] = (compiled.get_state(state), compiled.get_metrics(metrics))
  (s1, m1), (s4, m4) = results["none"], results["shard_map"]
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  _assert_same(jax.tree.map(np.asarray, s4.params), jax.tree.map(np.asarray, s1.params),
               "params (shard_map vs none)")
  _assert_same(jax.tree.map(np.asarray, s4.method_state),
               jax.tree.map(np.asarray, s1.method_state), "mean classifiers")


def test_the_smoke_preset_trains_and_evaluates_end_to_end(tmp_path, monkeypatch):
  """One short run through the shared trainer (data, the mpanet sampler, checkpoints, the
  protocol): the logged total is the weighted sum of the terms and the means moved."""
  from maumjax.train import checkpoint as checkpoint_lib
  from maumjax.train import loop, writers

  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path / "cache"))
  config = mpanet_configs.get_config("smoke")
  config.num_epochs = 1
  config.eval.trials = 1
  result = loop.train_and_evaluate(config, tmp_path / "run")
  assert result["run"]["method"] == "mpanet" and result["units"] == "percent"
  assert 0.0 <= result["summary"]["all/single"]["r1"] <= 100.0
  rows = writers.read_log(tmp_path / "run", "train")
  assert [r["step"] for r in rows] == list(range(1, result["run"]["steps"] + 1))
  weights = mpanet.loss_weights(mpanet.LossConfig(**config.loss.to_dict()), pam=True)
  for r in rows:
    np.testing.assert_allclose(r["loss"], sum(w * r[k] for k, w in weights.items()), rtol=1e-5)
  with checkpoint_lib.Checkpointer(tmp_path / "run") as ckpt:
    saved = ckpt.restore_arrays()
  kv = mpanet_model.CLASSIFIERS["visible"]
  mean_v = np.asarray(saved["method_state"]["visible"])
  assert np.all(np.isfinite(mean_v))
  assert not np.allclose(mean_v, np.asarray(saved["params"]["model"][kv]["kernel"]))
