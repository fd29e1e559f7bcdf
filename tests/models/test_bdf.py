"""BDFNet: the learnable colour map starts at the identity, each block takes its stem, test-time
features (base only, and the derivative average), ImageNet weights in every stem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maumjax.data import augment
from maumjax.data import derive as derive_lib
from maumjax.models import bdf as bdf_model
from maumjax.models import weights

H, W, C = 32, 16, 5


def _model(**fields):
  return bdf_model.BDFNet(num_classes=C, arch="tiny", **fields)


def _init(model, blocks=4):
  return jax.jit(lambda k: model.init(k, jnp.zeros((blocks, H, W, 3)), train=False))(
      jax.random.key(0))


def _uint8(seed, n=4):
  return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def test_colour_map_starts_at_the_identity_and_trains():
  model = bdf_model.ColourMap()
  pixels = _uint8(0)
  variables = model.init(jax.random.key(0), pixels)
  np.testing.assert_array_equal(variables["params"]["delta"], np.zeros((3, 3)))
  np.testing.assert_allclose(model.apply(variables, pixels), pixels.astype(np.float32),
                             atol=1e-4)
  # A hand-set map: swap red and blue, add 10/255 to green.
  delta = np.array([[-1, 0, 1], [0, 0, 0], [1, 0, -1]], np.float32)
  bias = np.array([0, 10 / 255, 0], np.float32)
  out = model.apply({"params": {"delta": delta, "bias": bias}}, pixels)
  expected = pixels[..., [2, 1, 0]].astype(np.float32) + np.array([0, 10, 0], np.float32)
  np.testing.assert_allclose(out, expected, atol=1e-3)
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, pixels) ** 2))(
      variables["params"])
  assert float(jnp.abs(grads["delta"]).max()) > 0 and float(jnp.abs(grads["bias"]).max()) > 0


def _shapes(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((4, H, W, 3)),
                                           train=False))


def test_learnable_map_is_in_the_params_only_when_chosen():
  assert "colour_map" not in _shapes(_model())["params"]
  params = _shapes(_model(derive_ir="learnable_1x1"))["params"]
  assert set(params["colour_map"]) == {"delta", "bias"}


@pytest.mark.parametrize("stems,modules", [
    ("shared", {"shared"}),
    ("by_origin", {"rgb", "ir", "shared"}),
    ("four", {"rgb", "ir", "rgb_derived", "ir_derived", "shared"}),
])
def test_each_block_takes_its_stem(stems, modules):
  model = _model(stems=stems)
  variables = _init(model)
  assert {k for k in variables["params"] if k not in ("global_head", "classifier")} == modules
  images = jax.random.normal(jax.random.key(1), (8, H, W, 3))
  run = jax.jit(lambda v: model.apply(v, images, train=False)["bn"])
  base = run(variables)
  if stems == "shared":
    return
  # Perturb one stem: exactly the blocks routed through it change ([V; I; V^; I^], 2 rows each).
  routed = {"rgb": (0, 2) if stems == "by_origin" else (0,), "ir": (1, 3) if stems ==
            "by_origin" else (1,), "rgb_derived": (2,), "ir_derived": (3,)}
  for stem in modules - {"shared"}:
    bumped = jax.tree.map(lambda x: x, variables)
    bumped["params"][stem] = jax.tree.map(lambda x: x * 1.5 + 0.1, variables["params"][stem])
    changed = np.abs(np.asarray(run(bumped) - base)).reshape(4, 2, -1).max(axis=(1, 2)) > 1e-4
    assert tuple(np.flatnonzero(changed)) == routed[stem], stem
  if stems == "four":  # test-time routing uses the base stems, as by_origin (checked there)
    return
  # Test time: a visible image takes the V stem and an infrared one the I stem, as in training.
  embed = jax.jit(lambda v: model.apply(v, images[:4], jnp.asarray([0, 0, 1, 1]),
                                        method="embed"))(variables)
  train_rows = np.asarray(jax.jit(lambda v: model.apply(v, images[:4], train=False,
                                                        num_blocks=2)["bn"])(variables))
  expected = train_rows / np.linalg.norm(train_rows, axis=1, keepdims=True)
  np.testing.assert_allclose(embed, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("derive_ir", ["invert", "contrast_gamma"])
def test_tta_derivative_averages_normalised_base_and_derivative_features(derive_ir):
  model = _model(stems="four", derive_ir=derive_ir)
  variables = _init(model)
  pixels = _uint8(2)
  images = augment.normalize_jax(jnp.asarray(pixels))
  modality = jnp.asarray([0, 1, 0, 1])
  base = jax.jit(lambda v: model.apply(v, images, modality, method="embed"))(variables)
  tta = jax.jit(lambda v: model.clone(tta_derivative=True).apply(v, images, modality,
                                                                 method="embed"))(variables)
  # By hand: derive each image as its modality says, run it through the DERIVED stems.
  key = jax.random.PRNGKey(bdf_model.TTA_KEY)
  derived = np.where(np.asarray(modality)[:, None, None, None] == 1,
                     derive_lib.derive(pixels, key, derive_ir), derive_lib.grey(pixels))
  x = augment.normalize_jax(jnp.asarray(derived, jnp.uint8))
  # Blocks V^ and I^ of a training batch take rgb_derived and ir_derived: visible rows 0 and 2
  # go in the V^ block, infrared rows 1 and 3 in the I^ block.
  four = jnp.concatenate([images[:2], images[:2], x[np.array([0, 2])], x[np.array([1, 3])]])
  out = np.asarray(jax.jit(lambda v: model.apply(v, four, train=False)["bn"])(variables))
  feats_d = np.empty((4, out.shape[1]), np.float32)
  feats_d[[0, 2]] = out[4:6]
  feats_d[[1, 3]] = out[6:8]
  feats_d /= np.linalg.norm(feats_d, axis=1, keepdims=True)
  np.testing.assert_allclose(tta, (np.asarray(base) + feats_d) / 2, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(tta - base).max()) > 1e-3


def test_imagenet_weights_reach_every_stem():
  from tests.models.test_weights import _torchvision_state_dict

  sd = _torchvision_state_dict("tiny")
  model = _model(stems="four")
  variables = _shapes(model)
  loaded, report = weights.load_backbone(variables, sd, model=model)
  stem = sd["conv1.weight"].transpose(2, 3, 1, 0)
  for name in ("rgb", "ir", "rgb_derived", "ir_derived"):
    np.testing.assert_array_equal(loaded["params"][name]["conv1"]["kernel"], stem)
  np.testing.assert_array_equal(loaded["params"]["shared"]["layer1_0"]["conv1"]["kernel"],
                                sd["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))
  assert "classifier" in loaded["params"] and report.unused == ("fc.bias", "fc.weight")


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="stems"):
    _init(_model(stems="two"))
  with pytest.raises(ValueError, match="derive_ir"):
    _init(_model(derive_ir="sepia"))
  with pytest.raises(ValueError, match="num_classes"):
    _init(bdf_model.BDFNet(arch="tiny"))
