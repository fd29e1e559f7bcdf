"""AGW non-local blocks (mmm.md §3), their positions and loading, and MMM's GeM form.

The reference for the block is written here in NumPy (float64) from the formula, with the N x N
affinity formed explicitly: theta, phi, g = 1x1 convs C -> 1 (with bias); f = theta phi^T / N
(no softmax); y = f g; out = BN(W y + b) + x. Forwards use the 'tiny' arch at 64 x 32 or a
single stage of it; the big variants only go through `jax.eval_shape`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from maumjax.models import GlobalHead, ReidNet, ResNet, gem_pool, load_backbone
from maumjax.models.heads import POOLS, gem_pool_mean_eps
from maumjax.models.resnet import NonLocal, non_local_positions
from tests.models.test_resnet import _random_variables
from tests.models.test_weights import _torchvision_state_dict

H, W = 64, 32  # tiny: layer2 maps are 8 x 4, layer3 maps 4 x 2


def _norm(train: bool):
  """The BatchNorm policy of `ResNet` (momentum 0.9, eps 1e-5, two-pass variance)."""
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                           use_fast_variance=False)


def _non_local_names(tree) -> list[str]:
  return [k for k in tree if k.startswith("nonlocal")]


def _naive_non_local(x, params, stats, train):
  """NumPy float64 block: returns (output, (new running mean, new running var))."""
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  n = h * w
  flat = x.reshape(b, n, c)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def conv1x1(t, q):
    kernel = q["kernel"].reshape(q["kernel"].shape[-2:])  # [1, 1, in, out] -> [in, out]
    return np.einsum("bni,io->bno", t, kernel) + q["bias"]

  theta, phi, g = conv1x1(flat, p["theta"]), conv1x1(flat, p["phi"]), conv1x1(flat, p["g"])
  assert theta.shape == (b, n, 1)
  f = np.zeros((b, n, n))
  for i in range(n):
    for j in range(n):
      f[:, i, j] = theta[:, i, 0] * phi[:, j, 0] / n
  y = f @ g  # [b, n, 1]
  wy = conv1x1(y, p["W_0"])  # [b, n, c]
  old_mean = np.asarray(stats["mean"], np.float64)
  old_var = np.asarray(stats["var"], np.float64)
  if train:
    mean, var = wy.mean(axis=(0, 1)), wy.var(axis=(0, 1))
    new_stats = (0.9 * old_mean + 0.1 * mean, 0.9 * old_var + 0.1 * var)
  else:
    mean, var = old_mean, old_var
    new_stats = (old_mean, old_var)
  bn = (wy - mean) / np.sqrt(var + 1e-5) * p["W_1"]["scale"] + p["W_1"]["bias"]
  return (bn + flat).reshape(b, h, w, c), new_stats


# --- (a) identity at init -------------------------------------------------------------------------

def test_block_is_the_identity_at_init():
  x = jax.random.normal(jax.random.key(0), (3, 6, 3, 8))
  variables = NonLocal(_norm(False)).init(jax.random.key(1), x)
  params = variables["params"]
  assert set(params) == {"theta", "phi", "g", "W_0", "W_1"}
  np.testing.assert_array_equal(params["W_1"]["scale"], np.zeros(8))
  np.testing.assert_array_equal(params["W_1"]["bias"], np.zeros(8))
  # The convs get torch's default init: uniform within 1/sqrt(fan_in), biases not zero.
  assert params["theta"]["kernel"].shape == (1, 1, 8, 1)
  assert params["W_0"]["kernel"].shape == (1, 1, 1, 8)
  assert float(jnp.max(jnp.abs(params["theta"]["kernel"]))) <= 8 ** -0.5
  assert float(jnp.abs(params["theta"]["bias"][0])) > 0
  np.testing.assert_array_equal(NonLocal(_norm(False)).apply(variables, x), x)
  out, _ = NonLocal(_norm(True)).apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(out, x)


def test_reidnet_with_zero_bn_blocks_equals_reidnet_without_blocks():
  rgb = jax.random.normal(jax.random.key(2), (2, H, W, 3))
  ir = jax.random.normal(jax.random.key(3), (2, H, W, 3))
  plain = ReidNet(arch="tiny", head="global", non_local="none")
  agw = ReidNet(arch="tiny", head="global", non_local="agw")
  variables = _random_variables(agw, rgb, ir, train=False, seed=4)
  # As at init: the blocks' BN scale and bias are zero; everything else stays random.
  shared = variables["params"]["shared"]
  for name in _non_local_names(shared):
    shared[name]["W_1"] = jax.tree.map(jnp.zeros_like, shared[name]["W_1"])
  stripped = jax.tree_util.tree_map(lambda t: t, variables)
  for collection in ("params", "batch_stats"):
    stripped[collection]["shared"] = {
        k: v for k, v in variables[collection]["shared"].items() if not k.startswith("nonlocal")}
  assert set(stripped["params"]["shared"]) == set(
      jax.eval_shape(lambda: plain.init(jax.random.key(0), rgb, ir, train=False))
      ["params"]["shared"])
  for train in (False, True):
    got = agw.apply(variables, rgb, ir, train=train, mutable=["batch_stats"])[0]
    want = plain.apply(stripped, rgb, ir, train=train, mutable=["batch_stats"])[0]
    jax.tree.map(np.testing.assert_array_equal, got, want)


# --- (b) the formula, in train and eval mode --------------------------------------------------------

@pytest.mark.parametrize("train", [False, True])
def test_block_matches_naive_formula(train):
  x = jax.random.normal(jax.random.key(5), (3, 5, 3, 6)) + 0.5
  block = NonLocal(_norm(train))
  variables = _random_variables(NonLocal(_norm(False)), x, seed=6)
  params, stats = variables["params"], variables["batch_stats"]["W_1"]
  assert float(jnp.min(jnp.abs(params["W_1"]["scale"]))) > 0.1  # gamma, beta non-zero
  out, state = block.apply(variables, x, mutable=["batch_stats"])
  want, (mean, var) = _naive_non_local(x, params, stats, train)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(out - x))) > 0.1  # the non-local term is not negligible
  np.testing.assert_allclose(state["batch_stats"]["W_1"]["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["W_1"]["var"], var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_resnet_stage_applies_the_block_after_the_layer_with_its_bn_policy(train):
  """ResNet('tiny', layer2 only, 'agw') = naive block on ResNet('tiny', layer2 only, 'none')."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(7), (2, 16, 8, 8)))
  agw = ResNet("tiny", start=2, stop=3, non_local="agw")
  variables = _random_variables(agw, x, train=False, seed=8)
  assert _non_local_names(variables["params"]) == ["nonlocal2_0"]
  plain_vars = {c: {"layer2_0": t["layer2_0"]} for c, t in variables.items()}
  before = ResNet("tiny", start=2, stop=3).apply(plain_vars, x, train=False)
  out, state = agw.apply(variables, x, train=train, mutable=["batch_stats"])
  nl_params = variables["params"]["nonlocal2_0"]
  nl_stats = variables["batch_stats"]["nonlocal2_0"]["W_1"]
  if train:  # layer2_0's own BNs see the batch, so recompute its output in train mode
    before = ResNet("tiny", start=2, stop=3).apply(plain_vars, x, train=True,
                                                   mutable=["batch_stats"])[0]
  want, (mean, var) = _naive_non_local(before, nl_params, nl_stats, train)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["nonlocal2_0"]["W_1"]["mean"], mean,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["nonlocal2_0"]["W_1"]["var"], var,
                             rtol=1e-4, atol=1e-6)


def test_block_bn_is_synchronised_under_shard_map():
  devices = jax.devices()
  if len(devices) < 4:
    pytest.skip("needs the 4 fake CPU devices from conftest.py")
  x = jax.nn.relu(jax.random.normal(jax.random.key(9), (8, 16, 8, 8)))
  plain = ResNet("tiny", start=2, stop=3, non_local="agw")
  synced = ResNet("tiny", start=2, stop=3, non_local="agw", axis_name="data")
  variables = _random_variables(plain, x, train=False, seed=10)
  ref, ref_state = plain.apply(variables, x, train=True, mutable=["batch_stats"])
  mesh = Mesh(np.array(devices[:4]), ("data",))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")),
                     out_specs=(P("data"), P()))
  def step(v, xs):
    return synced.apply(v, xs, train=True, mutable=["batch_stats"])

  out, state = jax.jit(step)(variables, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state["batch_stats"]["nonlocal2_0"], ref_state["batch_stats"]["nonlocal2_0"])


# --- (c) positions --------------------------------------------------------------------------------

def test_positions_resnet50():
  assert non_local_positions("resnet50") == {2: (2, 3), 3: (3, 4, 5)}
  assert non_local_positions("resnet50", "none") == {}
  x = jnp.zeros((1, H, W, 3))
  model = ReidNet(arch="resnet50", specific_stages=1, head="global", non_local="agw")
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      calls.append(context.module.name)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x, train=False))
  shared = variables["params"]["shared"]
  # Each block runs right after its residual block; none in layer1 or layer4.
  order = [k for k in calls if k and k.startswith(("layer2", "layer3", "nonlocal"))]
  assert order == ["layer2_0", "layer2_1", "layer2_2", "nonlocal2_2", "layer2_3", "nonlocal2_3",
                   "layer3_0", "layer3_1", "layer3_2", "layer3_3", "nonlocal3_3", "layer3_4",
                   "nonlocal3_4", "layer3_5", "nonlocal3_5"]
  assert not _non_local_names(variables["params"]["rgb"])
  assert not _non_local_names(variables["params"]["ir"])
  assert set(_non_local_names(variables["batch_stats"]["shared"])) == set(
      _non_local_names(shared))
  assert shared["nonlocal2_2"]["theta"]["kernel"].shape == (1, 1, 512, 1)
  assert shared["nonlocal3_5"]["W_1"]["scale"].shape == (1024,)
  # 7C + 3 parameters per block: theta, phi, g (C + 1 each), W_0 (2C), W_1 (2C).
  def count(tree):
    return sum(int(np.prod(t.shape)) for t in jax.tree.leaves(tree))

  plain = jax.eval_shape(lambda: ReidNet(arch="resnet50", head="global").init(
      jax.random.key(0), x, x, train=False))
  assert count(variables["params"]) - count(plain["params"]) == 2 * (7 * 512 + 3) + 3 * (
      7 * 1024 + 3)


@pytest.mark.parametrize("arch, names", [
    ("tiny", ["nonlocal2_0", "nonlocal3_0"]),
    ("resnet18", ["nonlocal2_0", "nonlocal2_1", "nonlocal3_0", "nonlocal3_1"])])
def test_positions_clip_to_small_archs(arch, names):
  x = jnp.zeros((1, H, W, 3))
  model = ResNet(arch, non_local="agw")
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]
  assert _non_local_names(params) == names
  # A range without layer2 and layer3 creates none; one with layer3 only, layer3's.
  tail = jax.eval_shape(lambda: ResNet(arch, start=3, stop=5, non_local="agw").init(
      jax.random.key(0), jnp.zeros((1, 4, 2, 128 if arch == "resnet18" else 16)),
      train=False))["params"]
  assert _non_local_names(tail) == [n for n in names if n.startswith("nonlocal3")]


def test_unknown_non_local_raises():
  x = jnp.zeros((1, H, W, 3))
  with pytest.raises(ValueError, match=r"unknown non_local 'yes'; use one of \('none', 'agw'\)"):
    jax.eval_shape(lambda: ReidNet(arch="tiny", non_local="yes", head="global").init(
        jax.random.key(0), x, x, train=False))
  with pytest.raises(ValueError, match="unknown non_local 'AGW'"):
    jax.eval_shape(lambda: ResNet("tiny", non_local="AGW").init(
        jax.random.key(0), x, train=False))


# --- (d) ReidNet forward, embed, jit, gradients ---------------------------------------------------

def test_reidnet_agw_forward_embed_and_gradient():
  model = ReidNet(arch="tiny", specific_stages=1, head="global", pool="gem_mean_eps",
                  non_local="agw")
  rgb = jax.random.normal(jax.random.key(11), (2, H, W, 3))
  ir = jax.random.normal(jax.random.key(12), (3, H, W, 3))
  variables = _random_variables(model, rgb, ir, train=False, seed=13)

  def loss(params):
    o, state = model.apply({**variables, "params": params}, rgb, ir, train=True,
                           mutable=["batch_stats"])
    return jnp.sum(o["global"]["bn"] ** 2) + jnp.sum(o["global"]["pre"]), (o, state)

  (_, (out, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"])
  assert out["global"]["pre"].shape == out["global"]["bn"].shape == (5, 1, 64)
  assert set(_non_local_names(state["batch_stats"]["shared"])) == {"nonlocal2_0", "nonlocal3_0"}
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  images = jnp.concatenate([rgb, ir])
  feats = jax.jit(lambda v: model.apply(v, images, jnp.asarray([0, 0, 1, 1, 1]),
                                        method="embed"))(variables)
  assert feats.shape == (5, model.feature_dim) == (5, 64)
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
  nl = grads["shared"]["nonlocal2_0"]
  for name in ("theta", "phi", "g", "W_0"):  # BN scale is non-zero: gradients reach the convs
    assert float(jnp.max(jnp.abs(nl[name]["kernel"]))) > 0


def test_bfloat16_blocks_keep_float32_params():
  x = jax.random.normal(jax.random.key(14), (2, 16, 8, 8))
  model = ResNet("tiny", start=2, stop=3, non_local="agw", dtype=jnp.bfloat16)
  variables = _random_variables(model, x, train=False)
  assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out.dtype == jnp.bfloat16
  assert {v.dtype for v in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
  ref = ResNet("tiny", start=2, stop=3, non_local="agw").apply(variables, x, train=False)
  low = model.apply(variables, x, train=False).astype(jnp.float32)
  assert float(jnp.max(jnp.abs(low - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


# --- (e) GeM as MMM codes it ----------------------------------------------------------------------

def test_gem_mean_eps_matches_numpy():
  assert POOLS == ("gem", "avg", "gem_mean_eps")
  x = np.maximum(np.random.default_rng(15).normal(size=(3, 6, 3, 5)), 0.0).astype(np.float32)
  x[:, :, :, 0] = 0.0  # an all-zero channel: the eps decides its value
  x[0, :, :, 1] = 1e-7  # below 'gem''s clamp
  want = (np.mean(x.astype(np.float64) ** 3, axis=(1, 2)) + 1e-12) ** (1 / 3)
  got = gem_pool_mean_eps(jnp.asarray(x))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got[:, 0], 1e-4, rtol=1e-5)
  np.testing.assert_allclose(gem_pool(jnp.asarray(x))[:, 0], 1e-6, rtol=1e-5)  # default kept
  # The head and ReidNet pick it by name; the gradient is finite at an all-zero channel.
  head = GlobalHead(pool="gem_mean_eps")
  variables = head.init(jax.random.key(0), x, train=False)
  np.testing.assert_allclose(head.apply(variables, x, train=False)["pre"][:, 0], want,
                             rtol=1e-5)
  grad = jax.grad(lambda t: jnp.sum(gem_pool_mean_eps(t)))(jnp.asarray(x))
  assert bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_array_equal(grad[..., 0], 0.0)


# --- (f) loading torchvision weights with non-local blocks present ---------------------------------

@pytest.mark.parametrize("source", ["mapping", "safetensors"])
def test_load_backbone_leaves_non_local_blocks_at_init(source, tmp_path):
  sd = _torchvision_state_dict("tiny", seed=16)
  rgb = jax.random.normal(jax.random.key(17), (2, H, W, 3))
  ir = jax.random.normal(jax.random.key(18), (2, H, W, 3))
  agw = ReidNet(arch="tiny", specific_stages=1, head="global", non_local="agw")
  plain = ReidNet(arch="tiny", specific_stages=1, head="global")
  variables = _random_variables(agw, rgb, ir, train=False, seed=19)
  shared = variables["params"]["shared"]
  for name in _non_local_names(shared):  # the zero BN of a fresh init
    shared[name]["W_1"] = jax.tree.map(jnp.zeros_like, shared[name]["W_1"])
  if source == "safetensors":
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path))
    checkpoint = path
  else:
    checkpoint = sd
  loaded, report = load_backbone(variables, checkpoint, model=agw)
  plain_vars = _random_variables(plain, rgb, ir, train=False, seed=20)
  plain_loaded, plain_report = load_backbone(plain_vars, sd, model=plain)
  assert report.loaded == plain_report.loaded and report.unused == ("fc.bias", "fc.weight")
  assert plain_report.kept == ()
  # kept: every leaf of both blocks, params (10 per block) and running statistics (2 per block).
  assert len(report.kept) == 2 * 12
  assert set(report.kept) == {
      f"{c}/shared/{name}/{'/'.join(str(getattr(k, 'key', k)) for k in path)}"
      for c in ("params", "batch_stats") for name in ("nonlocal2_0", "nonlocal3_0")
      for path, _ in jax.tree_util.tree_leaves_with_path(variables[c]["shared"][name])}
  for c in ("params", "batch_stats"):
    for name in ("nonlocal2_0", "nonlocal3_0"):
      jax.tree.map(np.testing.assert_array_equal, loaded[c]["shared"][name],
                   variables[c]["shared"][name])
    strip = lambda tree: {k: v for k, v in tree.items()  # noqa: E731
                          if not k.startswith("nonlocal")}
    jax.tree.map(np.testing.assert_array_equal, strip(loaded[c]["shared"]),
                 plain_loaded[c]["shared"])
  np.testing.assert_array_equal(loaded["params"]["shared"]["layer2_0"]["conv1"]["kernel"],
                                sd["layer2.0.conv1.weight"].transpose(2, 3, 1, 0))
  # With the blocks at their (identity) init, the loaded model is the loaded plain model.
  images = jnp.concatenate([rgb, ir])
  modality = jnp.asarray([0, 0, 1, 1])
  head = {c: {"global_head": plain_loaded[c]["global_head"]} for c in plain_loaded}
  merged = {c: {**loaded[c], **head[c]} for c in loaded}
  np.testing.assert_allclose(agw.apply(merged, images, modality, method="embed"),
                             plain.apply(plain_loaded, images, modality, method="embed"),
                             rtol=1e-6, atol=1e-6)
