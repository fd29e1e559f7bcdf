"""Builds the SYSU-MM01 and RegDB TFDS datasets without TensorFlow, and opens them for reading.

The `tfds` command line needs TensorFlow, so builds go through this module instead
(protocol.md 7.1), always as array_record, which `tfds.data_source` and Grain read directly:

  python -m maumjax.data.build sysu_mm01 --manual_dir ~/data/manual --data_dir ~/tfds
  python -m maumjax.data.build regdb --manual_dir ~/data/RegDB --data_dir ~/tfds \
      --config trial_3
  python -m maumjax.data.build sysu_mm01 --manual_dir ... --data_dir ... --height 256 --width 128

The layout and every image are validated before anything is written, and a failed build leaves
nothing behind. A build records what it was built from and is rebuilt when the manual dir
points elsewhere or its files changed (see `build`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from maumjax.data import images, layouts, progress
from maumjax.data.regdb import Regdb, RegdbConfig
from maumjax.data.sysu_mm01 import SysuMm01, SysuMm01Config
from maumjax.errors import UserError, one_line

try:
  import fcntl
except ImportError:  # not POSIX: builds are not locked against each other
  fcntl = None

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "sysu_mm01": SysuMm01,
    "regdb": Regdb,
}
FILE_FORMAT = "array_record"
# TFDS writes into <config>/incomplete.<random suffix>_<version>/ and renames it on success
# (here inside a staging folder; a build killed before staging existed left it beside the
# version folder).
_INCOMPLETE_GLOB = "incomplete.*"
# In <data_dir>/<name>/<config>/: the lock held while building, the staging folders of builds
# in progress (`_write_staged`), and a replaced build on its way out.
_LOCK_FILE = ".maumjax-build.lock"
_STAGING_PREFIX = ".maumjax-staging-"
_REPLACED_PREFIX = ".maumjax-replaced-"
# In the version folder of a finished build: what it was built from (`source_record`).
SOURCE_FILE = "maumjax_source.json"

PathLike = str | os.PathLike[str]
Config = str | tfds.core.BuilderConfig | None


def _builder_cls(name: str) -> type[tfds.core.GeneratorBasedBuilder]:
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
  return BUILDERS[name]


def make_config(name: str, config: str | None = None, *, height: int | None = None,
                width: int | None = None,
                image_format: str | None = None) -> SysuMm01Config | RegdbConfig:
  """Returns a predefined config, or a copy with another size or format under its own name.

  Args:
    name: 'sysu_mm01' or 'regdb'.
    config: a predefined config name ('288x144', 'trial_3', ...); None for the default.
    height, width, image_format: overrides; the new config is named after them
      (e.g. '256x128', 'trial_3_256x128_jpeg') so builds of different sizes never collide.

  Raises:
    ValueError: unknown dataset or config name.
  """
  cls = _builder_cls(name)
  predefined = {c.name: c for c in cls.BUILDER_CONFIGS}
  config = config or cls.DEFAULT_CONFIG_NAME
  if config not in predefined:
    raise ValueError(f"unknown {name} config {config!r}; choose one of {sorted(predefined)}, "
                     "or pass --height/--width for another size")
  base = predefined[config]
  fields = {"height": height or base.height, "width": width or base.width,
            "image_format": image_format or base.image_format}
  if all(getattr(base, k) == v for k, v in fields.items()):
    return base
  size = f'{fields["height"]}x{fields["width"]}'
  suffix = "" if fields["image_format"] == "png" else f'_{fields["image_format"]}'
  new_name = f"{size}{suffix}" if name == "sysu_mm01" else f"{base.name}_{size}{suffix}"
  if new_name in predefined:
    return predefined[new_name]
  return dataclasses.replace(base, name=new_name, description=f"{base.name} at {size}.", **fields)


def _resolve_config(name: str, config: Config) -> SysuMm01Config | RegdbConfig:
  """Turns `config` into a config instance and checks its fields."""
  cls = _builder_cls(name)
  if config is None or isinstance(config, str):
    return make_config(name, config)
  expected = RegdbConfig if name == "regdb" else SysuMm01Config
  if not isinstance(config, expected):
    raise ValueError(f"{name} needs a {expected.__name__}, got {type(config).__name__}")
  if config.image_format not in images.IMAGE_FORMATS:
    raise ValueError(f"image_format {config.image_format!r} of config {config.name!r} is not "
                     f"one of {images.IMAGE_FORMATS}")
  if min(config.height, config.width) < 1:
    raise ValueError(f"config {config.name!r} has size {config.height}x{config.width}; "
                     "height and width must be positive")
  if isinstance(config, RegdbConfig) and config.trial not in layouts.REGDB_TRIALS:
    raise ValueError(f"config {config.name!r} has trial {config.trial}; choose one of "
                     f"{layouts.REGDB_TRIALS}")
  for known in cls.BUILDER_CONFIGS:
    # Same name means same output directory, so the fields must agree.
    if known.name == config.name and _fields(known) != _fields(config):
      raise ValueError(f"config name {config.name!r} is predefined as {_fields(known)}, not "
                       f"{_fields(config)}; give your config another name")
  return config


def _fields(config: SysuMm01Config | RegdbConfig) -> dict[str, int | str]:
  names = ("trial", "height", "width", "image_format")
  return {n: getattr(config, n) for n in names if hasattr(config, n)}


def _find_root(name: str, manual_dir: Path, flag: str) -> Path:
  if name == "sysu_mm01":
    return layouts.find_sysu_root(manual_dir, flag=flag)
  return layouts.find_regdb_root(manual_dir, flag=flag)


def _scan(name: str, root: Path,
          config: SysuMm01Config | RegdbConfig) -> tuple[dict[str, list[layouts.Record]],
                                                        tuple[str, ...]]:
  """The records of every split (what the builder will write) and the ignored files."""
  if name == "sysu_mm01":
    tree = layouts.scan_sysu_mm01(root)
    return ({split: layouts.sysu_records(tree, split) for split in layouts.SYSU_SPLITS},
            tree.ignored)
  tree = layouts.scan_regdb(root, trials=(config.trial,))
  return ({split: layouts.regdb_records(tree, config.trial, split)
           for split in layouts.REGDB_SPLITS}, tree.ignored)


def validate_layout(name: str, manual_dir: PathLike, config: Config = None, *,
                    flag: str = layouts.MANUAL_DIR_FLAG) -> Path:
  """Scans and validates the manual directory for `name` without writing anything.

  Args:
    name: 'sysu_mm01' or 'regdb'.
    manual_dir: the directory holding the extracted dataset (or its parent).
    config: see `build`.
    flag: the caller's flag for the manual dir, named in the messages.

  Returns:
    The dataset root found in (or below) `manual_dir`.

  Raises:
    LayoutError: see `layouts.scan_sysu_mm01` and `layouts.scan_regdb`.
  """
  config = _resolve_config(name, config)
  root = _find_root(name, Path(manual_dir).expanduser(), flag)
  _scan(name, root, config)
  return root


def source_record(name: str, manual_dir: PathLike, config: Config = None, *,
                  flag: str = layouts.MANUAL_DIR_FLAG) -> dict[str, int | str]:
  """What a build of `manual_dir` is built from: resolved paths and a cheap fingerprint.

  The fingerprint (`layouts.sysu_fingerprint` / `regdb_fingerprint`) covers the names and
  sizes of the image files and the contents of the split files, from a stat walk; SYSU-MM01's
  about 45,000 files take well under a second once the directory entries are cached.

  Raises:
    LayoutError: the manual dir is missing or holds no dataset.
  """
  config = _resolve_config(name, config)
  manual_dir = Path(manual_dir).expanduser()
  root = _find_root(name, manual_dir, flag)
  if name == "sysu_mm01":
    fingerprint = layouts.sysu_fingerprint(root)
  else:
    fingerprint = layouts.regdb_fingerprint(root, (config.trial,))
  return {"manual_dir": str(manual_dir.resolve()), "root": str(root.resolve()), **fingerprint}


def read_source_record(version_dir: PathLike) -> dict[str, Any] | None:
  """The source record of a finished build in `version_dir`; None if absent or unreadable."""
  version_dir = Path(version_dir)
  if not (version_dir / "dataset_info.json").is_file():
    return None
  try:
    record = json.loads((version_dir / SOURCE_FILE).read_text())
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def _same_source(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> bool:
  return recorded is not None and all(recorded.get(k) == current[k] for k in ("root", "sha1"))


def _why_rebuild(label: str, version_dir: Path, recorded: Mapping[str, Any] | None,
                 current: Mapping[str, Any]) -> str:
  """One line saying why an existing build of `label` is not reused."""
  keep = "the old build stays until the new one is complete"
  if recorded is None:
    return (f"{label} in {version_dir} does not record what it was built from (an older "
            f"maumjax built it); rebuilding it from {current['root']}, {keep}")
  if recorded.get("root") != current["root"]:
    return (f"{label} in {version_dir} was built from {recorded.get('root')}, not from "
            f"{current['root']}; rebuilding, {keep}")
  return (f"{current['root']} changed since {label} was built ({recorded.get('files')} files, "
          f"{recorded.get('bytes')} bytes then; {current['files']} files, {current['bytes']} "
          f"bytes now); rebuilding, {keep}")


class _DropCustomConfigWarning(logging.Filter):
  """TFDS warns "Using custom data configuration: <config repr>" for every sized config."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  """Without TFDS's progress bars (the build shows its own count) and config-repr warning."""
  from tensorflow_datasets.core.utils import tqdm_utils

  active = getattr(tqdm_utils, "_active", True)
  drop = _DropCustomConfigWarning()
  absl_logger = logging.getLogger("absl")
  tfds.display_progress_bar(False)
  absl_logger.addFilter(drop)
  try:
    yield
  finally:
    absl_logger.removeFilter(drop)
    tfds.display_progress_bar(active)


def _open(cls: type[tfds.core.GeneratorBasedBuilder], data_dir: Path,
          config: SysuMm01Config | RegdbConfig) -> tfds.core.DatasetBuilder:
  with _quiet_tfds():
    return cls(data_dir=os.fspath(data_dir), config=config, file_format=FILE_FORMAT)


@contextlib.contextmanager
def _build_lock(config_dir: Path, label: str) -> Iterator[None]:
  """Holds an exclusive lock on `config_dir` (released by the kernel if the process dies)."""
  with open(config_dir / _LOCK_FILE, "a") as lock:
    if fcntl is not None:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        progress.note(f"waiting for another process that is building {label} in {config_dir}")
        fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _remove_leftovers(config_dir: Path) -> None:
  """Removes what interrupted builds left in `config_dir` (call it holding the lock).

  A killed build leaves its staging folder (which holds TFDS's incomplete.* folder), or an
  incomplete.* folder of its own when TFDS built here directly, or the previous build if it
  died while swapping the new one in.
  """
  for pattern in (_INCOMPLETE_GLOB, f"{_STAGING_PREFIX}*", f"{_REPLACED_PREFIX}*"):
    for path in sorted(config_dir.glob(pattern)):
      progress.note(f"removing {path}, left by an interrupted build")
      shutil.rmtree(path, ignore_errors=True)


def _remove_new(paths_before: Mapping[Path, bool]) -> None:
  """Deletes the folders in `paths_before` (innermost first) that did not exist before."""
  for path, existed in paths_before.items():
    if not existed and path.exists():
      shutil.rmtree(path, ignore_errors=True)


def _write_staged(cls: type[tfds.core.GeneratorBasedBuilder], config: SysuMm01Config | RegdbConfig,
                  *, manual_dir: Path, data_dir: Path, source: Mapping[str, Any], total: int,
                  flag: str) -> None:
  """Builds into a staging folder beside the final one, then moves the result into place.

  A good build already in place is replaced only once the new one is complete: two renames,
  so a reader sees the old or the new build, and a process killed in between leaves no build
  (the next one rebuilds). The staging folder is removed in any case.
  """
  name = cls.name
  config_dir = data_dir / name / config.name
  version_dir = config_dir / str(cls.VERSION)
  staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=config_dir))
  try:
    with progress.Progress(f"building {name}/{config.name}", total) as bar:
      builder = _open(cls, staging, config)
      builder.manual_dir_flag = flag
      builder.progress = bar.update
      with _quiet_tfds():
        builder.download_and_prepare(
            file_format=FILE_FORMAT,
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    built = staging / name / config.name / str(cls.VERSION)
    (built / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
    metadata = staging / name / ".config"  # TFDS's default-config note, kept once per dataset
    if metadata.is_dir() and not (data_dir / name / ".config").exists():
      metadata.rename(data_dir / name / ".config")
    if version_dir.exists():
      replaced = Path(tempfile.mkdtemp(prefix=_REPLACED_PREFIX, dir=config_dir))
      version_dir.rename(replaced / "old")
      built.rename(version_dir)
      shutil.rmtree(replaced, ignore_errors=True)
    else:
      built.rename(version_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _summary(label: str, version_dir: Path, seconds: float,
             splits: Mapping[str, Sequence[layouts.Record]], ignored: Sequence[str]) -> str:
  counts = ", ".join(f"{split} {len(records)}" for split, records in splits.items())
  line = f"built {label} in {version_dir} in {seconds:.1f} s ({counts})"
  if ignored:
    line += (f"; ignored {len(ignored)} file(s) in identity folders that are not dataset "
             f"images, e.g. {ignored[0]!r}")
  return line


def build(name: str, *, manual_dir: PathLike, data_dir: PathLike, config: Config = None,
          flag: str = layouts.MANUAL_DIR_FLAG) -> tfds.core.DatasetBuilder:
  """Validates the manual directory and builds the dataset as array_record, or reuses a build.

  A finished build records what it was built from (`SOURCE_FILE` in its version folder: the
  resolved manual dir and dataset root, and the fingerprint of `source_record`). It is reused
  only when the manual dir still resolves to the same root with the same fingerprint;
  otherwise (another folder, added, removed or resized files, changed split files, or a build
  from before the record existed) the dataset is rebuilt, and the old build is replaced only
  once the new one is complete.

  Before anything is written the layout is scanned and every image is checked
  (`images.check_images`); a problem raises `LayoutError` with one line naming the file. The
  build then runs under a lock on its config folder, removes what interrupted builds left
  there, and writes into a staging folder that it moves into place when complete.

  Args:
    name: 'sysu_mm01' or 'regdb'.
    manual_dir: the directory holding the extracted dataset (or its parent).
    data_dir: TFDS data directory; output goes to <data_dir>/<name>/<config>/<version>.
    config: a predefined config name, a config instance (e.g.
      `SysuMm01Config(name='64x32', height=64, width=32)`), or None for the default.
    flag: the caller's flag for the manual dir, named in the messages ('--manual_dir' for the
      build command line, '--config.data.manual_dir' for training).

  Returns:
    The prepared builder; `builder.as_data_source(split)` reads it.

  Raises:
    LayoutError: bad layout or an undecodable image; nothing new is left in `data_dir`.
    ValueError: unknown dataset or config.
  """
  config = _resolve_config(name, config)
  cls = _builder_cls(name)
  manual_dir = Path(manual_dir).expanduser()
  data_dir = Path(data_dir).expanduser().absolute()
  config_dir = data_dir / name / config.name
  version_dir = config_dir / str(cls.VERSION)
  label = f"{name}/{config.name}"
  source = source_record(name, manual_dir, config, flag=flag)
  if _same_source(read_source_record(version_dir), source):
    progress.note(f"using {label} in {version_dir} (built from {source['root']})")
    return _open(cls, data_dir, config)
  start = time.perf_counter()
  root = Path(source["root"])
  splits, ignored = _scan(name, root, config)
  total = sum(len(records) for records in splits.values())
  images.check_images(root, (r for records in splits.values() for r in records))
  checked = time.perf_counter() - start
  tracked = [config_dir, data_dir / name, data_dir]  # innermost first
  paths_before = {p: p.exists() for p in tracked}
  try:
    config_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(config_dir, label):
      recorded = read_source_record(version_dir)
      if _same_source(recorded, source):  # another process built it while we waited
        progress.note(f"using {label} in {version_dir} (built from {source['root']})")
        return _open(cls, data_dir, config)
      _remove_leftovers(config_dir)
      if (version_dir / "dataset_info.json").is_file():
        progress.note(_why_rebuild(label, version_dir, recorded, source))
      progress.note(f"Building {label} from {root} into {version_dir}: {total} images (all "
                    f"checked in {checked:.1f} s) ...")
      _write_staged(cls, config, manual_dir=manual_dir, data_dir=data_dir, source=source,
                    total=total, flag=flag)
  except BaseException:
    _remove_new(paths_before)
    raise
  progress.note(_summary(label, version_dir, time.perf_counter() - start, splits, ignored))
  return _open(cls, data_dir, config)


def load_source(name: str, split: str, *, data_dir: PathLike,
                config: Config = None) -> Sequence[dict[str, Any]]:
  """Opens a prepared split as a random-access sequence of dicts of NumPy values.

  Reads the stored dataset_info, so configs made by `make_config` need no registration.
  `path` comes back as bytes, images as uint8 [H, W, 3].

  Raises:
    FileNotFoundError: the dataset was not built into `data_dir`.
  """
  cls = _builder_cls(name)
  if isinstance(config, tfds.core.BuilderConfig):
    config_name = config.name
  else:
    config_name = config or cls.DEFAULT_CONFIG_NAME
  builder_dir = Path(data_dir) / name / config_name / str(cls.VERSION)
  if not (builder_dir / "dataset_info.json").is_file():
    raise FileNotFoundError(
        f"{name}/{config_name} is not prepared in {str(builder_dir)!r}; run python -m "
        f"maumjax.data.build {name} --manual_dir DIR --data_dir {data_dir} first")
  return tfds.builder_from_directory(os.fspath(builder_dir)).as_data_source(split)


def main(argv: Sequence[str] | None = None) -> None:
  """Command line entry point; see the module docstring."""
  parser = argparse.ArgumentParser(prog="python -m maumjax.data.build", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", choices=sorted(BUILDERS))
  parser.add_argument("--manual_dir", required=True, help="the extracted dataset (or parent)")
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write to")
  parser.add_argument("--config", help="predefined config name (default: the builder default)")
  parser.add_argument("--height", type=int, help="stored image height (new config)")
  parser.add_argument("--width", type=int, help="stored image width (new config)")
  parser.add_argument("--image_format", choices=images.IMAGE_FORMATS,
                      help="png (lossless, default) or jpeg (quality 95)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  try:
    config = make_config(args.name, args.config, height=args.height, width=args.width,
                         image_format=args.image_format)
    build(args.name, manual_dir=args.manual_dir, data_dir=args.data_dir, config=config,
          flag="--manual_dir")
  except (UserError, ValueError) as e:
    sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
  main()
