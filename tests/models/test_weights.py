"""Checkpoint reading, conversion and loading; the restricted unpickler.

The torchvision-keyed state dicts are generated here from the Flax model's own variable tree by
an inverse mapping written in this file, independently of `maumjax.models.weights`. `.pth`
files are written without torch: a small pickler emits the same opcodes as `torch.save`
(`torch._utils._rebuild_tensor_v2` reductions over persistent `('storage', torch.FloatStorage,
key, 'cpu', numel)` ids) into a zip with `archive/data.pkl`, `archive/data/<key>`,
`archive/byteorder` and `archive/version`. The parity test against real torch is in
test_resnet.py.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import io
import pickle
import zipfile
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from maumjax.models import (
  ReidNet,
  ResNet,
  load_backbone,
  read_state_dict,
  torchvision_to_flax,
  weights,
)

H, W = 64, 32


# --- torchvision-keyed state dicts built from the Flax tree (test-local inverse mapping) -------

def _torch_key(path: tuple[str, ...]) -> str:
  names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}
  parts = []
  for p in path[:-1]:
    if p.startswith("layer"):
      parts += p.split("_")  # layer2_0 -> layer2, 0
    elif p.startswith("downsample_"):
      parts += ["downsample", p[-1]]
    else:
      parts.append(p)
  return ".".join(parts + [names[path[-1]]])


def _to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if path[-1] == "kernel":
    return value.T  # fc (in, out) -> (out, in)
  return value


def _leaves(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _torchvision_state_dict(arch: str, seed: int = 0, fill=None) -> dict[str, np.ndarray]:
  """Random torchvision-named tensors for `arch`, with fc (10 classes) and num_batches_tracked."""
  shapes = jax.eval_shape(lambda: ResNet(arch, num_classes=10).init(
      jax.random.key(0), jnp.zeros((1, H, W, 3)), train=False))
  rng = np.random.default_rng(seed)
  sd = {}
  for collection in ("params", "batch_stats"):
    for path, s in _leaves(shapes[collection]):
      if fill is not None:
        value = np.full(s.shape, fill, np.float32)
      elif path[-1] == "var":
        value = rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
      elif path[-1] == "kernel":
        fan_in = np.prod(s.shape[:-1])
        value = rng.normal(0, np.sqrt(2 / fan_in), s.shape).astype(np.float32)
      else:
        value = rng.normal(0.3 if path[-1] == "scale" else 0.0, 0.3, s.shape).astype(np.float32)
      # Contiguous, as torch tensors saved from a model are (safetensors.numpy ignores strides).
      sd[_torch_key(path)] = np.ascontiguousarray(_to_torch_layout(path, value))
      if path[-1] == "mean":
        sd[_torch_key(path).replace("running_mean", "num_batches_tracked")] = np.array(
            7, np.int64)
  return sd


# --- a torch zip-format writer without torch ----------------------------------------------------

class _Global:
  """Pickled as `GLOBAL module name`; callable only so that save_reduce accepts it."""

  def __init__(self, module: str, name: str) -> None:
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("never called: only pickled")


class _Storage:
  def __init__(self, key: str, kind: str, numel: int) -> None:
    self.key, self.kind, self.numel = key, kind, numel


class _Tensor:
  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
    self.args = (storage, offset, size, stride)

  def __reduce__(self):
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            self.args + (False, collections.OrderedDict()))


class _Call:
  """Reduces to `module.name(*args)`: the payload of a hostile checkpoint."""

  def __init__(self, module: str, name: str, *args) -> None:
    self.func, self.args = _Global(module, name), args

  def __reduce__(self):
    return self.func, self.args


class _TorchPickler(pickle._Pickler):
  dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

  def _save_global(self, obj: _Global) -> None:
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_Global] = _save_global

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ("storage", _Global("torch", obj.kind), obj.key, "cpu", obj.numel)
    return None


_KINDS = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
          np.dtype(np.int64): "LongStorage", np.dtype(np.float64): "DoubleStorage"}


def _write_pth(path, obj, blobs: dict[str, bytes] | None = None) -> None:
  """Writes a torch-zip checkpoint whose pickle holds `obj` (arrays become tensors)."""
  blobs = dict(blobs or {})

  def convert(value):
    if isinstance(value, np.ndarray):
      key = str(len(blobs))
      blobs[key] = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
      storage = _Storage(key, _KINDS[value.dtype], value.size)
      strides = tuple(int(np.prod(value.shape[i + 1:])) for i in range(value.ndim))
      return _Tensor(storage, 0, value.shape, strides)
    if isinstance(value, dict):
      return collections.OrderedDict((k, convert(v)) for k, v in value.items())
    return value

  converted = convert(obj)
  with open(path, "wb") as f, zipfile.ZipFile(f, "w") as zf:
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(converted)
    zf.writestr("archive/data.pkl", buffer.getvalue())
    zf.writestr("archive/byteorder", "little")
    for key, blob in blobs.items():
      zf.writestr(f"archive/data/{key}", blob)
    zf.writestr("archive/version", "3\n")


# --- reading --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd():
  return _torchvision_state_dict("tiny")


@pytest.fixture(scope="module")
def tiny_files(tiny_sd, tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpt")
  files = {"safetensors": root / "tiny.safetensors", "npz": root / "tiny.npz",
           "pth": root / "tiny.pth"}
  save_file(tiny_sd, str(files["safetensors"]))
  np.savez(files["npz"], **tiny_sd)
  _write_pth(files["pth"], tiny_sd)
  return files


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "pth"])
def test_read_state_dict_formats(tiny_sd, tiny_files, fmt):
  got = read_state_dict(tiny_files[fmt])
  assert set(got) == set(tiny_sd)
  for key, value in tiny_sd.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  assert weights.sha256(tiny_files[fmt]) == hashlib.sha256(
      tiny_files[fmt].read_bytes()).hexdigest()


def test_pth_views_offsets_dtypes_and_wrappers(tmp_path):
  base = np.arange(12, dtype=np.float32)
  blobs = {"0": base.tobytes(), "1": np.arange(3, dtype=np.float16).tobytes()}
  storage = _Storage("0", "FloatStorage", 12)
  obj = {"epoch": 3, "state_dict": collections.OrderedDict([
      ("t", _Tensor(storage, 0, (3, 4), (1, 3))),  # a transposed view of a 4 x 3 tensor
      ("o", _Tensor(storage, 5, (2, 2), (2, 1))),  # offset 5, skipping every other column
      ("h", _Tensor(_Storage("1", "HalfStorage", 3), 0, (3,), (1,))),
      ("s", _Tensor(storage, 7, (), ()))])}
  path = tmp_path / "views.pth"
  _write_pth(path, obj, blobs)
  got = read_state_dict(path)
  np.testing.assert_array_equal(got["t"], base.reshape(4, 3).T)
  np.testing.assert_array_equal(got["o"], [[5, 6], [7, 8]])
  assert got["h"].dtype == np.float16 and got["s"].shape == () and got["s"] == 7
  assert got["t"].flags.c_contiguous


def test_pth_tensor_outside_its_storage_is_refused(tmp_path):
  path = tmp_path / "oob.pth"
  storage = _Storage("0", "FloatStorage", 4)
  _write_pth(path, {"x": _Tensor(storage, 2, (100,), (1000,))},
             {"0": np.zeros(4, np.float32).tobytes()})
  with pytest.raises(weights.WeightsError, match="reads past its storage"):
    read_state_dict(path)


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval")])
def test_hostile_pth_is_refused_without_running_code(tmp_path, module, name):
  marker = tmp_path / "pwned"
  payload = (f"touch {marker}" if name == "system"
             else f"__import__('pathlib').Path({str(marker)!r}).touch()")
  path = tmp_path / "evil.pth"
  _write_pth(path, {"conv1.weight": _Call(module, name, payload)})
  with pytest.raises(weights.WeightsError,
                     match=rf"{module}\.{name}.*not a plain tensor"):
    read_state_dict(path)
  assert not marker.exists()
  # Control: the same payload does run under the unrestricted unpickler.
  with zipfile.ZipFile(path) as zf:
    pickle.loads(zf.read("archive/data.pkl"))
  assert marker.exists()


def test_pickled_module_is_refused(tmp_path):
  path = tmp_path / "model.pth"
  _write_pth(path, _Call("torch.nn.modules.conv", "Conv2d", 3, 8, 3))
  with pytest.raises(weights.WeightsError, match=r"torch\.nn\.modules\.conv\.Conv2d"):
    read_state_dict(path)


def test_legacy_missing_and_unknown_files(tmp_path):
  legacy = tmp_path / "resnet50-19c8e357.pth"
  # Legacy torch.save: pickle protocol 2, then the magic number 0x1950a86a20f9469cfc6c.
  legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02}q\x00.")
  with pytest.raises(weights.WeightsError,
                     match=r"legacy.*19c8e357\.safetensors.*resnet50-0676ba61\.pth"):
    read_state_dict(legacy)
  with pytest.raises(weights.WeightsError, match="nothing.pth"):
    read_state_dict(tmp_path / "nothing.pth")
  odd = tmp_path / "weights.h5"
  odd.write_bytes(b"x")
  with pytest.raises(ValueError, match=r"unknown extension '\.h5'"):
    read_state_dict(odd)


# --- conversion and loading -----------------------------------------------------------------------

def test_torchvision_to_flax_layouts(tiny_sd):
  flax = torchvision_to_flax(tiny_sd)
  np.testing.assert_array_equal(flax["params"]["conv1"]["kernel"],
                                tiny_sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flax["params"]["layer2_0"]["downsample_0"]["kernel"][0, 0],
                                tiny_sd["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(flax["batch_stats"]["layer3_0"]["downsample_1"]["var"],
                                tiny_sd["layer3.0.downsample.1.running_var"])
  np.testing.assert_array_equal(flax["params"]["bn1"]["scale"], tiny_sd["bn1.weight"])
  np.testing.assert_array_equal(flax["params"]["fc"]["kernel"], tiny_sd["fc.weight"].T)
  assert "num_batches_tracked" not in str(flax)
  with pytest.raises(ValueError, match="'layer1.0.conv1.bias'"):
    torchvision_to_flax({"layer1.0.conv1.bias": np.zeros(8, np.float32)})
  with pytest.raises(ValueError, match="'head.weight'"):
    torchvision_to_flax({"head.weight": np.zeros((2, 2), np.float32)})


def test_flax_to_torchvision_inverts_the_conversion(tiny_sd, tmp_path):
  """Back to torchvision layout: the test's own key mapping built `tiny_sd` from a Flax tree;
  the library's inverse must give those exact tensors back, and its files read back too."""
  back = weights.flax_to_torchvision(torchvision_to_flax(tiny_sd))
  expected = {k: v for k, v in tiny_sd.items() if not k.endswith("num_batches_tracked")}
  assert sorted(back) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  for suffix in (".npz", ".safetensors"):
    path = weights.save_state_dict(tmp_path / f"backbone{suffix}", back)
    again = read_state_dict(path)
    assert sorted(again) == sorted(back)
    np.testing.assert_array_equal(again["layer2.0.downsample.0.weight"],
                                  back["layer2.0.downsample.0.weight"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.npz", "backbone.safetensors"]
  with pytest.raises(ValueError, match="write a .safetensors or .npz"):
    weights.save_state_dict(tmp_path / "backbone.pth", back)
  non_local = jax.eval_shape(lambda: ResNet("tiny", non_local="agw").init(
      jax.random.key(0), jnp.zeros((1, H, W, 3)), train=False))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), non_local)
  with pytest.raises(ValueError, match="nonlocal.*no torchvision ResNet counterpart"):
    weights.flax_to_torchvision(zeros)


@pytest.fixture(scope="module")
def reid():
  model = ReidNet(arch="tiny", specific_stages=1, head="both", num_parts=2, part_dim=8)
  x = jnp.zeros((2, H, W, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x, train=False))
  rng = np.random.default_rng(1)

  def leaf(path, s):  # random values of init's structure; real init is slow to compile
    if path[-1].key == "var":
      return rng.uniform(0.5, 2.0, s.shape).astype(s.dtype)
    fan_in = s.shape[-2] if len(s.shape) == 3 else max(int(np.prod(s.shape[:-1])), 1)
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape).astype(s.dtype)

  return model, jax.tree_util.tree_map_with_path(leaf, shapes)


def _by_hand(variables, sd):
  """Fills every backbone leaf from `sd` through this file's own key mapping."""
  out = copy.deepcopy(variables)
  for collection in ("params", "batch_stats"):
    for module in ("rgb", "ir", "shared"):
      for path, value in _leaves(out[collection][module]):
        node = out[collection][module]
        for p in path[:-1]:
          node = node[p]
        torch_value = sd[_torch_key(path)]
        node[path[-1]] = (torch_value.transpose(2, 3, 1, 0) if torch_value.ndim == 4
                          else torch_value)
  return out


def test_load_backbone_places_every_tensor(reid, tiny_sd, tiny_files):
  model, variables = reid
  before = copy.deepcopy(variables)
  loaded, report = load_backbone(variables, tiny_files["pth"], model=model)
  jax.tree.map(np.testing.assert_array_equal, variables, before)  # input untouched
  np.testing.assert_array_equal(loaded["params"]["rgb"]["conv1"]["kernel"],
                                tiny_sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["params"]["ir"]["conv1"]["kernel"],
                                loaded["params"]["rgb"]["conv1"]["kernel"])
  np.testing.assert_array_equal(loaded["batch_stats"]["ir"]["bn1"]["mean"],
                                tiny_sd["bn1.running_mean"])
  np.testing.assert_array_equal(loaded["params"]["shared"]["layer4_0"]["conv2"]["kernel"],
                                tiny_sd["layer4.0.conv2.weight"].transpose(2, 3, 1, 0))
  hand = _by_hand(variables, tiny_sd)
  jax.tree.map(np.testing.assert_array_equal, loaded, hand)
  for head in ("global_head", "parts_head"):  # heads are copied through unchanged
    jax.tree.map(np.testing.assert_array_equal, loaded["params"][head], variables["params"][head])
  n_backbone = sum(1 for k in tiny_sd if not k.startswith("fc.")
                   and not k.endswith("num_batches_tracked"))
  n_stem = sum(1 for k in tiny_sd if k.split(".")[0] in ("conv1", "bn1")
               and not k.endswith("num_batches_tracked"))
  assert len(report.loaded) == n_backbone + n_stem  # the stem twice, once per stream
  assert report.unused == ("fc.bias", "fc.weight")
  assert report.sha256 == hashlib.sha256(tiny_files["pth"].read_bytes()).hexdigest()

  images = jax.random.normal(jax.random.key(1), (3, H, W, 3))
  modality = jnp.asarray([0, 1, 1])
  embed = jax.jit(lambda v: model.apply(v, images, modality, method="embed"))
  np.testing.assert_array_equal(embed(loaded), embed(hand))
  assert float(jnp.max(jnp.abs(embed(loaded) - embed(variables)))) > 1e-3


def test_load_backbone_from_mapping_and_fully_shared(tiny_sd):
  model = ReidNet(arch="tiny", specific_stages=0, head="global")
  x = jnp.zeros((1, H, W, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x, train=False))
  loaded, report = load_backbone(variables, tiny_sd, model=model)
  assert set(loaded["params"]) == {"shared", "global_head"}
  np.testing.assert_array_equal(loaded["params"]["shared"]["bn1"]["bias"], tiny_sd["bn1.bias"])
  assert report.sha256 is None and report.source == "<state dict>"


def test_load_backbone_is_strict(reid, tiny_sd, tmp_path):
  model, variables = reid
  bad = dict(tiny_sd)
  bad["layer3.0.conv1.weight"] = np.zeros((32, 16, 3, 1), np.float32)
  with pytest.raises(ValueError, match=r"params/shared/layer3_0/conv1/kernel: expected shape "
                                       r"\(3, 3, 16, 32\), found \(3, 1, 16, 32\)"):
    load_backbone(variables, bad, model=model)
  missing = {k: v for k, v in tiny_sd.items() if k != "layer2.0.downsample.1.running_var"}
  with pytest.raises(ValueError, match=r"batch_stats/shared/layer2_0/downsample_1/var "
                                       r"\(torch key 'layer2.0.downsample.1.running_var'\)"):
    load_backbone(variables, missing, model=model)
  extra = dict(tiny_sd, **{"layer1.1.conv1.weight": np.zeros((8, 8, 3, 3), np.float32)})
  with pytest.raises(ValueError, match="does not have.*layer1.1.conv1.weight"):
    load_backbone(variables, extra, model=model)
  # A resnet18 file for the tiny model: the message names the path, the file and the arch.
  path = tmp_path / "r18.safetensors"
  save_file(_torchvision_state_dict("resnet18", fill=0.0), str(path))
  with pytest.raises(ValueError, match=r"params/rgb/bn1/bias: expected shape \(8,\), found "
                                       r"\(64,\) in .*r18\.safetensors.*seems to be resnet18.*"
                                       r"arch='tiny'"):
    load_backbone(variables, path, model=model)
