"""Bad weights files: refused before anything large is allocated, with one line naming the file.

Hostile `.pth` files are crafted without torch by the torch-zip writer of
tests/models/test_weights.py: tensors whose views repeat or overrun a tiny storage, storages
whose zip entry disagrees with their declared size, pickles that call `os.system` or rewrite a
tensor after it was rebuilt. Memory is bounded with `tracemalloc` (NumPy reports its buffers
to it): each refusal must stay under `_PEAK`, where reading the file as declared would take
from 36 MiB to 256 MiB. Every refusal is a `WeightsError` (a `UserError` and a `ValueError`)
whose message is one line containing the file's path.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import tracemalloc
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from maumjax.errors import UserError
from maumjax.models import ReidNet, load_backbone, read_state_dict, weights
from tests.models.test_weights import (
  _Call,
  _Storage,
  _Tensor,
  _torchvision_state_dict,
  _TorchPickler,
  _write_pth,
)

_PEAK = 16 << 20  # bytes that any refusal below may allocate at its peak
_LEGACY_MAGIC = 119547037146038801333356  # torch.save's first object before torch 1.6


def _refused(call, path, match: str) -> str:
  """Runs `call`, which must raise a one-line WeightsError naming `path` and matching `match`."""
  with pytest.raises(weights.WeightsError, match=match) as info:
    call()
  message = str(info.value)
  assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
  assert "\n" not in message and str(path) in message, message
  return message


def _peak_bytes(call) -> int:
  """Peak bytes traced while `call` runs (its exception, if any, is swallowed)."""
  tracemalloc.start()
  try:
    call()
  except Exception:
    pass
  finally:
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  return peak


def _floats(n: int) -> bytes:
  return np.arange(n, dtype=np.float32).tobytes()


class _System:
  """Pickles as `os.system(command)`, as a hostile checkpoint would."""

  def __init__(self, command: str) -> None:
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def _replace_entry(path, name: str, data: bytes) -> None:
  """Rewrites the zip at `path` with entry `name` holding `data`."""
  with zipfile.ZipFile(path) as zf:
    entries = {n: zf.read(n) for n in zf.namelist()}
  entries[name] = data
  with zipfile.ZipFile(path, "w") as zf:
    for n, blob in entries.items():
      zf.writestr(n, blob)


class _Rebuilt:
  """A tensor reduction followed by BUILD(state): an attempt to rewrite it after the check."""

  def __init__(self, tensor: _Tensor, state: dict) -> None:
    self.tensor, self.state = tensor, state

  def __reduce__(self):
    return self.tensor.__reduce__() + (self.state,)


# --- .pth: code and geometry --------------------------------------------------------------------

@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval"),
                                          ("builtins", "exec"), ("subprocess", "call")])
def test_pth_globals_are_refused_unrun(tmp_path, module, name):
  marker = tmp_path / "pwned"
  code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
  args = {"system": (f"touch {marker}",), "call": (["touch", str(marker)],)}.get(name, (code,))
  path = tmp_path / "evil.pth"
  _write_pth(path, {"conv1.weight": _Call(module, name, *args)})
  _refused(lambda: read_state_dict(path), path, rf"global {module}\.{name}, which is not allowed")
  assert not marker.exists()


def test_pth_stack_global_payload_is_refused_unrun(tmp_path):
  # pickle protocol 4 names globals with STACK_GLOBAL rather than GLOBAL.
  marker = tmp_path / "pwned"
  data = pickle.dumps({"conv1.weight": _System(f"touch {marker}")}, protocol=4)
  path = tmp_path / "evil4.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", data)
  _refused(lambda: read_state_dict(path), path, rf"global {os.system.__module__}\.system")
  assert not marker.exists()
  pickle.loads(data)  # control: the unrestricted unpickler does run it
  assert marker.exists()


@pytest.mark.parametrize("size, stride, match", [
  ((8192, 8192), (0, 0), "stride 0"),  # 256 MiB of one float
  ((1 << 20, 1 << 20), (0, 1), "stride 0"),  # 4 TiB
  ((4096, 4096), (1, 1), "more than its storage's"),  # 64 MiB over 8191 elements
])
def test_pth_views_repeating_their_storage_are_refused_unallocated(tmp_path, size, stride,
                                                                   match):
  numel = 1 + sum((n - 1) * s for n, s in zip(size, stride))  # just enough for the extent
  path = tmp_path / "bomb.pth"
  _write_pth(path, {"conv1.weight": _Tensor(_Storage("0", "FloatStorage", numel), 0, size,
                                            stride)}, {"0": _floats(numel)})
  if numel == 1:
    assert path.stat().st_size < 1024
  _refused(lambda: read_state_dict(path), path, match)
  assert _peak_bytes(lambda: read_state_dict(path)) < _PEAK


def test_pth_build_cannot_rewrite_a_checked_tensor(tmp_path):
  path = tmp_path / "rebuilt.pth"
  tensor = _Tensor(_Storage("0", "FloatStorage", 1), 0, (1,), (1,))
  _write_pth(path, {"conv1.weight": _Rebuilt(tensor, {"shape": (8192, 8192), "stride": (0, 0)})},
             {"0": _floats(1)})
  _refused(lambda: read_state_dict(path), path, "set the state of a Tensor")
  assert _peak_bytes(lambda: read_state_dict(path)) < _PEAK


@pytest.mark.parametrize("offset, size, stride, match", [
  (4, (), (), "reads past its storage of 4 elements"),
  (1, (4,), (1,), "reads past its storage of 4 elements"),
  (0, (2, 3), (3, 1), "reads past its storage of 4 elements"),
  (0, (2, 2), (1 << 40, 1), "reads past its storage of 4 elements"),
  (-1, (2,), (1,), "invalid geometry"),
  (0, (2, 2), (1,), "invalid geometry"),
  (0, (2, -2), (1, 1), "invalid geometry"),
  (0, (2.0,), (1,), "invalid geometry"),
])
def test_pth_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride, match):
  path = tmp_path / "oob.pth"
  _write_pth(path, {"x": _Tensor(_Storage("0", "FloatStorage", 4), offset, size, stride)},
             {"0": _floats(4)})
  _refused(lambda: read_state_dict(path), path, match)


@pytest.mark.parametrize("numel, stored, match", [
  (1000, 40, r"holds 40 bytes, but its pickle declares 1000 elements"),  # truncated entry
  (1 << 40, 4, r"holds 4 bytes, but its pickle declares 1099511627776 elements"),
  (4, 400, r"holds 400 bytes, but its pickle declares 4 elements"),  # longer than declared
  (4, None, r"has no storage record 'archive/data/0'"),
])
def test_pth_storage_entry_must_match_its_declared_size(tmp_path, numel, stored, match):
  path = tmp_path / "short.pth"
  blobs = {} if stored is None else {"0": bytes(stored)}
  _write_pth(path, {"x": _Tensor(_Storage("0", "FloatStorage", numel), 0, (4,), (1,))}, blobs)
  _refused(lambda: read_state_dict(path), path, match)


def test_pth_many_views_of_one_storage_are_refused(tmp_path):
  # 64 full views of one 1 MiB storage would read 64 MiB from a 1 MiB entry.
  path = tmp_path / "views.pth"
  storage = _Storage("0", "FloatStorage", 1 << 18)
  views = {f"v{i}": _Tensor(storage, i, ((1 << 18) - i,), (1,)) for i in range(64)}
  _write_pth(path, views, {"0": _floats(1 << 18)})
  _refused(lambda: read_state_dict(path), path, "more than 2 times the bytes of their storages")
  assert _peak_bytes(lambda: read_state_dict(path)) < _PEAK


@pytest.mark.parametrize("obj, match", [
  ([1, 2], "holds a list, not a state dict"),
  ({"conv1.weight": 3.0}, "entry 'conv1.weight' is a float, not a tensor"),
])
def test_pth_without_a_tensor_state_dict_is_refused(tmp_path, obj, match):
  path = tmp_path / "odd.pth"
  _write_pth(path, obj)
  message = _refused(lambda: read_state_dict(path), path, match)
  assert "model.state_dict()" in message


# --- a tensor larger than the model's -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_zeros():
  return _torchvision_state_dict("tiny", fill=0.0)


@pytest.fixture(scope="module")
def shared_tiny():
  model = ReidNet(arch="tiny", specific_stages=0, head="global")
  x = jnp.zeros((1, 64, 32, 3))
  return model, jax.eval_shape(lambda: model.init(jax.random.key(0), x, x, train=False))


@pytest.mark.parametrize("fmt", ["pth", "npz", "safetensors"])
def test_tensor_larger_than_the_model_is_refused_unread(tmp_path, shared_tiny, tiny_zeros,
                                                       fmt):
  model, variables = shared_tiny
  sd = dict(tiny_zeros)
  sd["layer4.0.conv2.weight"] = np.zeros((1024, 1024, 3, 3), np.float32)  # 36 MiB, not 144 KiB
  path = tmp_path / f"big.{fmt}"
  writers = {"pth": _write_pth, "npz": lambda p, d: np.savez(p, **d),
             "safetensors": lambda p, d: save_file(d, str(p))}
  writers[fmt](path, sd)
  del sd
  load = lambda: load_backbone(variables, path, model=model)  # noqa: E731
  _refused(load, path, r"params/shared/layer4_0/conv2/kernel: expected shape \(3, 3, 64, 64\), "
                       r"found \(3, 3, 1024, 1024\) in .*arch='tiny'")
  assert _peak_bytes(load) < _PEAK
  shapes = lambda: weights.state_dict_shapes(path)  # noqa: E731
  assert shapes()["layer4.0.conv2.weight"] == (1024, 1024, 3, 3)
  assert _peak_bytes(shapes) < _PEAK
  bounded = lambda: read_state_dict(path, max_elements=1 << 20)  # noqa: E731
  _refused(bounded, path, r"tensor 'layer4.0.conv2.weight' has shape \(1024, 1024, 3, 3\) "
                          r"\(9437184 elements\), more than the 1048576 allowed")
  assert _peak_bytes(bounded) < _PEAK


def test_foreign_keys_and_missing_tensors_name_the_file(tmp_path, shared_tiny, tiny_zeros):
  model, variables = shared_tiny
  wrapped = tmp_path / "dataparallel.npz"
  np.savez(wrapped, **{f"module.{k}": v for k, v in tiny_zeros.items()})
  _refused(lambda: load_backbone(variables, wrapped, model=model), wrapped,
           r"'module\.[\w.]+' in .* is not a torchvision ResNet key.*'module\.' removed")
  partial = tmp_path / "partial.safetensors"
  save_file({k: v for k, v in tiny_zeros.items() if not k.startswith("layer4.")}, str(partial))
  _refused(lambda: load_backbone(variables, partial, model=model), partial,
           r"params/shared/layer4_0/bn1/bias \(torch key 'layer4\.0\.bn1\.bias'\) is missing")


# --- random, truncated and otherwise wrong files -------------------------------------------------

@pytest.mark.parametrize("suffix, match", [
  (".safetensors", r"is not a valid \.safetensors file"),
  (".npz", r"is not a valid \.npz file \(not a zip archive\)"),
  (".pth", r"is not a torch checkpoint: neither a zip archive nor a torch\.save pickle"),
  (".pt", r"is not a torch checkpoint"),
])
@pytest.mark.parametrize("content", ["random", "truncated", "empty"])
def test_random_truncated_and_empty_files(tmp_path, suffix, match, content):
  path = tmp_path / f"weights{suffix}"
  if content == "random":
    path.write_bytes(np.random.default_rng(0).bytes(669))
  elif content == "empty":
    path.write_bytes(b"")
  else:  # a partial download of a good file
    good = tmp_path / f"good{suffix}"
    sd = {"conv1.weight": np.ones((8, 3, 7, 7), np.float32)}
    {".safetensors": lambda: save_file(sd, str(good)), ".npz": lambda: np.savez(good, **sd)}.get(
        suffix, lambda: _write_pth(good, sd))()
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  message = _refused(lambda: read_state_dict(path), path, match)
  for misleading in ("allow_pickle", "legacy", "torch.load"):
    assert misleading not in message


def test_npz_with_object_arrays_is_refused_unpickled(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "objects.npz"
  np.savez(path, **{"conv1.weight": np.array([_System(f"touch {marker}")], dtype=object)})
  message = _refused(lambda: read_state_dict(path), path,
                     r"array 'conv1\.weight' holds Python objects \(dtype object\), which maumjax "
                     r"never unpickles; re-save it with numpy\.savez")
  assert "allow_pickle" not in message and not marker.exists()


def test_npz_header_disagreeing_with_its_entry_is_refused(tmp_path):
  path = tmp_path / "lying.npz"
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 20, 1 << 20)})
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("conv1.weight.npy", header.getvalue() + bytes(16))
  _refused(lambda: read_state_dict(path), path,
           r"declares shape \(1048576, 1048576\) of float32 .* but its member holds 16 bytes")
  assert _peak_bytes(lambda: read_state_dict(path)) < _PEAK


def test_real_legacy_file_keeps_the_legacy_advice(tmp_path):
  path = tmp_path / "resnet50-19c8e357.pth"
  # torch.save before 1.6: the magic number, the protocol version, sys info, then the data.
  path.write_bytes(pickle.dumps(_LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
                   + pickle.dumps({"little_endian": True}, protocol=2) + os.urandom(64))
  message = _refused(lambda: read_state_dict(path), path,
                     r"legacy \(pre-torch-1\.6, non-zip\) checkpoint.*torch\.load.*"
                     r"resnet50-19c8e357\.safetensors.*resnet50-0676ba61\.pth")
  assert "python -c" in message


@pytest.mark.parametrize("first", ["other number", "global"])
def test_other_pickles_are_not_called_legacy(tmp_path, first):
  marker = tmp_path / "pwned"
  path = tmp_path / "pickled.pth"
  if first == "global":
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(_Call("os", "system", f"touch {marker}"))
    path.write_bytes(buffer.getvalue())
  else:
    path.write_bytes(pickle.dumps(_LEGACY_MAGIC + 1, protocol=2))
  message = _refused(lambda: read_state_dict(path), path, "is not a torch checkpoint")
  assert "legacy" not in message and "torch.load" not in message and not marker.exists()


def test_missing_directory_and_unknown_extension(tmp_path):
  missing = tmp_path / "nothing.pth"
  _refused(lambda: read_state_dict(missing), missing, "does not exist; supply the torchvision")
  _refused(lambda: read_state_dict(tmp_path), tmp_path, "is a directory; pass the weights file")
  odd = tmp_path / "weights.h5"
  odd.write_bytes(b"x")
  _refused(lambda: read_state_dict(odd), odd, r"unknown extension '\.h5'; use \.safetensors")


def test_zip_pth_without_data_pkl_and_with_a_broken_pickle(tmp_path):
  path = tmp_path / "not_torch.pth"
  np.savez(path.with_suffix(".npz"), a=np.zeros(2))
  path.with_suffix(".npz").rename(path)
  _refused(lambda: read_state_dict(path), path, r"zip file but not a torch checkpoint")
  broken = tmp_path / "broken.pth"
  with zipfile.ZipFile(broken, "w") as zf:
    zf.writestr("archive/data.pkl", b"\x80\x02}q\x00(X\x01")  # cut off mid-pickle
  _refused(lambda: read_state_dict(broken), broken, r"truncated or corrupt")


def test_good_files_still_load(tmp_path):
  # Control for the checks above: shared storages (tied weights), views, big-endian storages.
  base = np.arange(12, dtype=">f4")
  storage = _Storage("0", "FloatStorage", 12)
  obj = collections.OrderedDict([("a", _Tensor(storage, 0, (12,), (1,))),
                                 ("tied", _Tensor(storage, 0, (12,), (1,))),
                                 ("t", _Tensor(storage, 0, (3, 4), (1, 3))),
                                 ("e", _Tensor(storage, 3, (0, 5), (5, 1)))])
  path = tmp_path / "good.pth"
  _write_pth(path, obj, {"0": base.tobytes()})
  _replace_entry(path, "archive/byteorder", b"big")
  got = read_state_dict(path)
  np.testing.assert_array_equal(got["tied"], got["a"])
  np.testing.assert_array_equal(got["t"], np.arange(12).reshape(4, 3).T)
  assert got["a"].dtype == np.float32 and got["a"].dtype.isnative and got["e"].shape == (0, 5)
