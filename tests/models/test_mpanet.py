"""MPANet: MAM and PAM against NumPy loops, their variants, the model's tree, outputs and steps.

Real forwards use the 'tiny' arch at 64x32: layer3 is 4 x 2 x 32, layer4 (last stride 1)
4 x 2 x 64, so D = (num_parts + 1) * 64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maumjax.models import MODELS, load_backbone, model_from_config
from maumjax.models.mpanet import (
  CLASSIFIERS,
  MPANet,
  ModalityAlleviation,
  PatternAlignment,
  instance_norm,
  modality_alleviation,
  pattern_alignment,
  squeeze_excitation,
)
from maumjax.models.resnet import BN_EPSILON, ResNet
from tests.models.test_resnet import _random_variables
from tests.models.test_weights import _torchvision_state_dict

H, W = 64, 32
N_ID, PARTS = 5, 3
SMALL = {"arch": "tiny", "num_parts": PARTS, "num_classes": N_ID}
D = (PARTS + 1) * 64


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _images(seed, n):
  return jax.random.normal(jax.random.key(seed), (n, H, W, 3))


def _abstract_params(model):
  x = jnp.zeros((2, H, W, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]


# --- NumPy references (float64, explicit loops) --------------------------------------------------

def _np_instance_norm(x, eps=1e-5):
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for b in range(x.shape[0]):
    for c in range(x.shape[3]):
      values = x[b, :, :, c]
      mean = values.sum() / values.size
      var = ((values - mean) ** 2).sum() / values.size  # biased
      out[b, :, :, c] = (values - mean) / np.sqrt(var + eps)
  return out


def _np_gate(x, w1, w2):
  x, w1, w2 = (np.asarray(a, np.float64) for a in (x, w1, w2))
  m = np.empty((x.shape[0], x.shape[3]))
  for b in range(x.shape[0]):
    g = x[b].mean(axis=(0, 1))
    hidden = np.maximum(w1.T @ g, 0.0)
    m[b] = 1.0 / (1.0 + np.exp(-(w2.T @ hidden)))
  return m


def _np_mam(x, w1, w2):
  m = _np_gate(x, w1, w2)[:, None, None, :]
  return m * np.asarray(x, np.float64) + (1.0 - m) * _np_instance_norm(x)


def _np_pam(fmap, kernel, bias):
  fmap, kernel, bias = (np.asarray(a, np.float64) for a in (fmap, kernel, bias))
  b_, h_, w_, c_ = fmap.shape
  parts = kernel.shape[1]
  maps = np.empty((b_, h_, w_, parts))
  feats = np.zeros((b_, (parts + 1) * c_))
  for b in range(b_):
    for k in range(parts):
      for i in range(h_):
        for j in range(w_):
          maps[b, i, j, k] = 1.0 / (1.0 + np.exp(-(fmap[b, i, j] @ kernel[:, k] + bias[k])))
          feats[b, k * c_:(k + 1) * c_] += maps[b, i, j, k] * fmap[b, i, j] / (h_ * w_)
    feats[b, parts * c_:] = fmap[b].mean(axis=(0, 1))
  return feats, maps


# --- pure functions ------------------------------------------------------------------------------

def test_modality_alleviation_matches_numpy_loops():
  rng = np.random.default_rng(0)
  x = rng.normal(0.3, 1.5, (3, 4, 5, 32)).astype(np.float32)
  w1 = rng.normal(0, 0.5, (32, 2)).astype(np.float32)
  w2 = rng.normal(0, 0.5, (2, 32)).astype(np.float32)
  out = jax.jit(modality_alleviation)(x, w1, w2)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _np_mam(x, w1, w2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(instance_norm(x), _np_instance_norm(x), rtol=1e-5, atol=1e-5)
  # The gate is not saturated here, so both terms matter.
  m = _np_gate(x, w1, w2)
  assert 0.05 < m.min() and m.max() < 0.95


def test_modality_alleviation_hand_cases():
  # One sample, 2 x 2 map, two channels: channel 0 holds 1, 2, 3, 4, channel 1 is constant 5.
  # Channel 0: mean 2.5, biased variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, so IN gives
  # (x - 2.5) / sqrt(1.25 + 1e-5) = -1.341635, -0.447212, 0.447212, 1.341635.
  # Channel 1: variance 0, so IN gives 0 / sqrt(1e-5) = 0.
  x = np.stack([np.array([[1.0, 2.0], [3.0, 4.0]]), np.full((2, 2), 5.0)], -1)[None]
  x = x.astype(np.float32)
  normed = np.stack([(x[0, :, :, 0] - 2.5) / np.sqrt(1.25 + 1e-5), np.zeros((2, 2))], -1)[None]
  np.testing.assert_allclose(normed[0, :, :, 0], [[-1.341635, -0.447212], [0.447212, 1.341635]],
                             rtol=1e-5)
  w1 = np.ones((2, 1), np.float32)  # hidden = relu(2.5 + 5) = 7.5
  # m = sigmoid(7.5 * 100) = 1 in float32: the input passes unchanged.
  np.testing.assert_allclose(modality_alleviation(x, w1, np.full((1, 2), 100.0, np.float32)),
                             x, rtol=1e-6)
  # m = sigmoid(-750) = 0: plain instance norm.
  np.testing.assert_allclose(modality_alleviation(x, w1, np.full((1, 2), -100.0, np.float32)),
                             normed, rtol=1e-5, atol=1e-6)
  # m = sigmoid(0) = 1/2: the average of the two.
  np.testing.assert_allclose(modality_alleviation(x, w1, np.zeros((1, 2), np.float32)),
                             (x + normed) / 2, rtol=1e-5, atol=1e-6)


def test_pattern_alignment_matches_numpy_loops():
  rng = np.random.default_rng(1)
  fmap = rng.normal(0.2, 1.0, (2, 4, 3, 6)).astype(np.float32)
  kernel = rng.normal(0, 0.7, (6, 3)).astype(np.float32)
  bias = rng.normal(0, 0.5, (3,)).astype(np.float32)
  feats, maps = jax.jit(pattern_alignment)(fmap, kernel, bias)
  expected_feats, expected_maps = _np_pam(fmap, kernel, bias)
  assert feats.shape == (2, 4 * 6) and maps.shape == (2, 4, 3, 3)
  assert feats.dtype == maps.dtype == jnp.float32
  np.testing.assert_allclose(maps, expected_maps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(feats, expected_feats, rtol=1e-5, atol=1e-6)


def test_pattern_alignment_constant_masks_and_feature_order():
  fmap = np.random.default_rng(2).normal(size=(2, 3, 2, 4)).astype(np.float32)
  global_feat = fmap.astype(np.float64).mean(axis=(1, 2))
  zero_kernel = np.zeros((4, 3), np.float32)
  # All-ones masks (sigmoid(100) = 1): every pattern feature is the global feature.
  feats, maps = pattern_alignment(fmap, zero_kernel, np.full((3,), 100.0, np.float32))
  np.testing.assert_array_equal(maps, 1.0)
  np.testing.assert_allclose(np.asarray(feats).reshape(2, 4, 4),
                             np.repeat(global_feat[:, None], 4, axis=1), rtol=1e-5, atol=1e-6)
  # Constant masks 1/4, 1/2, 3/4 (bias = logit): p_k = mask_k * global, not divided by the
  # mask's mass; the blocks come in pattern order and the global feature is last.
  weights = np.array([0.25, 0.5, 0.75])
  feats, _ = pattern_alignment(fmap, zero_kernel,
                               np.log(weights / (1 - weights)).astype(np.float32))
  blocks = np.asarray(feats).reshape(2, 4, 4)
  for k in range(3):
    np.testing.assert_allclose(blocks[:, k], weights[k] * global_feat, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(blocks[:, 3], global_feat, rtol=1e-5, atol=1e-6)


# --- modules -------------------------------------------------------------------------------------

def test_modality_alleviation_module_params_and_variants():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(0.5, 1.0, (2, 3, 3, 32)), jnp.float32)
  params = ModalityAlleviation().init(jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, params) == {"w1": (32, 2), "w2": (2, 32)}
  w1, w2 = params["w1"], params["w2"]
  np.testing.assert_allclose(ModalityAlleviation().apply({"params": params}, x),
                             _np_mam(x, w1, w2), rtol=1e-5, atol=1e-5)
  # 'se': the same gate times x, no instance norm.
  se = ModalityAlleviation("se").apply({"params": params}, x)
  np.testing.assert_allclose(se, _np_gate(x, w1, w2)[:, None, None] * np.asarray(x, np.float64),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(squeeze_excitation(x, w1, w2), se, rtol=1e-6)
  # 'in': plain instance norm, no parameters.
  variables = ModalityAlleviation("in").init(jax.random.key(0), x)
  assert "params" not in variables
  np.testing.assert_allclose(ModalityAlleviation("in").apply(variables, x),
                             _np_instance_norm(x), rtol=1e-5, atol=1e-5)
  # The reduction never leaves an empty hidden layer.
  small = ModalityAlleviation().init(jax.random.key(0), x[..., :8])["params"]
  assert small["w1"].shape == (8, 1)
  with pytest.raises(ValueError, match="unknown MAM variant 'cbam'"):
    ModalityAlleviation("cbam").init(jax.random.key(0), x)


def test_modality_alleviation_init_is_kaiming_normal_fan_out():
  x = jnp.zeros((1, 1, 1, 1024))
  params = ModalityAlleviation().init(jax.random.key(1), x)["params"]
  # fan_out = output channels of each 1x1 conv: 64 for w1 [1024, 64], 1024 for w2 [64, 1024].
  np.testing.assert_allclose(np.std(params["w1"]), np.sqrt(2 / 64), rtol=0.05)
  np.testing.assert_allclose(np.std(params["w2"]), np.sqrt(2 / 1024), rtol=0.05)


def test_pattern_alignment_module_params():
  fmap = jnp.asarray(np.random.default_rng(4).normal(size=(2, 4, 2, 16)), jnp.float32)
  params = PatternAlignment(num_parts=5).init(jax.random.key(0), fmap)["params"]
  assert jax.tree.map(jnp.shape, params) == {"kernel": (16, 5), "bias": (5,)}
  np.testing.assert_array_equal(params["bias"], 0.0)
  assert float(jnp.max(jnp.abs(params["kernel"]))) <= 1 / np.sqrt(16)  # torch default init
  feats, maps = PatternAlignment(num_parts=5).apply({"params": params}, fmap)
  expected_feats, expected_maps = _np_pam(fmap, params["kernel"], params["bias"])
  assert feats.shape == (2, 6 * 16)
  np.testing.assert_allclose(feats, expected_feats, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps, expected_maps, rtol=1e-5, atol=1e-6)


# --- the model -----------------------------------------------------------------------------------

def test_param_tree_and_count():
  params = _abstract_params(MPANet(**SMALL))
  assert set(params) == {"shared", "mam3", "mam4", "pam", "bnneck", *CLASSIFIERS.values()}
  backbone = jax.eval_shape(
      lambda: ResNet("tiny").init(jax.random.key(0), jnp.zeros((1, H, W, 3)), train=False))
  # The backbone is laid out exactly as one ResNet: torchvision names right below 'shared'.
  assert jax.tree.map(jnp.shape, params["shared"]) == jax.tree.map(jnp.shape,
                                                                   backbone["params"])
  assert jax.tree.map(jnp.shape, params["mam3"]) == {"w1": (32, 2), "w2": (2, 32)}
  assert jax.tree.map(jnp.shape, params["mam4"]) == {"w1": (64, 4), "w2": (4, 64)}
  assert jax.tree.map(jnp.shape, params["pam"]) == {"kernel": (64, PARTS), "bias": (PARTS,)}
  assert jax.tree.map(jnp.shape, params["bnneck"]) == {"bn": {"scale": (D,)}}
  for name in CLASSIFIERS.values():
    assert jax.tree.map(jnp.shape, params[name]) == {"kernel": (D, N_ID)}
  expected = (_count(backbone["params"]) + 2 * 32 * 2 + 2 * 64 * 4 + (64 * PARTS + PARTS)
              + D + 3 * D * N_ID)
  assert _count(params) == expected


@pytest.mark.parametrize("fields, modules, dim", [
    ({"modality_attention": 2}, {"mam3", "mam4", "pam"}, D),
    ({"modality_attention": 1}, {"mam4", "pam"}, D),
    ({"modality_attention": 0}, {"pam"}, D),
    ({"mam_variant": "se"}, {"mam3", "mam4", "pam"}, D),
    ({"mam_variant": "in"}, {"pam"}, D),  # instance norm has no parameters
    ({"pam": False}, {"mam3", "mam4"}, 64),
])
def test_switches_change_the_param_tree(fields, modules, dim):
  model = MPANet(**SMALL, **fields)
  x = jnp.zeros((3, H, W, 3))
  out, variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), x, train=False))
  assert set(variables["params"]) == {"shared", "bnneck", *CLASSIFIERS.values()} | modules
  assert model.feature_dim == dim
  assert out["feat"].shape == out["bn"].shape == (3, dim)
  if model.pam:
    assert out["maps"].shape == (3, 4, 2, PARTS)
  else:
    assert out["maps"] is None


@pytest.fixture(scope="module")
def net():
  model = MPANet(**SMALL)
  x = _images(0, 4)
  return model, _random_variables(model, x, train=False), x


def test_forward_composes_the_pieces(net):
  """Eval mode by hand: ResNet ranges, MAM, layer4, MAM, PAM, BN-neck (no bias), classifiers."""
  model, variables, x = net
  out = jax.jit(lambda v, i: model.apply(v, i, train=False))(variables, x)
  params, stats = variables["params"], variables["batch_stats"]
  low_names = {"conv1", "bn1", "layer1_0", "layer2_0", "layer3_0"}
  def part(tree, keep):
    return {k: v for k, v in tree.items() if (k in low_names) == keep}
  y = ResNet("tiny", stop=4).apply({"params": part(params["shared"], True),
                                    "batch_stats": part(stats["shared"], True)}, x, train=False)
  y = modality_alleviation(y, params["mam3"]["w1"], params["mam3"]["w2"])
  y = ResNet("tiny", start=4).apply({"params": part(params["shared"], False),
                                     "batch_stats": part(stats["shared"], False)}, y, train=False)
  y = modality_alleviation(y, params["mam4"]["w1"], params["mam4"]["w2"])
  feat, maps = pattern_alignment(y, params["pam"]["kernel"], params["pam"]["bias"])
  bn_stats = stats["bnneck"]["bn"]
  bn = ((np.asarray(feat, np.float64) - bn_stats["mean"]) / np.sqrt(bn_stats["var"] + BN_EPSILON)
        * params["bnneck"]["bn"]["scale"])
  np.testing.assert_allclose(out["feat"], feat, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["maps"], maps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["bn"], bn, rtol=1e-4, atol=1e-4)
  for key, name in (("logits", "classifier"), ("logits_v", "classifier_v"),
                    ("logits_r", "classifier_r")):
    assert out[key].shape == (4, N_ID) and out[key].dtype == jnp.float32
    np.testing.assert_allclose(out[key], np.asarray(out["bn"], np.float64)
                               @ params[name]["kernel"], rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(out["logits_v"] - out["logits_r"]))) > 1e-3


def test_bnneck_bias_is_not_a_parameter(net):
  """The frozen zero bias is not in `params` (nothing to train or decay): BN has `scale` only."""
  model, variables, x = net
  bn_params = variables["params"]["bnneck"]["bn"]
  assert set(bn_params) == {"scale"}
  assert set(variables["batch_stats"]["bnneck"]["bn"]) == {"mean", "var"}
  # With batch statistics and bias 0 the BN-neck output has zero batch mean in every dim.
  out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(jnp.mean(out["bn"], axis=0), 0.0, atol=1e-4)
  assert float(jnp.median(jnp.std(out["bn"], axis=0))) > 0.1  # not all zero


def test_init_values(net):
  model, _, x = net
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
  np.testing.assert_array_equal(variables["params"]["bnneck"]["bn"]["scale"], 1.0)
  np.testing.assert_array_equal(variables["params"]["pam"]["bias"], 0.0)
  bound = 1 / np.sqrt(D)  # torch Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  for name in CLASSIFIERS.values():
    kernel = variables["params"][name]["kernel"]
    assert float(jnp.max(jnp.abs(kernel))) <= bound and float(jnp.std(kernel)) > bound / 3
  # Independent draws: the mean classifiers start from the students, the students differ.
  assert float(jnp.max(jnp.abs(variables["params"]["classifier_v"]["kernel"]
                               - variables["params"]["classifier_r"]["kernel"]))) > 0


def test_embed_is_the_eval_bnneck_output(net):
  model, variables, x = net
  embed = jax.jit(lambda v, i, m: model.apply(v, i, m, method="embed"))
  feats = embed(variables, x, jnp.asarray([0, 1, 0, 1]))
  assert feats.shape == (4, D) and feats.dtype == jnp.float32
  # The reference compiled too (not op by op), as the features are: what is compared is the
  # two computations, not jit against eager dispatch (their rounding differs by ~1e-6 when the
  # tests compile without LLVM optimisation, tests/conftest.py).
  bn = jax.jit(lambda v, i: model.apply(v, i, train=False)["bn"])(variables, x)
  np.testing.assert_allclose(feats, bn, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(feats, embed(variables, x, jnp.asarray([1, 1, 1, 1])))


def test_grad_step(net):
  model, variables, x = net
  labels = jnp.asarray([0, 1, 2, 3])
  visible = jnp.asarray([True, True, False, False])

  def loss_fn(params):
    out, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                             train=True, mutable=["batch_stats"])
    def ce(logits):
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    specific = jnp.where(visible, ce(out["logits_v"]), ce(out["logits_r"]))
    sep = jnp.mean(jnp.einsum("bhwk,bhwl->bkl", out["maps"], out["maps"]))
    loss = jnp.mean(ce(out["logits"]) + specific) + 0.01 * jnp.mean(out["feat"] ** 2) + sep
    return loss, state

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, state), grads = step(variables["params"])
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  for name in ("shared", "mam3", "mam4", "pam", "bnneck", *CLASSIFIERS.values()):
    assert _count(grads[name]) and float(sum(jnp.sum(jnp.abs(g))
                                             for g in jax.tree.leaves(grads[name]))) > 0, name
  assert not jax.tree.all(jax.tree.map(np.array_equal, state["batch_stats"],
                                       variables["batch_stats"]))
  new_params = jax.tree.map(lambda p, g: p - 1e-2 * g, variables["params"], grads)
  (new_loss, _), _ = step(new_params)
  assert float(new_loss) < float(loss)


def test_model_from_config_and_registry():
  assert MODELS["mpanet"] is MPANet
  model = model_from_config({"name": "mpanet", "arch": "tiny", "num_parts": 2,
                             "pretrained": None, "dtype": "bfloat16"}, num_classes=7)
  assert isinstance(model, MPANet)
  assert (model.arch, model.num_parts, model.num_classes, model.dtype) == (
      "tiny", 2, 7, jnp.bfloat16)
  x = jnp.zeros((2, H, W, 3))
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False))[0]
  assert out["feat"].dtype == out["bn"].dtype == out["logits"].dtype == jnp.float32
  assert out["logits"].shape == (2, 7)


def test_load_backbone_fills_the_shared_trunk(net):
  model, variables, _ = net
  sd = _torchvision_state_dict("tiny")
  loaded, report = load_backbone(variables, sd, model=model)
  np.testing.assert_array_equal(loaded["params"]["shared"]["layer4_0"]["conv2"]["kernel"],
                                sd["layer4.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats"]["shared"]["layer3_0"]["bn1"]["var"],
                                sd["layer3.0.bn1.running_var"])
  assert len(report.loaded) == len(jax.tree.leaves(variables["params"]["shared"])) + len(
      jax.tree.leaves(variables["batch_stats"]["shared"]))
  for name in set(variables["params"]) - {"shared"}:  # MAM, PAM, BN-neck, classifiers untouched
    jax.tree.map(np.testing.assert_array_equal, loaded["params"][name],
                 variables["params"][name])


def test_bad_configuration_raises():
  x = jnp.zeros((1, H, W, 3))
  def init(**fields):
    model = MPANet(**{**SMALL, **fields})
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  with pytest.raises(ValueError, match="needs num_classes"):
    init(num_classes=None)
  with pytest.raises(ValueError, match="modality_attention must be"):
    init(modality_attention=3)
  with pytest.raises(ValueError, match="unknown mam_variant 'cbam'"):
    init(mam_variant="cbam")
  with pytest.raises(ValueError, match="unknown ResNet arch"):
    init(arch="resnet101")
