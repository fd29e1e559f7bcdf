"""ReidNet: output groups and shapes, stream layout, modality routing, embed, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maumjax.models import MODALITY_IR, MODALITY_RGB, ReidNet
from tests.models.test_resnet import _random_variables

H, W = 64, 32  # tiny arch: final map 4 x 2 with last stride 1
SMALL = {"arch": "tiny", "num_parts": 2, "part_dim": 8}


def _images(seed, n):
  return jax.random.normal(jax.random.key(seed), (n, H, W, 3))


@pytest.fixture(scope="module")
def net():
  model = ReidNet(head="both", specific_stages=1, **SMALL)
  rgb, ir = _images(0, 2), _images(1, 3)
  variables = _random_variables(model, rgb, ir, train=False)
  return model, variables, rgb, ir


@pytest.mark.parametrize("head, groups", [("global", {"global"}), ("parts", {"parts"}),
                                          ("both", {"global", "parts"})])
def test_output_groups_and_shapes(head, groups):
  model = ReidNet(head=head, **SMALL)
  rgb, ir = jnp.zeros((2, H, W, 3)), jnp.zeros((3, H, W, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), rgb, ir, train=False))
  out = jax.eval_shape(
      lambda v: model.apply(v, rgb, ir, train=True, mutable=["batch_stats"])[0], variables)
  assert set(out) == groups
  shapes = {"global": (5, 1, 64), "parts": (5, 2, 8)}
  for g in groups:
    assert out[g]["pre"].shape == out[g]["bn"].shape == shapes[g]
    assert out[g]["pre"].dtype == out[g]["bn"].dtype == jnp.float32
  assert model.feature_dim == sum({"global": 64, "parts": 16}[g] for g in groups)


@pytest.mark.parametrize("specific, rgb_first, shared_first", [
    (0, None, "conv1"), (1, ("conv1", "bn1"), "layer1_0"),
    (2, ("conv1", "bn1", "layer1_0"), "layer2_0"), (5, ("conv1", "layer4_0"), None)])
def test_stream_layout(specific, rgb_first, shared_first):
  model = ReidNet(specific_stages=specific, head="both", **SMALL)
  x = jnp.zeros((1, H, W, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x, train=False))["params"]
  expected = {"global_head", "parts_head"}
  if rgb_first:
    expected |= {"rgb", "ir"}
    assert set(rgb_first) <= set(params["rgb"])
    assert jax.tree.map(jnp.shape, params["rgb"]) == jax.tree.map(jnp.shape, params["ir"])
  if shared_first:
    expected.add("shared")
    assert shared_first in params["shared"]
    if rgb_first:
      assert not set(params["rgb"]) & set(params["shared"])
  assert set(params) == expected


def test_bad_configuration_raises():
  x = jnp.zeros((1, H, W, 3))
  def init(model, rgb=x, ir=x):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), rgb, ir, train=False))
  with pytest.raises(ValueError, match="specific_stages must be in"):
    init(ReidNet(specific_stages=6, **SMALL))
  with pytest.raises(ValueError, match="unknown head 'pcb'"):
    init(ReidNet(head="pcb", **SMALL))
  with pytest.raises(ValueError, match="same"):
    init(ReidNet(**SMALL), ir=jnp.zeros((1, H, W + 2, 3)))
  with pytest.raises(ValueError, match="smaller than num_parts=6"):
    init(ReidNet(arch="tiny", num_parts=6))


def test_rgb_stem_affects_only_rgb_rows(net):
  model, variables, rgb, ir = net
  base = model.apply(variables, rgb, ir, train=False)
  bumped = jax.tree.map(lambda p: p * 1.5, variables["params"]["rgb"])
  changed = model.apply({**variables, "params": {**variables["params"], "rgb": bumped}},
                        rgb, ir, train=False)
  for g in ("global", "parts"):
    for k in ("pre", "bn"):
      np.testing.assert_array_equal(changed[g][k][2:], base[g][k][2:])
      assert float(jnp.max(jnp.abs(changed[g][k][:2] - base[g][k][:2]))) > 1e-3


def test_train_mode_shares_batch_statistics_across_modalities(net):
  """One shared pass over [rgb; ir]: in train mode the IR rows depend on the RGB images."""
  model, variables, rgb, ir = net
  apply = jax.jit(lambda v, r, i: model.apply(v, r, i, train=True, mutable=["batch_stats"]))
  base, state = apply(variables, rgb, ir)
  other, other_state = apply(variables, rgb * 2.0 + 1.0, ir)
  assert float(jnp.max(jnp.abs(other["parts"]["bn"][2:] - base["parts"]["bn"][2:]))) > 1e-3
  assert set(state["batch_stats"]) == set(variables["batch_stats"])
  # The ir stream's statistics come from the ir rows only: changing rgb does not move them.
  jax.tree.map(np.testing.assert_array_equal, other_state["batch_stats"]["ir"],
               state["batch_stats"]["ir"])


def _normalised_concat(out):
  blocks = []
  for g in ("global", "parts"):
    bn = np.asarray(out[g]["bn"], np.float64)
    blocks.append((bn / np.linalg.norm(bn, axis=-1, keepdims=True)).reshape(bn.shape[0], -1))
  return np.concatenate(blocks, axis=1)


def test_embed_routes_each_image_through_its_modality(net):
  model, variables, rgb, ir = net
  expected = _normalised_concat(model.apply(variables, rgb, ir, train=False))
  # Interleave the modalities to check per-row routing rather than a block split.
  images = jnp.stack([ir[0], rgb[0], ir[1], rgb[1], ir[2]])
  modality = jnp.asarray([MODALITY_IR, MODALITY_RGB, MODALITY_IR, MODALITY_RGB, MODALITY_IR])
  feats = jax.jit(lambda v, x, m: model.apply(v, x, m, method="embed"))(
      variables, images, modality)
  assert feats.shape == (5, model.feature_dim) and feats.dtype == jnp.float32
  np.testing.assert_allclose(feats, expected[[2, 0, 3, 1, 4]], rtol=1e-5, atol=1e-6)
  # The same IR image routed as RGB gives another feature.
  as_rgb = model.apply(variables, ir[:1], jnp.asarray([MODALITY_RGB]), method="embed")
  assert float(jnp.max(jnp.abs(as_rgb[0] - feats[0]))) > 1e-3


def test_embed_blocks_have_unit_norm(net):
  model, variables, rgb, _ = net
  feats = np.asarray(model.apply(variables, rgb, jnp.zeros(2, jnp.int32), method="embed"))
  blocks = np.split(feats, [64, 64 + 8], axis=1)  # global 64, part 0, part 1
  for block in blocks:
    np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1.0, rtol=1e-5)


def test_fully_shared_model_ignores_modality():
  model = ReidNet(specific_stages=0, head="parts", **SMALL)
  x = _images(4, 3)
  variables = _random_variables(model, x[:1], x[1:], train=False, seed=1)
  a = model.apply(variables, x, jnp.asarray([0, 0, 0]), method="embed")
  b = model.apply(variables, x, jnp.asarray([1, 1, 1]), method="embed")
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, _normalised_concat_parts(model.apply(
      variables, x[:1], x[1:], train=False)), rtol=1e-5, atol=1e-6)


def _normalised_concat_parts(out):
  bn = np.asarray(out["parts"]["bn"], np.float64)
  return (bn / np.linalg.norm(bn, axis=-1, keepdims=True)).reshape(bn.shape[0], -1)


def test_bfloat16_model_outputs_float32():
  model = ReidNet(dtype=jnp.bfloat16, head="both", **SMALL)
  rgb, ir = _images(5, 2), _images(6, 2)
  variables = _random_variables(model, rgb, ir, train=False)
  assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out, state = jax.jit(lambda v: model.apply(v, rgb, ir, train=True,
                                              mutable=["batch_stats"]))(variables)
  assert {v.dtype for v in jax.tree.leaves(out)} == {jnp.dtype(jnp.float32)}
  assert {v.dtype for v in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
  assert bool(jnp.all(jnp.isfinite(out["parts"]["bn"])))
