"""Torchvision ResNet checkpoints: reading without torch, converting, loading into a ReidNet.

Readers (`read_state_dict`): `.safetensors`, `.npz` and torch's zip serialisation (`.pth`/`.pt`,
torch >= 1.6). The `.pth` reader never runs pickle code from the file: a restricted unpickler
resolves only `torch._utils._rebuild_tensor_v2`, `torch.*Storage` and `collections.OrderedDict`,
each to a local stand-in, and rebuilds tensors from the raw storages in the zip (stack.md §7.5).
Legacy (pre-1.6, non-zip) files are recognised by their magic number and refused with
conversion advice.

Reading is in two passes, so that a hostile or broken file cannot make maumjax allocate more
than the file's tensors truly hold. The first pass (`_scan`) reads only metadata into `_Tensor`
descriptors (entry, dtype, offset, shape, strides) and validates them: a `.pth` tensor must lie
inside its storage (no stride-0 repetition, no more elements than the storage, offset plus
extent within it), every storage's zip entry must hold exactly its declared elements, and all the
tensors together may hold at most twice the storages' bytes; a `.npz` array's header must agree
with its entry's size and hold no Python objects. Callers then bound the shapes (`max_elements`
of `read_state_dict`; `load_backbone` requires the model's exact shapes), and only the second
pass (`_materialise`) reads tensor data. Every problem with the file raises `WeightsError`, one
line naming the file and the fix.

Conversion (`torchvision_to_flax`, stack.md §7.3): `layerL.i.x` -> `layerL_i/x`,
`downsample.0/1` -> `downsample_0/1`, conv weights OIHW -> HWIO, BN weight/bias -> params
scale/bias, running_mean/var -> batch_stats mean/var, `num_batches_tracked` dropped, fc
transposed.

Loading (`load_backbone`) copies the converted tensors into a `ReidNet`'s `rgb`, `ir` (both get
the same ImageNet tensors for their stages) and `shared` modules, strictly: every backbone
variable must be found with its exact shape, checked before any tensor data is read. The one
exception is the non-local blocks (`non_local='agw'`, modules `nonlocal{L}_{i}`), which no
torchvision checkpoint has: they keep their init, the identity, and are listed in
`LoadReport.kept`. Record `LoadReport.sha256` in the run metadata (stack.md §7.4).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from maumjax.errors import UserError, one_line
from maumjax.models.reid import BACKBONE_MODULES, ReidNet
from maumjax.models.resnet import ARCHS, NON_LOCAL_NAME, NUM_STAGES

_STORAGE_DTYPES: dict[str, Any] = {
  "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
  "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_COLLECTIONS = ("params", "batch_stats")
# torch.save before 1.6 starts with this number, pickled (torch/serialization.py MAGIC_NUMBER).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# A ResNet-50's data.pkl is about 30 KB; a pickle far larger is not a plain state dict.
_MAX_PICKLE_BYTES = 64 << 20
# The tensors of a `.pth` may read each storage byte this many times over, in total.
_MAX_VIEW_RATIO = 2
_REDOWNLOAD = ("pass the torchvision file itself (e.g. resnet50-0676ba61.pth, downloaded "
               "again) or a .safetensors/.npz export of it")


class WeightsError(UserError, ValueError):
  """A weights file (or state dict) that cannot be loaded; one line naming it and the fix."""

  def __init__(self, message: str) -> None:
    super().__init__(one_line(message))


def sha256(path: str | Path) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _clip(text: str, limit: int = 80) -> str:
  """`text` cut to `limit` characters (text from a hostile file can be huge)."""
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any, limit: int = 80) -> str:
  return _clip(repr(value), limit)


class _Immutable:
  """Refuses pickle's BUILD, which could otherwise rewrite a descriptor after its validation.

  (BUILD calls `__setstate__` when there is one, else updates `__dict__`, frozen or not. A
  slotted frozen dataclass would get its own field-setting `__setstate__`: keep these unslotted.)
  """

  __slots__ = ()

  def __setstate__(self, state: Any) -> None:
    raise pickle.UnpicklingError(
        f"the pickle tries to set the state of a {type(self).__name__.lstrip('_')}, which a "
        f"torch.save pickle never does")


# --- descriptors ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Tensor(_Immutable):
  """One tensor of a checkpoint file, described but not read.

  Attributes:
    shape: its shape.
    dtype: its dtype as stored (byte order included); None where the format names a dtype
      NumPy lacks (read by the format's own library).
    entry: where its bytes are: the zip member (`.pth` storage, `.npz` array) or the
      `.safetensors` key.
    offset: `.pth`: storage elements before its first element; `.npz`: bytes of .npy header.
    stride: `.pth`: strides in elements; None for a contiguous array.
    fortran: `.npz`: stored in Fortran order.
  """

  shape: tuple[int, ...]
  dtype: np.dtype | None
  entry: str
  offset: int = 0
  stride: tuple[int, ...] | None = None
  fortran: bool = False

  @property
  def size(self) -> int:
    return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class _StorageRef(_Immutable):
  """A `.pth` storage: its zip entry, dtype (file byte order) and element count."""

  entry: str
  dtype: np.dtype
  numel: int


class _StorageType:
  """Typed storage stand-in: `torch.FloatStorage` etc. resolve to subclasses carrying a dtype."""

  dtype: Any = None


_STORAGE_TYPES = {name: type(name, (_StorageType,), {"dtype": np.dtype(dtype)})
                  for name, dtype in _STORAGE_DTYPES.items()}


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


# --- .pth -----------------------------------------------------------------------------------------

class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` of a torch zip checkpoint into `_Tensor` descriptors.

  Only the tensor-rebuilding globals resolve; storages are looked up in the zip's directory
  (their declared size must match their entry's) but not read, and each tensor is checked to
  lie inside its storage. The descriptors are immutable, so the check holds after `load()`.
  """

  def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, path: Path,
               byteorder: str) -> None:
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._byteorder = "<" if byteorder == "little" else ">"
    self.storage_bytes: dict[str, int] = {}  # entry -> byte size, for every storage referenced

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return self._rebuild_tensor
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch" and name in _STORAGE_TYPES:
      return _STORAGE_TYPES[name]
    raise WeightsError(
        f"{str(self._path)!r} references the global {_clip(module, 60)}.{_clip(name, 60)}, "
        f"which is not allowed: the file is not a plain tensor state dict (only "
        f"torch._utils._rebuild_tensor_v2, torch.*Storage and collections.OrderedDict are). "
        f"Refusing to load it (nothing in it was run); save model.state_dict() instead of the "
        f"model, or use a .safetensors file")

  def persistent_load(self, pid: Any) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], type) and issubclass(pid[1], _StorageType)
            and isinstance(pid[2], (str, int)) and _is_int(pid[4]) and pid[4] >= 0):
      raise WeightsError(
          f"{str(self._path)!r}: unsupported persistent id {_short(pid)} in its pickle; the file "
          f"is not a plain torch tensor state dict; {_REDOWNLOAD}")
    _, storage_type, key, _, numel = pid
    dtype = storage_type.dtype.newbyteorder(self._byteorder)
    entry = f"{self._prefix}data/{key}"
    try:
      stored = self._archive.getinfo(entry).file_size
    except KeyError:
      raise WeightsError(
          f"{str(self._path)!r} has no storage record {entry!r}; the file is truncated or not a "
          f"torch checkpoint; {_REDOWNLOAD}") from None
    if stored != numel * dtype.itemsize:
      raise WeightsError(
          f"{str(self._path)!r}: storage {entry!r} holds {stored} bytes, but its pickle declares "
          f"{numel} elements of {dtype.name} ({numel * dtype.itemsize} bytes); the file is "
          f"truncated or corrupt; {_REDOWNLOAD}")
    self.storage_bytes[entry] = stored
    return _StorageRef(entry, dtype, numel)

  def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any,
                      *_: Any) -> _Tensor:
    where = (f"{str(self._path)!r}: a tensor (offset {_short(offset, 30)}, size "
             f"{_short(size, 60)}, stride {_short(stride, 60)})")
    if not (isinstance(storage, _StorageRef) and _is_int(offset)
            and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(_is_int(v) for v in size + stride)
            and len(size) == len(stride) and offset >= 0 and min(size + stride, default=0) >= 0):
      raise WeightsError(f"{where} has an invalid geometry; the file is corrupt; {_REDOWNLOAD}")
    tensor = _Tensor(size, storage.dtype, storage.entry, offset, stride)
    if tensor.size == 0:
      return tensor
    if any(n > 1 and s == 0 for n, s in zip(size, stride)):
      raise WeightsError(
          f"{where} repeats its storage's elements (stride 0 on a dimension longer than 1), "
          f"which a saved state dict never does; refusing to expand it; {_REDOWNLOAD}")
    extent = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if extent > storage.numel:
      raise WeightsError(
          f"{where} reads past its storage of {storage.numel} elements; the file is corrupt or "
          f"hostile; {_REDOWNLOAD}")
    if tensor.size > storage.numel:
      raise WeightsError(
          f"{where} has {tensor.size} elements, more than its storage's {storage.numel} "
          f"(overlapping strides), which a saved state dict never has; {_REDOWNLOAD}")
    return tensor


def _legacy_magic(path: Path) -> bool:
  """Whether `path` starts with a pickled legacy torch magic number (resolving no globals)."""

  class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
      raise pickle.UnpicklingError("no globals")

  with open(path, "rb") as f:
    head = f.read(64)  # the magic number pickles to 15 bytes; a prefix bounds any allocation
  try:
    first = _NoGlobals(io.BytesIO(head)).load()
  except Exception:  # anything at all: not a legacy checkpoint
    return False
  return _is_int(first) and first == _LEGACY_MAGIC


def _legacy_advice(path: Path) -> str:
  out = path.with_suffix(".safetensors")
  return (
      f"convert it once on a machine with torch: python -c \"import torch, safetensors.torch; "
      f"sd = torch.load({str(path)!r}, map_location='cpu', weights_only=True); "
      f"safetensors.torch.save_file({{k: v.contiguous() for k, v in sd.items()}}, "
      f"{str(out)!r})\", or use the zip-format torchvision file resnet50-0676ba61.pth "
      f"(IMAGENET1K_V1)")


def _scan_torch(path: Path) -> dict[str, _Tensor]:
  if not zipfile.is_zipfile(path):
    if _legacy_magic(path):
      raise WeightsError(
          f"{str(path)!r} is a legacy (pre-torch-1.6, non-zip) checkpoint, which maumjax does "
          f"not read without torch; {_legacy_advice(path)}")
    raise WeightsError(
        f"{str(path)!r} is not a torch checkpoint: neither a zip archive nor a torch.save "
        f"pickle (a partial download, or not a checkpoint at all); {_REDOWNLOAD}")
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise WeightsError(
          f"{str(path)!r} is a zip file but not a torch checkpoint (expected one "
          f"<archive>/data.pkl, found {_short(pkls)}); {_REDOWNLOAD}")
    prefix = pkls[0][: -len("data.pkl")]
    if archive.getinfo(pkls[0]).file_size > _MAX_PICKLE_BYTES:
      raise WeightsError(
          f"{str(path)!r}: its {pkls[0]} is larger than {_MAX_PICKLE_BYTES >> 20} MiB, far "
          f"more than a tensor state dict needs; {_REDOWNLOAD}")
    byteorder = "little"
    if f"{prefix}byteorder" in names:
      byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
      raise WeightsError(
          f"{str(path)!r}: unknown byte order {_short(byteorder)}; the file is corrupt; "
          f"{_REDOWNLOAD}")
    with archive.open(pkls[0]) as f:
      unpickler = _RestrictedUnpickler(f, archive, prefix, path, byteorder)
      obj = unpickler.load()
  tensors = _unwrap(obj, path)
  # Tensors may share storages (tied weights, views), but many overlapping views of one large
  # storage would materialise far more than the file holds: bound the total.
  unique = {(t.entry, t.offset, t.shape, t.stride): t for t in tensors.values()}
  total = sum(t.size * t.dtype.itemsize for t in unique.values())
  limit = _MAX_VIEW_RATIO * sum(unpickler.storage_bytes.values())
  if total > limit:
    raise WeightsError(
        f"{str(path)!r}: its tensors would hold {total} bytes, more than {_MAX_VIEW_RATIO} times "
        f"the bytes of their storages (many overlapping views), which a saved state dict never "
        f"has; {_REDOWNLOAD}")
  return tensors


def _unwrap(obj: Any, path: Path) -> dict[str, _Tensor]:
  # Training scripts often save {'state_dict': ...} or {'model': ...} with extra metadata.
  fix = "save model.state_dict() (a flat name -> tensor mapping), or use a .safetensors file"
  if isinstance(obj, Mapping):
    for wrapper in ("state_dict", "model"):
      if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping):
    raise WeightsError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict; {fix}")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, _Tensor):
      raise WeightsError(
          f"{str(path)!r}: entry {_short(key)} is a {type(value).__name__}, not a tensor; the "
          f"file is not a plain tensor state dict; {fix}")
    out[str(key)] = value
  return out


# --- .npz and .safetensors ------------------------------------------------------------------------

def _scan_npz(path: Path) -> dict[str, _Tensor]:
  fix = "re-save it with numpy.savez(path, **{name: numeric array})"
  if not zipfile.is_zipfile(path):
    raise WeightsError(f"{str(path)!r} is not a valid .npz file (not a zip archive); {fix}")
  readers = {(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}
  tensors = {}
  with zipfile.ZipFile(path) as archive:
    for info in archive.infolist():
      if not info.filename.endswith(".npy"):
        raise WeightsError(
            f"{str(path)!r}: member {_short(info.filename)} is not a .npy array; {fix}")
      key = info.filename[: -len(".npy")]
      with archive.open(info) as f:
        try:
          version = np.lib.format.read_magic(f)
          if version not in readers:
            raise ValueError(f"unsupported .npy format version {version}")
          shape, fortran, dtype = readers[version](f)
          if not all(_is_int(n) and n >= 0 for n in shape):
            raise ValueError(f"invalid shape {_short(shape)}")
        except ValueError as err:
          raise WeightsError(
              f"{str(path)!r}: member {_short(info.filename)} is not a valid .npy array "
              f"({_short(str(err), 120)}); {fix}") from err
        header = f.tell()
      if dtype.hasobject:
        raise WeightsError(
            f"{str(path)!r}: array {_short(key)} holds Python objects (dtype {dtype}), which "
            f"maumjax never unpickles; {fix}")
      tensor = _Tensor(tuple(shape), dtype, info.filename, header, fortran=bool(fortran))
      if info.file_size != header + tensor.size * dtype.itemsize:
        raise WeightsError(
            f"{str(path)!r}: array {_short(key)} declares shape {tensor.shape} of {dtype} "
            f"({tensor.size * dtype.itemsize} bytes), but its member holds "
            f"{info.file_size - header} bytes of data; the file is truncated or corrupt; {fix}")
      tensors[key] = tensor
  return tensors


def _safetensors(path: Path) -> Any:
  try:
    import safetensors  # optional dependency, imported when needed
  except ImportError:
    raise WeightsError(
        f"reading {str(path)!r} needs the safetensors package: pip install safetensors, or "
        f"pass a .npz or zip-format .pth file") from None
  return safetensors


def _scan_safetensors(path: Path) -> dict[str, _Tensor]:
  # safe_open validates the header: every tensor's byte range lies inside the file.
  try:
    with _safetensors(path).safe_open(str(path), framework="numpy") as f:
      return {key: _Tensor(tuple(f.get_slice(key).get_shape()), None, key) for key in f.keys()}
  except WeightsError:
    raise
  except Exception as err:  # SafetensorError and friends: the header is not valid
    raise WeightsError(
        f"{str(path)!r} is not a valid .safetensors file ({_short(str(err), 120)}); download "
        f"or export it again (safetensors.torch.save_file), or pass the torchvision "
        f"resnet50-0676ba61.pth itself") from err


# --- both passes ----------------------------------------------------------------------------------

def _scan(path: Path) -> tuple[str, dict[str, _Tensor]]:
  """(format, validated descriptors) of a checkpoint file; reads metadata only."""
  if not path.exists():
    raise WeightsError(
        f"checkpoint {str(path)!r} does not exist; supply the torchvision file yourself "
        f"(nothing is downloaded), e.g. resnet50-0676ba61.pth or a converted .safetensors")
  if path.is_dir():
    raise WeightsError(
        f"checkpoint {str(path)!r} is a directory; pass the weights file itself, e.g. "
        f"{str(path / 'resnet50-0676ba61.pth')!r}")
  if not path.is_file():
    raise WeightsError(f"checkpoint {str(path)!r} is not a regular file; pass the weights file")
  try:
    open(path, "rb").close()
  except OSError as err:
    raise WeightsError(
        f"cannot read checkpoint {str(path)!r} ({err.strerror or err}); check its permissions"
        ) from err
  suffix = path.suffix.lower()
  scanners = {".safetensors": _scan_safetensors, ".npz": _scan_npz, ".pth": _scan_torch,
              ".pt": _scan_torch}
  if suffix not in scanners:
    raise WeightsError(
        f"{str(path)!r} has an unknown extension {path.suffix!r}; use .safetensors, .npz, or a "
        f"zip-format .pth/.pt (rename the file if it is one of these)")
  try:
    return suffix, scanners[suffix](path)
  except WeightsError:
    raise
  except Exception as err:  # a malformed zip or pickle: zlib.error, EOFError, UnpicklingError...
    raise WeightsError(
        f"{str(path)!r} cannot be read as a {suffix} checkpoint ({type(err).__name__}: "
        f"{_short(str(err), 120)}); the file is truncated or corrupt; {_REDOWNLOAD}") from err


def _native(dtype: np.dtype) -> np.dtype:
  return dtype.newbyteorder("=")


def _materialise(path: Path, kind: str,
                 tensors: Mapping[str, _Tensor]) -> dict[str, np.ndarray]:
  """Reads the data of validated descriptors: C-contiguous arrays in native byte order."""
  out: dict[str, np.ndarray] = {}
  try:
    if kind == ".safetensors":
      with _safetensors(path).safe_open(str(path), framework="numpy") as f:
        for key, tensor in tensors.items():
          out[key] = np.asarray(f.get_tensor(tensor.entry), order="C")
      return out
    by_entry: dict[str, list[str]] = collections.defaultdict(list)
    for key, tensor in tensors.items():
      by_entry[tensor.entry].append(key)
    with zipfile.ZipFile(path) as archive:
      for entry, keys in by_entry.items():
        raw = archive.read(entry)  # its size was checked against the descriptors
        for key in keys:
          out[key] = _from_bytes(raw, tensors[key])
        del raw
  except WeightsError:
    raise
  except Exception as err:  # a CRC error, a short entry: the data does not match the directory
    raise WeightsError(
        f"{str(path)!r}: reading its tensor data failed ({type(err).__name__}: "
        f"{_short(str(err), 120)}); the file is truncated or corrupt; {_REDOWNLOAD}") from err
  return out


def _from_bytes(raw: bytes, tensor: _Tensor) -> np.ndarray:
  dtype = tensor.dtype
  if tensor.size == 0:
    return np.zeros(tensor.shape, _native(dtype))
  if tensor.stride is None:  # .npz: a contiguous array after its header
    flat = np.frombuffer(raw, dtype, count=tensor.size, offset=tensor.offset)
    array = (flat.reshape(tensor.shape[::-1]).T if tensor.fortran
             else flat.reshape(tensor.shape))
  else:  # .pth: a strided view into its storage, checked to lie inside it
    storage = np.frombuffer(raw, dtype)
    array = np.lib.stride_tricks.as_strided(
        storage[tensor.offset:], shape=tensor.shape,
        strides=tuple(s * dtype.itemsize for s in tensor.stride))
  return np.array(array, dtype=_native(dtype), order="C", copy=True)


def read_state_dict(path: str | Path, *,
                    max_elements: int | None = None) -> dict[str, np.ndarray]:
  """Reads a state dict from `.safetensors`, `.npz` or a zip-format `.pth`/`.pt` file.

  Every tensor is validated from the file's metadata before any tensor data is read.

  Args:
    path: the checkpoint file.
    max_elements: when given, refuse the file if any tensor has more elements than this
      (checked before reading tensor data).

  Returns:
    Key -> NumPy array (C-contiguous, native byte order), keys as saved (torchvision names for
    a torchvision checkpoint).

  Raises:
    WeightsError: the file is missing, a directory, of an unknown extension, a legacy (non-zip)
      torch file, corrupt or truncated, a `.pth` whose pickle references a disallowed global
      (nothing is run) or whose tensors lie outside their storages, a `.npz` with object
      arrays, not a flat key -> tensor mapping, or has a tensor over `max_elements`.
  """
  path = Path(path)
  kind, tensors = _scan(path)
  if max_elements is not None:
    for key, tensor in tensors.items():
      if tensor.size > max_elements:
        raise WeightsError(
            f"{str(path)!r}: tensor {key!r} has shape {tensor.shape} ({tensor.size} elements), "
            f"more than the {max_elements} allowed; check that this is the checkpoint you meant")
  return _materialise(path, kind, tensors)


def state_dict_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
  """Checks a checkpoint file from its metadata alone: key -> shape, no tensor data read.

  The same checks as `read_state_dict` makes before reading data, for an early and cheap
  refusal (e.g. before a run prepares its data); `load_backbone` still checks the shapes.

  Raises:
    WeightsError: as `read_state_dict`.
  """
  return {key: tensor.shape for key, tensor in _scan(Path(path))[1].items()}


# --- conversion -----------------------------------------------------------------------------------

# torchvision key grammar: stem, fc, or layerL.i.<module>.<leaf>.
_KEY_RE = re.compile(
    r"^(?:(?P<stem>conv1|bn1)|layer(?P<layer>[1-4])\.(?P<block>\d+)\."
    r"(?P<mod>conv[1-3]|bn[1-3]|downsample\.[01])|(?P<fc>fc))\.(?P<leaf>\w+)$")
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_OIHW_TO_HWIO = (2, 3, 1, 0)
_FLAX_LEAVES = ("kernel", "scale", "bias", "mean", "var")


def _map_shape(key: str, shape: tuple[int, ...], source: str | None = None
               ) -> tuple[str, tuple[str, ...], tuple[int, ...] | None] | None:
  """Maps one torchvision key to (collection, flax path, axis permutation or None).

  None for dropped keys (`num_batches_tracked`). Raises WeightsError for a key or shape that is
  not a torchvision ResNet tensor; `source` names the file in the message.
  """
  where = f"state dict key {key!r}" + (f" in {source!r}" if source else "")
  match = _KEY_RE.match(key)
  if match is None:
    raise WeightsError(
        f"{where} is not a torchvision ResNet key; cannot map it; pass a torchvision ResNet "
        f"checkpoint (keys like 'layer1.0.conv1.weight'), with wrapper prefixes such as "
        f"'module.' removed")
  leaf, ndim = match["leaf"], len(shape)
  if match["fc"]:
    if leaf == "weight" and ndim == 2:
      return "params", ("fc", "kernel"), (1, 0)
    if leaf == "bias" and ndim == 1:
      return "params", ("fc", "bias"), None
  else:
    if match["stem"]:
      prefix, mod = (), match["stem"]
    else:
      prefix, mod = (f"layer{match['layer']}_{match['block']}",), match["mod"].replace(".", "_")
    if mod.startswith("conv") or mod == "downsample_0":
      if leaf == "weight" and ndim == 4:
        return "params", prefix + (mod, "kernel"), _OIHW_TO_HWIO
    elif leaf == "num_batches_tracked":
      return None
    elif leaf in _BN_LEAVES and ndim == 1:
      collection, name = _BN_LEAVES[leaf]
      return collection, prefix + (mod, name), None
  raise WeightsError(
      f"{where} with shape {tuple(shape)} does not match a torchvision ResNet tensor (conv "
      f"weights are 4-D OIHW without bias, BN tensors 1-D); cannot map it; pass a torchvision "
      f"ResNet checkpoint")


def _map_key(key: str, value: np.ndarray) -> tuple[str, tuple[str, ...], np.ndarray] | None:
  """Maps one torchvision key to (collection, flax path, array); None for dropped keys."""
  mapped = _map_shape(key, value.shape)
  if mapped is None:
    return None
  collection, path, perm = mapped
  return collection, path, value if perm is None else value.transpose(perm)


def torchvision_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """Converts a torchvision ResNet state dict to nested Flax collections.

  Args:
    state_dict: torchvision key -> array.

  Returns:
    {'params': nested dict, 'batch_stats': nested dict} of NumPy arrays, named as
    `maumjax.models.resnet.ResNet` names its modules (with `fc` when the dict has it).

  Raises:
    WeightsError (a ValueError): a key that is not a torchvision ResNet tensor.
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


def flax_to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `torchvision_to_flax`: a `ResNet`'s variables as a torchvision state dict.

  For writing a backbone trained in maumjax where a torchvision checkpoint is expected (e.g. a
  `model.pretrained` file, `save_state_dict`): conv kernels HWIO -> OIHW, BN scale/bias ->
  weight/bias, batch_stats mean/var -> running_mean/var, `fc` transposed.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of one `maumjax.models.resnet.ResNet`
      (the modules named conv1, bn1, layerL_i/..., and fc when it has one).

  Returns:
    torchvision key -> float32 NumPy array, e.g. 'layer1.0.conv1.weight'.

  Raises:
    ValueError: a variable that is not part of a torchvision ResNet (e.g. a non-local block).
  """
  out = {}
  for collection in _COLLECTIONS:
    for path, leaf in _flatten(variables.get(collection, {})).items():
      array = np.asarray(leaf, np.float32)
      if array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
      elif array.ndim == 2:
        array = array.T
      key, mapped = None, None
      if not NON_LOCAL_NAME.match(path[0]) and path[-1] in _FLAX_LEAVES:
        key = _torch_key(path)
        try:
          mapped = _map_shape(key, array.shape)
        except WeightsError:
          pass
      if mapped is None or mapped[:2] != (collection, path):
        raise ValueError(f"{collection}/{'/'.join(path)} has no torchvision ResNet "
                         f"counterpart; pass the variables of a plain ResNet (non_local='none')")
      out[key] = np.ascontiguousarray(array)
  return out


def save_state_dict(path: str | Path, state_dict: Mapping[str, np.ndarray]) -> Path:
  """Writes a state dict as `.safetensors` or `.npz` (by suffix), readable by
  `read_state_dict` and `load_backbone`; written to a temporary sibling and renamed, so a
  failure leaves no partial file."""
  path = Path(path)
  if path.suffix not in (".safetensors", ".npz"):
    raise ValueError(f"{path}: write a .safetensors or .npz file")
  tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
  try:
    if path.suffix == ".npz":
      np.savez(tmp, **{k: np.asarray(v) for k, v in state_dict.items()})
    else:
      from safetensors.numpy import save_file

      save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(tmp))
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def _guess_arch(shapes: Mapping[str, tuple[int, ...]]) -> str:
  blocks = [len({k.split(".")[1] for k in shapes if k.startswith(f"layer{s}.")})
            for s in range(1, 5)]
  block = "bottleneck" if any(".conv3." in k for k in shapes) else "basic"
  conv1 = shapes.get("conv1.weight")
  width = conv1[0] if conv1 else None
  for name, spec in ARCHS.items():
    if (spec.block, list(spec.layers), spec.width) == (block, blocks, width):
      return name
  return f"an unknown arch ({block} blocks {blocks}, stem width {width})"


def guess_arch(state_dict: Mapping[str, np.ndarray]) -> str:
  """Names the `ARCHS` variant whose layout matches a torchvision state dict, if any."""
  return _guess_arch({k: tuple(np.shape(v)) for k, v in state_dict.items()})


# --- loading --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `load_backbone` did.

  Attributes:
    loaded: flax paths written, e.g. 'params/rgb/conv1/kernel'.
    unused: torch keys not copied anywhere (`fc.*`; `num_batches_tracked` is dropped silently).
    source: the file path, or '<state dict>' when given a mapping.
    sha256: hex SHA-256 of the file; None when given a mapping.
    kept: flax paths of backbone variables left at their init because torchvision has no such
      tensors: the non-local blocks' (e.g. 'params/shared/nonlocal2_2/theta/kernel').
  """

  loaded: tuple[str, ...]
  unused: tuple[str, ...]
  source: str
  sha256: str | None
  kept: tuple[str, ...] = ()


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
  # Inverse of _map_shape for messages: layer1_0/downsample_0/kernel -> torch key.
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
  Non-local blocks, which torchvision lacks, keep their values (`LoadReport.kept`).
  A file's tensors are checked against the model's shapes before any tensor data is read, and
  only the tensors the model uses are read.

  Args:
    variables: the model's variables from `model.init` ({'params', 'batch_stats', ...}).
    path_or_state_dict: a checkpoint file (see `read_state_dict`) or a torchvision-keyed dict.
    model: the ReidNet the variables belong to (for its arch in error messages).

  Returns:
    (new variables as fresh nested dicts, LoadReport). The input is not modified.

  Raises:
    WeightsError (a ValueError): the file cannot be read (see `read_state_dict`), a backbone
      variable is missing from the checkpoint or has another shape, the checkpoint has
      backbone tensors the model lacks, or its keys are not torchvision's.
    ValueError: `variables` lack a backbone module of `model`.
  """
  path, kind, tensors = None, "", None
  if isinstance(path_or_state_dict, Mapping):
    state_dict: dict[str, Any] = dict(path_or_state_dict)
    source = "<state dict>"
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  else:
    path, source = Path(path_or_state_dict), str(path_or_state_dict)
    kind, tensors = _scan(path)
    shapes = {k: t.shape for k, t in tensors.items()}
  # (collection, flax path) -> (torch key, axis permutation, flax shape); no tensor data yet.
  mapped = {}
  for key, shape in shapes.items():
    found = _map_shape(key, shape, source)
    if found is not None:
      collection, flax_path, perm = found
      mapped[collection, flax_path] = (
          key, perm, tuple(shape[i] for i in perm) if perm else tuple(shape))
  hint = (f"the checkpoint seems to be {_guess_arch(shapes)}, the model is "
          f"{type(model).__name__}(arch={model.arch!r}); load a checkpoint of that arch or set "
          f"--config.model.arch to match")

  expected = (("rgb", "ir") if model.specific_stages > 0 else ()) + (
      ("shared",) if model.specific_stages < NUM_STAGES else ())
  missing = [m for m in expected if m not in variables.get("params", {})]
  if missing:
    raise ValueError(
        f"variables have no params for backbone modules {missing} that "
        f"{type(model).__name__}(specific_stages={model.specific_stages}) has; pass the variables from this "
        f"model's own init")
  plan = []  # (collection, module, flax path, torch key, perm, dtype), all shapes checked
  kept = []  # non-local block variables: not in torchvision checkpoints, left at their init
  for collection in _COLLECTIONS:
    for module in BACKBONE_MODULES:
      if module not in variables.get(collection, {}):
        continue
      for flax_path, leaf in _flatten(variables[collection][module]).items():
        where = f"{collection}/{module}/{'/'.join(flax_path)}"
        if NON_LOCAL_NAME.match(flax_path[0]):
          kept.append(where)
          continue
        if (collection, flax_path) not in mapped:
          raise WeightsError(
              f"{where} (torch key {_torch_key(flax_path)!r}) is missing from {source!r}; "
              f"{hint}")
        key, perm, shape = mapped[collection, flax_path]
        if shape != tuple(leaf.shape):
          raise WeightsError(
              f"{where}: expected shape {tuple(leaf.shape)}, found {shape} in {source!r}; "
              f"{hint}")
        plan.append((collection, module, flax_path, key, perm, leaf.dtype))
  used = {step[3] for step in plan}
  unused = sorted(key for key, *_ in mapped.values() if key not in used)
  stray = [key for key in unused if not key.startswith("fc.")]
  if stray:
    raise WeightsError(
        f"the checkpoint {source!r} has backbone tensors the model does not have, e.g. "
        f"{stray[:3]}; {hint}")

  digest = None
  if path is not None:  # read only the tensors the model uses, their shapes now known
    state_dict = _materialise(path, kind, {k: tensors[k] for k in sorted(used)})
    digest = sha256(path)
  new = _copy_tree(variables)
  loaded = []
  for collection, module, flax_path, key, perm, dtype in plan:
    value = np.asarray(state_dict[key])
    node = new[collection][module]
    for part in flax_path[:-1]:
      node = node[part]
    node[flax_path[-1]] = jnp.asarray(value if perm is None else value.transpose(perm),
                                      dtype=dtype)
    loaded.append(f"{collection}/{module}/{'/'.join(flax_path)}")
  return new, LoadReport(tuple(loaded), tuple(unused), source, digest, tuple(kept))
