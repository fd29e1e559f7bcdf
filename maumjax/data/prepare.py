"""From a data config to a prepared TFDS dataset: generate synthetic data if asked, then build.

Entry modules call `prepare_dataset(config.data)`; nothing below them sees a ConfigDict.
An empty `manual_dir` means "use the built-in synthetic data": the generator writes the real
on-disk layout into the cache directory once per parameter set, and the builder reads it like
a user's real copy. A build records the folder it was built from and is rebuilt when the
manual dir points elsewhere or its files changed (`maumjax.data.build.build`), so one cache
serves several copies of a dataset without mixing them up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DATASETS = ("sysu_mm01", "regdb")
# The training flag that sets the manual dir; `prepare_dataset` names it in its messages.
TRAIN_MANUAL_DIR_FLAG = "--config.data.manual_dir"


def cache_root() -> Path:
  """`$MAUMJAX_CACHE`, else `$XDG_CACHE_HOME/maumjax`, else `~/.cache/maumjax`."""
  if os.environ.get("MAUMJAX_CACHE"):
    return Path(os.environ["MAUMJAX_CACHE"]).expanduser()
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "maumjax"


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Parameters of the built-in synthetic data (see `maumjax.data.synthetic`)."""

  num_identities: int = 40
  images_per_camera: int = 12  # SYSU layout: images per (camera, identity) folder
  images_per_modality: int = 10  # RegDB layout: images per identity per modality
  height: int = 128
  width: int = 64
  seed: int = 0
  nir: float = 0.0  # SYSU layout: near-infrared weight of the infrared cameras (0 = thermal)

  def __post_init__(self):
    if not 0.0 <= self.nir <= 1.0:
      raise ValueError(f"data.synthetic.nir={self.nir!r} must be in [0, 1]: the weight of "
                       "reflected near-infrared light in the synthetic infrared images")

  def key(self, name: str) -> str:
    fields = dataclasses.asdict(self)
    if not fields["nir"]:
      del fields["nir"]  # the key of every tree written before the field existed
    blob = json.dumps({"name": name, **fields}, sort_keys=True)
    return f"{name}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  """A built dataset: where its source folder and its TFDS files are.

  Attributes:
    name: 'sysu_mm01' or 'regdb'.
    manual_dir: the extracted (or synthetic) dataset folder the builder read.
    data_dir: the TFDS data_dir holding the array_record files.
    builder: the prepared `tfds.core.DatasetBuilder`.
    synthetic: True when the data are the built-in synthetic stand-in.
  """

  name: str
  manual_dir: Path
  data_dir: Path
  builder: Any
  synthetic: bool


def write_synthetic(name: str, spec: SyntheticSpec, root: Path | None = None) -> Path:
  """Writes (once) the synthetic tree for `spec` under the cache and returns its folder."""
  from maumjax.data import progress, synthetic

  if spec.nir and name != "sysu_mm01":
    raise ValueError(f"data.synthetic.nir={spec.nir} applies to the SYSU-MM01 layout only "
                     f"(RegDB's infrared camera is thermal); set it to 0 for {name}")
  out = (root or cache_root() / "synthetic") / spec.key(name)
  if out.is_dir() and any(out.iterdir()):
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  sysu = name == "sysu_mm01"
  if sysu:
    per_folder = f"{spec.images_per_camera} per camera folder"
    total = synthetic.sysu_image_count(spec.num_identities, spec.images_per_camera, spec.seed)
  else:
    per_folder = f"{spec.images_per_modality} per identity and modality"
    total = 2 * spec.num_identities * spec.images_per_modality
  nir = f", near-infrared weight {spec.nir}" if spec.nir else ""
  progress.note(f"Generating synthetic {name} data ({spec.num_identities} identities, {total} "
                f"images, {per_folder}, {spec.height}x{spec.width}, seed {spec.seed}{nir}) into "
                f"{out}; once per parameter set ...")
  start = time.perf_counter()
  with progress.Progress(f"generating synthetic {name}", total) as bar:
    if sysu:
      synthetic.write_sysu_mm01(out, num_identities=spec.num_identities,
                                images_per_camera=spec.images_per_camera, height=spec.height,
                                width=spec.width, seed=spec.seed, nir=spec.nir,
                                progress=bar.update)
    else:
      synthetic.write_regdb(out, num_identities=spec.num_identities,
                            images_per_modality=spec.images_per_modality, height=spec.height,
                            width=spec.width, seed=spec.seed, progress=bar.update)
  progress.note(f"generated {total} images in {time.perf_counter() - start:.1f} s")
  return out


def prepare_dataset(name: str, *, manual_dir: str | os.PathLike | None = None,
                    data_dir: str | os.PathLike | None = None, height: int = 288,
                    width: int = 144, trial: int = 1, image_format: str = "png",
                    synthetic: SyntheticSpec = SyntheticSpec(),
                    manual_dir_flag: str = TRAIN_MANUAL_DIR_FLAG) -> PreparedDataset:
  """Builds (or reuses) the TFDS dataset `name` at `height` x `width`.

  A build in the cache is reused only if it was built from the same folder with the same files
  (see `maumjax.data.build.build`); otherwise it is rebuilt before training starts.

  Args:
    name: 'sysu_mm01' or 'regdb'.
    manual_dir: the extracted dataset folder; empty or None uses the synthetic data.
    data_dir: TFDS data_dir; defaults to `<cache>/tfds/real` or, for synthetic data, a folder
      keyed by the synthetic parameters (so a changed spec never reuses a stale build).
    height, width: stored image size (LANCZOS resize at build time).
    trial: RegDB trial 1..10.
    image_format: 'png' (lossless) or 'jpeg'.
    synthetic: parameters of the synthetic data, used when manual_dir is empty.
    manual_dir_flag: the caller's flag for the manual dir, named in the messages (a script
      with its own flag passes it, e.g. '--manual_dir').

  Raises:
    ValueError: unknown dataset name.
    maumjax.data.layouts.LayoutError: the manual dir is missing or malformed, or an image is
      unreadable (a `maumjax.errors.UserError`: one line naming the path and the fix).
  """
  from maumjax.data import build as build_lib

  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
  is_synthetic = not manual_dir
  if is_synthetic:
    manual = write_synthetic(name, synthetic)
    default_data_dir = cache_root() / "tfds" / synthetic.key(name)
  else:
    manual = Path(manual_dir).expanduser()
    default_data_dir = cache_root() / "tfds" / "real"
  out = Path(data_dir).expanduser() if data_dir else default_data_dir
  config = build_lib.make_config(name, None if name == "sysu_mm01" else f"trial_{trial}",
                                 height=height, width=width, image_format=image_format)
  builder = build_lib.build(name, manual_dir=manual, data_dir=out, config=config,
                            flag=manual_dir_flag)
  return PreparedDataset(name, manual, out, builder, is_synthetic)


def prepare_from_config(data: Mapping[str, Any]) -> PreparedDataset:
  """`prepare_dataset` from the plain-dict form of a config's `data` section."""
  return prepare_dataset(
      data["name"], manual_dir=data["manual_dir"] or None, data_dir=data["data_dir"] or None,
      height=data["height"], width=data["width"], trial=data["trial"],
      image_format=data["image_format"], synthetic=SyntheticSpec(**data["synthetic"]))
