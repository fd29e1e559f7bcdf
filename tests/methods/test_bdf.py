"""BDF as a method: the derivative images (pixel-aligned with their bases after augmentation,
independently augmented before), the terms of each ablation row against a direct computation,
the learnable colour map in the gradient, one step equal on 4 devices and on 1, and one short
run through the shared trainer.

The derivations, the losses and the model have their own tests (tests/data/test_derive.py,
tests/losses/test_bdf.py, tests/losses/test_cross_modal_triplet.py, tests/models/test_bdf.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import bdf as bdf_configs
from maumjax import losses
from maumjax.data import augment
from maumjax.data import derive as derive_lib
from maumjax.data import pipeline as pipeline_lib
from maumjax.methods import api
from maumjax.methods import bdf
from maumjax.train import parallel
from maumjax.train import step as step_lib

NUM_CLASSES, P, K, H, W = 6, 4, 2, 32, 16
N = P * K
CFG = augment.AugmentConfig(pad=2)  # agw_small: pad 2 (fill 0), crop, flip
# One grey level after normalisation: jitted and eager luma can round a boundary pixel apart.
LEVEL = 1.01 / (255 * min(augment.IMAGENET_STD))


def _config(row: str = "full", **loss):
  config = bdf_configs.get_config("smoke").to_dict()
  config["loss"].update(bdf_configs.ROWS[row], **loss)
  return config


def _setup(config, seed=0):
  data = api.DataInfo(num_classes=NUM_CLASSES, image_shape=(H, W), steps_per_epoch=5,
                      classes_rgb=np.ones(NUM_CLASSES, bool), classes_ir=np.ones(NUM_CLASSES, bool))
  return bdf.init(config, data, seed=seed)


@pytest.fixture(scope="module")
def full_setup():
  return _setup(_config())


def _derive(setup, part, key, **kwargs):
  """`bdf.derived_images` under jit (eager dispatch of the derivation is slow)."""
  return jax.jit(lambda params, part, key: bdf.derived_images(
      setup.model, params, part, key, ctx=_ctx(), **kwargs))(
          setup.state.params["model"], part, key)


def _ctx(devices=1):
  return api.StepContext(axis_name=None if devices == 1 else parallel.DATA_AXIS, devices=devices,
                         sync_bn=True)


def _shipped(seed=0, cfg=CFG):
  """A shipped (uint8 + augmentation parameters) batch, as the loader sends it."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(rng.choice(NUM_CLASSES, P, replace=False), K).astype(np.int32)

  def part():
    return {"image": rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8), "label": labels,
            "aug": augment.draw_params_batch(rng, cfg, N, H, W)}
  return {"rgb": part(), "ir": part()}


def _augmented(batch, cfg=CFG):
  pipe = pipeline_lib.PipelineConfig(augment_rgb="agw_small", augment_ir="agw_small")
  assert augment.preset("agw_small") == cfg
  return pipeline_lib.device_augment(batch, pipe, keep_pixels=True)


def test_device_augment_keeps_the_pixels_only_when_asked():
  batch = _shipped(0)
  pipe = pipeline_lib.PipelineConfig(augment_rgb="agw_small", augment_ir="agw_small")
  plain = pipeline_lib.device_augment(batch, pipe)
  kept = pipeline_lib.device_augment(batch, pipe, keep_pixels=True)
  assert set(plain["rgb"]) == {"image", "label"}
  np.testing.assert_array_equal(kept["rgb"]["image"], plain["rgb"]["image"])
  np.testing.assert_array_equal(kept["rgb"]["raw"], batch["rgb"]["image"])
  np.testing.assert_array_equal(
      kept["ir"]["pixels"], augment.apply_jax_pixels(batch["ir"]["image"], batch["ir"]["aug"],
                                                     CFG))
  with pytest.raises(ValueError, match="augment_on='device'"):
    pipeline_lib.device_augment(batch, pipeline_lib.PipelineConfig(augment_on="host"),
                                keep_pixels=True)


def test_derivatives_after_augmentation_are_pixel_aligned_with_their_bases(full_setup):
  batch = _augmented(_shipped(1))
  v_hat = _derive(full_setup, batch["rgb"], jax.random.key(0), infrared=False,
                  where="after_augment", cfg=CFG)
  # Grey is per pixel and maps the zero padding to itself, so deriving the augmented image
  # equals augmenting the derived one with the SAME crop and flip: the pair is aligned.
  grey_raw = np.asarray(derive_lib.grey(batch["rgb"]["raw"]))
  expected = augment.apply_numpy(grey_raw[0], {k: v[0] for k, v in batch["rgb"]["aug"].items()},
                                 CFG)
  np.testing.assert_allclose(v_hat[0], expected, atol=LEVEL)
  np.testing.assert_allclose(v_hat, augment.apply_jax(jnp.asarray(grey_raw), batch["rgb"]["aug"],
                                                      CFG), atol=LEVEL)
  # A flipped base has a flipped derivative; the mask of which images flip is not all-equal.
  assert 0 < int(np.sum(batch["rgb"]["aug"]["flip"])) < N


def test_derivatives_before_augmentation_take_other_crops(full_setup):
  batch = _augmented(_shipped(2))
  got = _derive(full_setup, batch["rgb"], jax.random.key(0), infrared=False,
                where="before_augment", cfg=CFG)
  rolled = {k: np.roll(v, -1, axis=0) for k, v in batch["rgb"]["aug"].items()}
  grey_raw = derive_lib.grey(batch["rgb"]["raw"])
  np.testing.assert_allclose(got, augment.apply_jax(grey_raw, rolled, CFG), atol=LEVEL)
  aligned = augment.apply_jax(grey_raw, batch["rgb"]["aug"], CFG)
  assert float(jnp.abs(got - aligned).max()) > 0.1


def test_contrast_gamma_draws_per_image_and_position(full_setup):
  batch = _augmented(_shipped(3))
  got = _derive(full_setup, batch["ir"], jax.random.key(7), infrared=True,
                where="after_augment", cfg=CFG)
  for i in (0, 5):
    key = jax.random.fold_in(jax.random.key(7), i)
    one = derive_lib.contrast_gamma(batch["ir"]["pixels"][i:i + 1], key)
    np.testing.assert_allclose(got[i], augment.normalize_jax(one)[0], atol=LEVEL)
  # Different images get different draws (not one gamma for the batch).
  ratio = np.asarray(batch["ir"]["image"] - got).std(axis=(1, 2, 3))
  assert np.unique(np.round(ratio, 4)).size > 1


def test_learnable_map_starts_at_the_identity():
  """I^ = I at the start; that it trains end to end is checked by the smoke run below."""
  config = _config()
  config["model"]["derive_ir"] = "learnable_1x1"
  setup = _setup(config)
  batch = _augmented(_shipped(4))
  assert bdf.step_parts(setup, 0, _ctx()).pixels
  assert "I^ (learnable_1x1) after augment" in bdf.describe_phase(setup, 0)
  i_hat = _derive(setup, batch["ir"], jax.random.key(0), infrared=True,
                  where="after_augment", cfg=CFG)
  np.testing.assert_allclose(i_hat, batch["ir"]["image"], atol=1e-4)


def _out(setup, images, blocks):
  return setup.model.apply({"params": setup.state.params["model"],
                            "batch_stats": setup.state.batch_stats}, images, train=False,
                           num_blocks=blocks)


def _naive_triplet(feats, labels, anchors, targets, margin):
  """Batch-hard triplet of one direction, a loop over anchors (AGW's rule)."""
  d = np.sqrt(np.maximum(((feats[:, None] - feats[None]) ** 2).sum(-1), 1e-12))
  vals = []
  for i in anchors:
    pos = [j for j in targets if labels[j] == labels[i]]
    neg = [j for j in targets if labels[j] != labels[i]]
    if pos:
      vals.append(max(0.0, max(d[i, pos]) - min(d[i, neg]) + margin))
  return np.mean(vals)


@pytest.mark.parametrize("homologous", ["intra", "cross"])
def test_terms_match_a_direct_computation(homologous, full_setup):
  setup = full_setup
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.normal(size=(4 * N, H, W, 3)), jnp.float32)
  labels = np.tile(np.repeat(np.arange(P), K), 4).astype(np.int32)
  out = _out(setup, images, 4)
  loss = bdf.LossConfig(homologous=homologous, did_mode="ce_plus_consistency")
  terms = jax.jit(lambda o: bdf.compute_losses(o, jnp.asarray(labels), loss))(out)
  ce = np.asarray(losses.softmax_cross_entropy(out["logits"], jnp.asarray(labels)))
  logp = np.asarray(jax.nn.log_softmax(out["logits"]), np.float64).reshape(4, N, -1)
  kl = lambda a, b: np.mean(np.sum(np.exp(a) * (a - b), axis=-1))  # noqa: E731
  consistency = np.mean([kl(logp[b], logp[b + 2]) + kl(logp[b + 2], logp[b]) for b in (0, 1)])
  np.testing.assert_allclose(terms["did"], ce.reshape(4, N).mean() + consistency, rtol=1e-5)
  feats = np.asarray(out["feat"], np.float64)
  block = lambda g: range(g * N, (g + 1) * N)  # noqa: E731
  tri = lambda a, b: _naive_triplet(feats, labels, block(a), block(b), 0.3)  # noqa: E731
  intra = [tri(m, m) for m in range(4)]
  base_pairs = [tri(0, 2), tri(1, 3)]
  hetero = [tri(a, b) for a, b in ((0, 1), (1, 0), (2, 1), (1, 2), (0, 3), (3, 0), (2, 3),
                                   (3, 2))]
  if homologous == "intra":
    mml, mdl = intra + base_pairs, hetero
  else:
    mml, mdl = intra, hetero + base_pairs + [tri(2, 0), tri(3, 1)]
  np.testing.assert_allclose(terms["mml"], np.mean(mml), rtol=1e-5)
  np.testing.assert_allclose(terms["mdl"], np.mean(mdl), rtol=1e-5)
  # The center family goes through the same directions (its loss is tested on its own).
  center = bdf.compute_losses(out, jnp.asarray(labels), bdf.LossConfig(homologous=homologous,
                                                                       family="center"))
  per = losses.cross_modal_center_triplet_per_pair(
      out["feat"], jnp.asarray(labels), jnp.repeat(jnp.arange(4), N), pairs=loss.pairs()[1],
      margin=0.3)
  np.testing.assert_allclose(center["mdl"], np.mean(per), rtol=1e-5)
  assert abs(float(center["mdl"]) - float(terms["mdl"])) > 1e-4


def test_base_row_is_identity_ce_and_agw_triplet_on_two_blocks():
  config = _config("base")
  setup = _setup(config)
  loss = setup.config.loss
  assert loss.num_blocks == 2 and bdf.loss_weights(loss) == {"id": 1.0, "tri": 1.0}
  parts = bdf.step_parts(setup, 0, _ctx())
  assert not parts.pixels
  assert "[V; I] batch only" in bdf.describe_phase(setup, 0)
  rng = np.random.default_rng(6)
  images = jnp.asarray(rng.normal(size=(2 * N, H, W, 3)), jnp.float32)
  labels = np.tile(np.repeat(np.arange(P), K), 2).astype(np.int32)
  out = _out(setup, images, 2)
  terms = bdf.compute_losses(out, jnp.asarray(labels), loss)
  ce = np.asarray(losses.softmax_cross_entropy(out["logits"], jnp.asarray(labels)))
  np.testing.assert_allclose(terms["id"], ce.mean(), rtol=1e-5)
  feats = np.asarray(out["feat"], np.float64)
  np.testing.assert_allclose(
      terms["tri"], _naive_triplet(feats, labels, range(2 * N), range(2 * N), 0.3), rtol=1e-5)


@pytest.mark.parametrize("row,terms", [
    ("full", {"did": 1.0, "mml": 1.0, "mdl": 1.0}),
    ("base", {"id": 1.0, "tri": 1.0}),
    ("did", {"did": 1.0}),
    ("did_mml", {"did": 1.0, "mml": 1.0}),
    ("did_mdl", {"did": 1.0, "mdl": 1.0}),
])
def test_each_row_has_its_terms_and_weights(row, terms):
  config = bdf_configs.get_config(f"synthetic_{row}").to_dict()
  assert bdf.loss_weights(bdf.LossConfig(**config["loss"])) == terms


def test_real_data_presets_follow_the_agw_recipe():
  for preset in ("sysu", "regdb_did_mml"):
    config = bdf_configs.get_config(preset)
    assert config.num_epochs == 81 and (config.data.height, config.data.width) == (288, 144)
    o = config.optim
    assert (o.name, o.lr, o.backbone_lr_mult, o.warmup_epochs, tuple(o.decay_epochs)) == (
        "sgd", 0.1, 0.1, 10, (20, 50))
    pipe = config.data.pipeline
    assert (pipe.num_identities, pipe.num_instances, pipe.augment_rgb) == (8, 4, "agw")
    m = config.model
    assert (m.arch, m.stems, m.pool, m.derive_vis, m.derive_ir) == (
        "resnet50", "shared", "gem", "grey", "contrast_gamma")
  assert bdf_configs.get_config("regdb_did_mml").loss.mdl is False
  with pytest.raises(ValueError, match="preset"):
    bdf_configs.get_config("sysu_didmml")


def test_bad_switches_are_refused():
  with pytest.raises(ValueError, match="derive_where"):
    bdf.LossConfig(derive_where="later")
  with pytest.raises(ValueError, match="did_mode"):
    bdf.LossConfig(derivatives=False, did_mode="ce_plus_consistency")
  config = _config()
  config["data"]["pipeline"]["augment_on"] = "host"
  with pytest.raises(ValueError, match="augment_on='device'"):
    _setup(config)


def test_a_step_on_four_devices_equals_one_device():
  """shard_map over 4 simulated devices vs 1 device, with on-device augmentation and the
  random contrast_gamma derivation: the same images, loss and parameters after one step."""
  from tests.train.test_parallel import _assert_same

  config = _config()
  setup = _setup(config)
  pipe = pipeline_lib.PipelineConfig(**{**config["data"]["pipeline"]})
  batch = _shipped(8, augment.preset(pipe.augment_rgb))
  results = {}
  for mode, devices in (("none", 1), ("shard_map", 4)):
    fn = step_lib.method_step(bdf, setup, 0, pipeline=pipe, ctx=_ctx(devices))
    compiled = parallel.CompiledStep(fn, mode)
    state, metrics = compiled(compiled.put_state(setup.state), compiled.put_batch(batch))
    results[mode] = (compiled.get_state(state), compiled.get_metrics(metrics))
  (s1, m1), (s4, m4) = results["none"], results["shard_map"]
  for term in ("loss", "did", "mml", "mdl"):
    np.testing.assert_allclose(m1[term], m4[term], rtol=1e-5, err_msg=term)
  _assert_same(jax.tree.map(np.asarray, s4.params), jax.tree.map(np.asarray, s1.params),
               "params (shard_map vs none)")


def test_the_smoke_preset_trains_and_evaluates_end_to_end(tmp_path, monkeypatch):
  """One short run through the shared trainer, with the learnable I^ map: the logged total is
  the weighted sum of the four-modality terms, the map trained away from the identity, and the
  evaluation runs on base features (then with the derivative TTA)."""
  from maumjax.train import checkpoint as checkpoint_lib
  from maumjax.train import loop, writers

  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path / "cache"))
  config = bdf_configs.get_config("smoke")
  config.num_epochs = 1
  config.eval.trials = 1
  config.model.derive_ir = "learnable_1x1"
  result = loop.train_and_evaluate(config, tmp_path / "run")
  assert result["run"]["method"] == "bdf" and result["units"] == "percent"
  assert 0.0 <= result["summary"]["all/single"]["r1"] <= 100.0
  rows = writers.read_log(tmp_path / "run", "train")
  assert [r["step"] for r in rows] == list(range(1, result["run"]["steps"] + 1))
  weights = bdf.loss_weights(bdf.LossConfig(**config.loss.to_dict()))
  assert set(weights) == {"did", "mml", "mdl"}
  for r in rows:
    np.testing.assert_allclose(r["loss"], sum(w * r[k] for k, w in weights.items()), rtol=1e-5)
  with checkpoint_lib.Checkpointer(tmp_path / "run") as ckpt:
    delta = np.asarray(ckpt.restore_arrays()["params"]["model"]["colour_map"]["delta"])
  assert np.all(np.isfinite(delta)) and np.abs(delta).max() > 1e-6  # the I^ map trained
  # The saved run evaluated again with the derivative test-time augmentation: its own folder,
  # other features, and a clear error for a field the run's model lacks.
  from experiments import evaluate as evaluate_cli
  from maumjax.train import evaluation

  overrides = evaluate_cli._parse_model(["tta_derivative=true"])
  assert overrides == {"tta_derivative": True}
  tta = evaluation.evaluate_workdir(tmp_path / "run", overrides={"trials": 1},
                                    model_overrides=overrides)
  assert tta["out_dir"].endswith("_tta_derivative-True")
  assert tta["summary"]["all/single"] != result["summary"]["all/single"]
  with pytest.raises(evaluation.RunConfigError, match="no such field"):
    evaluation.evaluate_workdir(tmp_path / "run", model_overrides={"tta": True})
  with pytest.raises(evaluation.RunConfigError, match=r"tta_derivative=False \(bool\)"):
    evaluation.evaluate_workdir(tmp_path / "run", model_overrides={"tta_derivative": "yes"})
