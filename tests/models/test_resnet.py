"""ResNet: torchvision parameter counts, output sizes, stage ranges, padding, BN, torch parity.

Big variants only go through `jax.eval_shape`; real forwards use the 'tiny' arch at 64x32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from maumjax.models import ReidNet, load_backbone, read_state_dict, resnet, torchvision_to_flax
from maumjax.models.resnet import ARCHS, ResNet, feature_map_size, stage_output_channels


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _abstract_init(model, shape):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False))


@pytest.mark.parametrize("arch, expected", [("resnet50", 25_557_032), ("resnet18", 11_689_512)])
def test_param_count_matches_torchvision(arch, expected):
  variables = _abstract_init(ResNet(arch, num_classes=1000), (1, 224, 224, 3))
  assert _count(variables["params"]) == expected
  # BN running statistics: one mean and one var per BN channel.
  bn_channels = sum(x.shape[0] for path, x in jax.tree_util.tree_leaves_with_path(
      variables["params"]) if path[-1].key == "scale")
  assert _count(variables["batch_stats"]) == 2 * bn_channels


@pytest.mark.parametrize("last_stride, hw", [(1, (18, 9)), (2, (9, 5))])
def test_output_size_at_288x144(last_stride, hw):
  model = ResNet("resnet50", last_stride=last_stride)
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, 288, 144, 3)), train=False))[0]
  assert out.shape == (2, *hw, 2048)
  assert feature_map_size(288, 144, last_stride) == hw


def test_stage_channels_and_names():
  assert [stage_output_channels("resnet50", s) for s in range(5)] == [64, 256, 512, 1024, 2048]
  assert [stage_output_channels("resnet18", s) for s in range(5)] == [64, 64, 128, 256, 512]
  assert stage_output_channels("tiny") == 64
  assert [stage_output_channels("small", k) for k in range(5)] == [16, 16, 32, 64, 128]
  params = _abstract_init(ResNet("resnet50"), (1, 64, 32, 3))["params"]
  expected = {"conv1", "bn1"} | {f"layer{s}_{i}" for s, n in zip(range(1, 5), (3, 4, 6, 3))
                                 for i in range(n)}
  assert set(params) == expected
  assert set(params["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                     "downsample_0", "downsample_1"}
  assert "downsample_0" not in params["layer1_1"]
  # v1.5: the 3x3 conv carries the stride, so it is the only 3x3 kernel in a bottleneck.
  assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  trunk = _abstract_init(ResNet("resnet18", start=2, stop=4), (1, 16, 8, 64))["params"]
  assert set(trunk) == {"layer2_0", "layer2_1", "layer3_0", "layer3_1"}


def test_bad_configuration_raises():
  with pytest.raises(ValueError, match=r"unknown ResNet arch 'resnet101'.*resnet18"):
    _abstract_init(ResNet("resnet101"), (1, 64, 32, 3))
  with pytest.raises(ValueError, match=r"stage range \[3, 3\)"):
    _abstract_init(ResNet("tiny", start=3, stop=3), (1, 8, 4, 16))
  with pytest.raises(ValueError, match="expects NHWC input with 8 channels"):
    _abstract_init(ResNet("tiny", start=1), (1, 16, 8, 3))
  with pytest.raises(ValueError, match="last_stride"):
    _abstract_init(ResNet("tiny", last_stride=3), (1, 64, 32, 3))


def _random_variables(model, *args, seed=0, **kwargs):
  """Variables with `model.init`'s structure and random values, built without running init.

  Real init compiles every initializer (seconds on CPU); shapes from `eval_shape` plus NumPy
  values are instant. BN statistics and affine parameters are random, so eval-mode BN is not
  the identity.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)
  def leaf(path, s):
    name = path[-1].key
    if name == "var":
      value = rng.uniform(0.5, 2.0, s.shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, s.shape)
    elif name in ("mean", "bias"):
      value = rng.normal(0.0, 0.2, s.shape)
    else:  # kernels, He-normal over the input fan so activations stay O(1)
      fan_in = s.shape[-2] if len(s.shape) == 3 else np.prod(s.shape[:-1])
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape)
    return jnp.asarray(value, s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _split(variables, names):
  return {c: {k: v for k, v in tree.items() if k in names} for c, tree in variables.items()}


@pytest.fixture(scope="module")
def tiny():
  model = ResNet("tiny")
  x = jax.random.normal(jax.random.key(1), (3, 64, 32, 3))
  variables = _random_variables(model, x, train=False)
  return model, variables, x


@pytest.mark.parametrize("k", [1, 2, 4])
def test_stage_ranges_compose(tiny, k):
  model, variables, x = tiny
  head_names = {"conv1", "bn1"} | {f"layer{s}_0" for s in range(1, k)}
  tail_names = {f"layer{s}_0" for s in range(k, 5)}
  head, tail = ResNet("tiny", start=0, stop=k), ResNet("tiny", start=k, stop=5)
  full = model.apply(variables, x, train=False)
  mid = head.apply(_split(variables, head_names), x, train=False)
  assert mid.shape[-1] == stage_output_channels("tiny", k - 1)
  np.testing.assert_allclose(tail.apply(_split(variables, tail_names), mid, train=False), full,
                             rtol=1e-5, atol=1e-5)
  # Train mode: each BN sees the same batch, so the updated statistics agree too.
  full_t, full_stats = model.apply(variables, x, train=True, mutable=["batch_stats"])
  mid_t, head_stats = head.apply(_split(variables, head_names), x, train=True,
                                 mutable=["batch_stats"])
  tail_t, tail_stats = tail.apply(_split(variables, tail_names), mid_t, train=True,
                                  mutable=["batch_stats"])
  np.testing.assert_allclose(tail_t, full_t, rtol=1e-5, atol=1e-5)
  merged = {**head_stats["batch_stats"], **tail_stats["batch_stats"]}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               merged, full_stats["batch_stats"])


def _naive_conv(x, kernel, stride, pad):
  """Direct NHWC convolution with symmetric zero padding (torch semantics)."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw, _, cout = kernel.shape
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, cout))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel)
  return out


def _naive_maxpool(x, size=3, stride=2, pad=1):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
  oh, ow = (x.shape[1] - size) // stride + 1, (x.shape[2] - size) // stride + 1
  return np.stack([np.stack([x[:, i * stride:i * stride + size, j * stride:j * stride + size]
                             .max(axis=(1, 2)) for j in range(ow)], 1) for i in range(oh)], 1)


def test_strided_convs_and_pool_pad_symmetrically(tiny):
  """Even sizes with stride 2 are where Flax 'SAME' (pads 0 before, 1 after) differs from torch."""
  model, variables, x = tiny
  x = np.asarray(x)[:, :16, :12]
  _, inter = model.apply(variables, x, train=False, capture_intermediates=True)
  inter = inter["intermediates"]
  params = variables["params"]
  stem = np.asarray(inter["conv1"]["__call__"][0])
  np.testing.assert_allclose(stem, _naive_conv(x, np.asarray(params["conv1"]["kernel"]), 2, 3),
                             rtol=1e-4, atol=1e-4)
  bn1 = np.asarray(inter["bn1"]["__call__"][0])
  pooled = _naive_maxpool(np.maximum(bn1, 0))
  layer1_in = pooled  # layer1_0 of 'tiny' has no downsample: its input is the pooled stem
  np.testing.assert_allclose(
      np.asarray(inter["layer1_0"]["conv1"]["__call__"][0]),
      _naive_conv(layer1_in, np.asarray(params["layer1_0"]["conv1"]["kernel"]), 1, 1),
      rtol=1e-4, atol=1e-4)
  block_in = np.asarray(inter["layer1_0"]["__call__"][0])  # input of layer2_0
  assert block_in.shape[1:3] == (4, 3)
  for name, stride, pad in (("conv1", 2, 1), ("downsample_0", 2, 0)):
    kernel = np.asarray(params["layer2_0"][name]["kernel"])
    np.testing.assert_allclose(np.asarray(inter["layer2_0"][name]["__call__"][0]),
                               _naive_conv(block_in, kernel, stride, pad), rtol=1e-4, atol=1e-4)


def test_last_stride_sets_layer4_strides():
  x = jnp.zeros((1, 64, 32, 3))
  for last_stride, hw in ((1, (4, 2)), (2, (2, 1))):
    model = ResNet("tiny", last_stride=last_stride)
    out = jax.eval_shape(lambda m=model: m.init_with_output(jax.random.key(0), x, train=False))
    assert out[0].shape == (1, *hw, 64)
    assert feature_map_size(64, 32, last_stride) == hw


def test_batchnorm_momentum_and_init():
  model = ResNet("tiny", start=0, stop=1)
  x = jax.random.normal(jax.random.key(2), (4, 16, 8, 3)) + 1.0
  variables = model.init(jax.random.key(0), x, train=False)
  assert float(jnp.max(jnp.abs(variables["params"]["bn1"]["scale"] - 1))) == 0.0
  assert float(jnp.max(jnp.abs(variables["params"]["bn1"]["bias"]))) == 0.0
  # Kaiming normal, fan_out = 7 * 7 * 8: std sqrt(2 / 392) ~= 0.0714.
  std = float(jnp.std(variables["params"]["conv1"]["kernel"]))
  assert 0.06 < std < 0.085
  _, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                         capture_intermediates=True)
  conv = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
  new = state["batch_stats"]["bn1"]
  np.testing.assert_allclose(new["mean"], 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 + 0.1 * conv.var(axis=(0, 1, 2)), rtol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_stats(tiny):
  _, variables, x = tiny
  model = ResNet("tiny", dtype=jnp.bfloat16)
  shapes = _abstract_init(model, x.shape)
  assert {v.dtype for v in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  out, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out.dtype == jnp.bfloat16
  assert {v.dtype for v in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
  ref = ResNet("tiny").apply(variables, x, train=False)
  low = model.apply(variables, x, train=False).astype(jnp.float32)
  assert float(jnp.max(jnp.abs(low - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_axis_name_synchronises_batch_statistics():
  """shard_map over 4 devices with axis_name equals one global-batch pass (synchronised BN)."""
  devices = jax.devices()
  if len(devices) < 4:
    pytest.skip("needs the 4 fake CPU devices from conftest.py")
  x = jax.random.normal(jax.random.key(3), (8, 16, 8, 3))
  plain, synced = ResNet("tiny", stop=2), ResNet("tiny", stop=2, axis_name="data")
  variables = _random_variables(plain, x, train=False)
  ref, ref_state = plain.apply(variables, x, train=True, mutable=["batch_stats"])
  mesh = Mesh(np.array(devices[:4]), ("data",))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")),
                     out_specs=(P("data"), P()))
  def step(v, xs):
    return synced.apply(v, xs, train=True, mutable=["batch_stats"])

  out, state = jax.jit(step)(variables, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state, ref_state)


def test_archs_is_a_plain_dict():
  assert type(ARCHS) is dict and set(ARCHS) == {"resnet50", "resnet18", "tiny", "small"}
  with pytest.raises(ValueError, match="unknown ResNet arch"):
    resnet.stage_output_channels("resnet34")


# Torch parity: a torchvision-layout ResNet written here in plain torch (torchvision is not
# needed), saved with torch.save (zip format) and loaded through maumjax.models.weights.
def _torch_resnet(torch, arch: str, last_stride: int):
  nn = torch.nn

  class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, down):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU()
      self.downsample = down

    def forward(self, x):
      y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
      return self.relu(y + (x if self.downsample is None else self.downsample(x)))

  class Bottle(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, down):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.relu = nn.ReLU()
      self.downsample = down

    def forward(self, x):
      y = self.relu(self.bn1(self.conv1(x)))
      y = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(y)))))
      return self.relu(y + (x if self.downsample is None else self.downsample(x)))

  block, layers = {"resnet18": (Basic, (2, 2, 2, 2)), "resnet50": (Bottle, (3, 4, 6, 3))}[arch]

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU()
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      cin = 64
      for i, n in enumerate(layers):
        planes, stride = 64 * 2 ** i, (1, 2, 2, last_stride)[i]
        blocks = []
        for j in range(n):
          s = stride if j == 0 else 1
          down = None
          if j == 0 and (s != 1 or cin != planes * block.expansion):
            down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, s, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
          blocks.append(block(cin, planes, s, down))
          cin = planes * block.expansion
        setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
      self.fc = nn.Linear(cin, 10)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      fmap = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return fmap, self.fc(fmap.mean(dim=(2, 3)))

  return Net()


@pytest.mark.torch
@pytest.mark.parametrize("arch, last_stride", [("resnet18", 1), ("resnet50", 2)])
def test_torch_parity(arch, last_stride, tmp_path):
  torch = pytest.importorskip("torch", exc_type=ImportError)
  torch.manual_seed(0)
  net = _torch_resnet(torch, arch, last_stride).eval()
  with torch.no_grad():  # non-trivial BN: random statistics and affine parameters
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
  path = tmp_path / f"{arch}.pth"
  torch.save(net.state_dict(), path)
  sd = read_state_dict(path)
  reference = torch.load(path, map_location="cpu", weights_only=True)
  assert set(sd) == set(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(sd[key], value.numpy(), err_msg=key)

  x = np.random.default_rng(0).normal(size=(2, 3, 64, 32)).astype(np.float32)
  with torch.no_grad():
    fmap, logits = (t.numpy() for t in net(torch.from_numpy(x)))
  pooled = fmap.mean(axis=(2, 3))
  variables = torchvision_to_flax(sd)
  fc = variables["params"]["fc"]
  nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  if arch == "resnet50":  # the bare backbone, feature map compared position by position
    backbone = {c: {k: t for k, t in tree.items() if k != "fc"} for c, tree in variables.items()}
    ours = jax.jit(lambda v: ResNet(arch, last_stride=last_stride).apply(v, nhwc, train=False))(
        backbone)
    np.testing.assert_allclose(ours, fmap.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    ours_pooled = np.asarray(ours).mean(axis=(1, 2))
  else:  # the full ReidNet path: load_backbone from the .pth into both streams
    model = ReidNet(arch=arch, last_stride=last_stride, head="global", pool="avg")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), nhwc[:1], nhwc[1:],
                                               train=False))
    fresh = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    loaded, report = load_backbone(fresh, path, model=model)
    assert report.unused == ("fc.bias", "fc.weight")
    out = jax.jit(lambda v: model.apply(v, nhwc[:1], nhwc[1:], train=False))(loaded)
    ours_pooled = np.asarray(out["global"]["pre"][:, 0])  # row 0 via rgb, row 1 via ir
  np.testing.assert_allclose(ours_pooled, pooled, rtol=1e-4, atol=1e-4)
  # fc mapping (transpose): logits from our pooled features through the converted fc.
  np.testing.assert_allclose(ours_pooled @ fc["kernel"] + fc["bias"], logits,
                             rtol=1e-4, atol=1e-4)
