"""Torchvision ResNet checkpoints: reading without torch, converting, loading into a ReidNet.

Readers (`read_state_dict`): `.safetensors`, `.npz` and torch's zip serialisation (`.pth`/`.pt`,
torch >= 1.6). The `.pth` reader never runs pickle code from the file: a restricted unpickler
resolves only `torch._utils._rebuild_tensor_v2`, `torch.*Storage` and `collections.OrderedDict`,
each to a local stand-in, and rebuilds tensors from the raw storages in the zip (stack.md §7.5).
Legacy (pre-1.6, non-zip) files are refused with conversion advice.

Conversion (`torchvision_to_flax`, stack.md §7.3): `layerL.i.x` -> `layerL_i/x`,
`downsample.0/1` -> `downsample_0/1`, conv weights OIHW -> HWIO, BN weight/bias -> params
scale/bias, running_mean/var -> batch_stats mean/var, `num_batches_tracked` dropped, fc
transposed.

Loading (`load_backbone`) copies the converted tensors into a `ReidNet`'s `rgb`, `ir` (both get
the same ImageNet tensors for their stages) and `shared` modules, strictly: every backbone
variable must be found with its exact shape. Record `LoadReport.sha256` in the run metadata
(stack.md §7.4).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from maumjax.models.reid import ReidNet
from maumjax.models.resnet import ARCHS, NUM_STAGES

_STORAGE_DTYPES: dict[str, Any] = {
  "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
  "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
BACKBONE_MODULES = ("rgb", "ir", "shared")
_COLLECTIONS = ("params", "batch_stats")


def sha256(path: str | Path) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


class _Storage:
  """Typed storage stand-in: `torch.FloatStorage` etc. resolve to subclasses carrying a dtype."""

  dtype: Any = None


def _rebuild_tensor_v2(storage: np.ndarray, offset: int, size: tuple[int, ...],
                       stride: tuple[int, ...], *_: Any) -> np.ndarray:
  # as_strided does no bounds checking, so a hostile file could read arbitrary memory; check.
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise pickle.UnpicklingError(f"invalid tensor geometry size={size} stride={stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
    raise pickle.UnpicklingError(
        f"tensor (offset {offset}, size {size}, stride {stride}) reads past its storage of "
        f"{storage.size} elements")
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride))
  return np.array(view, order="C", copy=True)


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` of a torch zip checkpoint, allowing tensor-rebuilding globals only."""

  def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, path: Path,
               byteorder: str) -> None:
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._byteorder = "<" if byteorder == "little" else ">"
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor_v2
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch" and name in _STORAGE_DTYPES:
      return type(name, (_Storage,), {"dtype": _STORAGE_DTYPES[name]})
    raise pickle.UnpicklingError(
        f"{str(self._path)!r} references the global {module}.{name}, which is not allowed: the "
        f"file is not a plain tensor state dict (only torch._utils._rebuild_tensor_v2, "
        f"torch.*Storage and collections.OrderedDict are). Refusing to load it")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], type) and issubclass(pid[1], _Storage)):
      raise pickle.UnpicklingError(f"{str(self._path)!r}: unsupported persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    key = str(key)
    if key not in self._storages:
      dtype = np.dtype(storage_type.dtype).newbyteorder(self._byteorder)
      name = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError:
        raise pickle.UnpicklingError(
            f"{str(self._path)!r} has no storage record {name!r}; the file is truncated or "
            f"not a torch checkpoint") from None
      if len(raw) < int(numel) * dtype.itemsize:
        raise pickle.UnpicklingError(
            f"{str(self._path)!r}: storage {name!r} has {len(raw)} bytes, fewer than its "
            f"{numel} elements of {dtype.name} need; the file is truncated or corrupt")
      data = np.frombuffer(raw, dtype=dtype, count=int(numel))
      self._storages[key] = data.astype(dtype.newbyteorder("="))
    return self._storages[key]


def _read_torch_zip(path: Path) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise ValueError(
          f"{str(path)!r} is a zip file but not a torch checkpoint (expected one "
          f"<archive>/data.pkl, found {pkls})")
    prefix = pkls[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in names:
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
    with archive.open(pkls[0]) as f:
      try:
        return _RestrictedUnpickler(f, archive, prefix, path, byteorder).load()
      except pickle.UnpicklingError as err:
        if str(path) in str(err):
          raise
        raise pickle.UnpicklingError(f"{str(path)!r}: {err}") from err


def _unwrap(obj: Any, path: Path) -> dict[str, np.ndarray]:
  # Training scripts often save {'state_dict': ...} or {'model': ...} with extra metadata.
  if isinstance(obj, Mapping):
    for wrapper in ("state_dict", "model"):
      if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping):
    raise TypeError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, np.ndarray):
      raise TypeError(
          f"{str(path)!r}: entry {key!r} is a {type(value).__name__}, not a tensor; the file "
          f"is not a plain tensor state dict")
    out[str(key)] = value
  return out


def _convert_advice(path: Path) -> str:
  out = path.with_suffix(".safetensors")
  return (
      "convert it once on a machine with torch:\n"
      "  import torch, safetensors.torch\n"
      f"  sd = torch.load({str(path)!r}, map_location='cpu', weights_only=True)\n"
      "  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "
      f"{str(out)!r})\n"
      "or use the zip-format torchvision file resnet50-0676ba61.pth (IMAGENET1K_V1)")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """Reads a state dict from `.safetensors`, `.npz` or a zip-format `.pth`/`.pt` file.

  Args:
    path: the checkpoint file.

  Returns:
    Key -> NumPy array, keys as saved (torchvision names for a torchvision checkpoint).

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: unknown extension, or a legacy (non-zip) torch file.
    TypeError: the file holds something other than a flat key -> tensor mapping.
    pickle.UnpicklingError: the `.pth` pickle references a disallowed global or is malformed.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f"checkpoint {str(path)!r} does not exist; supply the torchvision file yourself "
        f"(nothing is downloaded), e.g. resnet50-0676ba61.pth or a converted .safetensors")
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    from safetensors.numpy import load_file  # optional dependency, imported when needed
    return _unwrap(load_file(str(path)), path)
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      return _unwrap({k: data[k] for k in data.files}, path)
  if suffix in (".pth", ".pt"):
    if not zipfile.is_zipfile(path):
      raise ValueError(
          f"{str(path)!r} is a legacy (pre-torch-1.6, non-zip) checkpoint, which maumjax "
          f"does not read without torch; {_convert_advice(path)}")
    return _unwrap(_read_torch_zip(path), path)
  raise ValueError(
      f"{str(path)!r} has an unknown extension {path.suffix!r}; use .safetensors, .npz, or a "
      f"zip-format .pth/.pt")


# torchvision key grammar: stem, fc, or layerL.i.<module>.<leaf>.
_KEY_RE = re.compile(
    r"^(?:(?P<stem>conv1|bn1)|layer(?P<layer>[1-4])\.(?P<block>\d+)\."
    r"(?P<mod>conv[1-3]|bn[1-3]|downsample\.[01])|(?P<fc>fc))\.(?P<leaf>\w+)$")
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _map_key(key: str, value: np.ndarray) -> tuple[str, tuple[str, ...], np.ndarray] | None:
  """Maps one torchvision key to (collection, flax path, array); None for dropped keys."""
  match = _KEY_RE.match(key)
  if match is None:
    raise ValueError(f"state dict key {key!r} is not a torchvision ResNet key; cannot map it")
  leaf = match["leaf"]
  if match["fc"]:
    if leaf == "weight" and value.ndim == 2:
      return "params", ("fc", "kernel"), value.T
    if leaf == "bias" and value.ndim == 1:
      return "params", ("fc", "bias"), value
  else:
    if match["stem"]:
      prefix, mod = (), match["stem"]
    else:
      prefix, mod = (f"layer{match['layer']}_{match['block']}",), match["mod"].replace(".", "_")
    if mod.startswith("conv") or mod == "downsample_0":
      if leaf == "weight" and value.ndim == 4:
        return "params", prefix + (mod, "kernel"), value.transpose(2, 3, 1, 0)
    elif leaf == "num_batches_tracked":
      return None
    elif leaf in _BN_LEAVES and value.ndim == 1:
      collection, name = _BN_LEAVES[leaf]
      return collection, prefix + (mod, name), value
  raise ValueError(
      f"state dict key {key!r} with shape {value.shape} does not match a torchvision ResNet "
      f"tensor (conv weights are 4-D OIHW without bias, BN tensors 1-D); cannot map it")


def torchvision_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """Converts a torchvision ResNet state dict to nested Flax collections.

  Args:
    state_dict: torchvision key -> array.

  Returns:
    {'params': nested dict, 'batch_stats': nested dict} of NumPy arrays, named as
    `maumjax.models.resnet.ResNet` names its modules (with `fc` when the dict has it).

  Raises:
    ValueError: a key that is not a torchvision ResNet tensor.
  """
  out: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
  for key, value in state_dict.items():
    mapped = _map_key(key, np.asarray(value))
    if mapped is None:
      continue
    collection, path, array = mapped
    node = out[collection]
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(array)
  return out


def guess_arch(state_dict: Mapping[str, np.ndarray]) -> str:
  """Names the `ARCHS` variant whose layout matches a torchvision state dict, if any."""
  blocks = [len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{s}.")})
            for s in range(1, 5)]
  block = "bottleneck" if any(".conv3." in k for k in state_dict) else "basic"
  width = state_dict["conv1.weight"].shape[0] if "conv1.weight" in state_dict else None
  for name, spec in ARCHS.items():
    if (spec.block, list(spec.layers), spec.width) == (block, blocks, width):
      return name
  return f"an unknown arch ({block} blocks {blocks}, stem width {width})"


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `load_backbone` did.

  Attributes:
    loaded: flax paths written, e.g. 'params/rgb/conv1/kernel'.
    unused: torch keys not copied anywhere (`fc.*`; `num_batches_tracked` is dropped silently).
    source: the file path, or '<state dict>' when given a mapping.
    sha256: hex SHA-256 of the file; None when given a mapping.
  """

  loaded: tuple[str, ...]
  unused: tuple[str, ...]
  source: str
  sha256: str | None


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _copy_tree(tree: Any) -> Any:
  return {k: _copy_tree(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _torch_key(path: tuple[str, ...]) -> str:
  # Inverse of _map_key for messages and bookkeeping: layer1_0/downsample_0/kernel -> torch key.
  names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}
  parts = [re.sub(r"^(layer\d)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
  parts = [re.sub(r"^downsample_(\d)$", r"downsample.\1", p) for p in parts]
  return ".".join(parts + [names[path[-1]]])


def load_backbone(variables: Mapping[str, Any],
                  path_or_state_dict: str | Path | Mapping[str, np.ndarray], *,
                  model: ReidNet) -> tuple[dict[str, Any], LoadReport]:
  """Copies torchvision backbone weights into a ReidNet's variables.

  Both modality streams receive the same tensors for their stages; `shared` receives the rest.
  Heads (and any other collection or module) are copied through unchanged; `fc` is unused.

  Args:
    variables: the model's variables from `model.init` ({'params', 'batch_stats', ...}).
    path_or_state_dict: a checkpoint file (see `read_state_dict`) or a torchvision-keyed dict.
    model: the ReidNet the variables belong to (for its arch in error messages).

  Returns:
    (new variables as fresh nested dicts, LoadReport). The input is not modified.

  Raises:
    ValueError: a backbone variable is missing from the checkpoint or has another shape, the
      checkpoint has backbone tensors the model lacks, or its keys are not torchvision's.
  """
  if isinstance(path_or_state_dict, Mapping):
    state_dict, source, digest = dict(path_or_state_dict), "<state dict>", None
  else:
    state_dict = read_state_dict(path_or_state_dict)
    source, digest = str(path_or_state_dict), sha256(path_or_state_dict)
  converted = {c: _flatten(t) for c, t in torchvision_to_flax(state_dict).items()}
  hint = (f"the checkpoint seems to be {guess_arch(state_dict)}, the model is "
          f"ReidNet(arch={model.arch!r}); load a checkpoint of that arch or change the arch")

  expected = (("rgb", "ir") if model.specific_stages > 0 else ()) + (
      ("shared",) if model.specific_stages < NUM_STAGES else ())
  missing = [m for m in expected if m not in variables.get("params", {})]
  if missing:
    raise ValueError(
        f"variables have no params for backbone modules {missing} that "
        f"ReidNet(specific_stages={model.specific_stages}) has; pass the variables from this "
        f"model's own init")
  new = _copy_tree(variables)
  loaded, used = [], set()
  for collection in _COLLECTIONS:
    for module in BACKBONE_MODULES:
      if module not in new.get(collection, {}):
        continue
      for path, leaf in _flatten(new[collection][module]).items():
        where = f"{collection}/{module}/{'/'.join(path)}"
        if path not in converted[collection]:
          raise ValueError(
              f"{where} (torch key {_torch_key(path)!r}) is missing from {source!r}; {hint}")
        value = converted[collection][path]
        if value.shape != leaf.shape:
          raise ValueError(
              f"{where}: expected shape {tuple(leaf.shape)}, found {value.shape} in {source!r}; "
              f"{hint}")
        node = new[collection][module]
        for part in path[:-1]:
          node = node[part]
        node[path[-1]] = jnp.asarray(value, dtype=leaf.dtype)
        loaded.append(where)
        used.add((collection, path))

  unused = [(c, p) for c in _COLLECTIONS for p in converted[c] if (c, p) not in used]
  stray = [_torch_key(p) for c, p in unused if p[0] != "fc"]
  if stray:
    raise ValueError(
        f"the checkpoint {source!r} has backbone tensors the model does not have, e.g. "
        f"{stray[:3]}; {hint}")
  report = LoadReport(tuple(loaded), tuple(sorted(_torch_key(p) for c, p in unused)),
                      source, digest)
  return new, report
