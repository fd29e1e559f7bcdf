"""Builds the SYSU-MM01 and RegDB TFDS datasets without TensorFlow, and opens them for reading.

The `tfds` command line needs TensorFlow, so builds go through this module instead
(protocol.md 7.1), always as array_record, which `tfds.data_source` and Grain read directly:

  python -m maumjax.data.build sysu_mm01 --manual_dir ~/data/manual --data_dir ~/tfds
  python -m maumjax.data.build regdb --manual_dir ~/data/RegDB --data_dir ~/tfds \
      --config trial_3
  python -m maumjax.data.build sysu_mm01 --manual_dir ... --data_dir ... --height 256 --width 128

The layout is validated before anything is written, and a failed build leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from maumjax.data import images, layouts
from maumjax.data.regdb import Regdb, RegdbConfig
from maumjax.data.sysu_mm01 import SysuMm01, SysuMm01Config

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "sysu_mm01": SysuMm01,
    "regdb": Regdb,
}
FILE_FORMAT = "array_record"
# TFDS writes into <config>/incomplete.<random suffix>_<version>/ and renames it on success.
_INCOMPLETE_GLOB = "incomplete.*"

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


def validate_layout(name: str, manual_dir: PathLike, config: Config = None) -> Path:
  """Scans and validates the manual directory for `name` without writing anything.

  Returns:
    The dataset root found in (or below) `manual_dir`.

  Raises:
    LayoutError: see `layouts.scan_sysu_mm01` and `layouts.scan_regdb`.
  """
  config = _resolve_config(name, config)
  if name == "sysu_mm01":
    return layouts.scan_sysu_mm01(layouts.find_sysu_root(manual_dir)).root
  return layouts.scan_regdb(layouts.find_regdb_root(manual_dir), trials=(config.trial,)).root


def _remove_new(paths_before: dict[Path, bool], incomplete_before: set[Path],
                config_dir: Path) -> None:
  """Deletes what a failed `download_and_prepare` created.

  TFDS removes its own incomplete.* directory, but keeps <name>/.config/, the empty
  <name>/<config>/ and <data_dir>/downloads/; an interrupted process may keep more.
  """
  if config_dir.is_dir():
    for path in config_dir.glob(_INCOMPLETE_GLOB):
      if path not in incomplete_before:
        shutil.rmtree(path, ignore_errors=True)
  # Innermost first, so the outer checks see what remains.
  for path, existed in paths_before.items():
    if not existed and path.exists():
      shutil.rmtree(path, ignore_errors=True)


def build(name: str, *, manual_dir: PathLike, data_dir: PathLike,
          config: Config = None) -> tfds.core.DatasetBuilder:
  """Validates the manual directory and builds the dataset as array_record.

  Args:
    name: 'sysu_mm01' or 'regdb'.
    manual_dir: the directory holding the extracted dataset (or its parent).
    data_dir: TFDS data directory; output goes to <data_dir>/<name>/<config>/<version>.
    config: a predefined config name, a config instance (e.g.
      `SysuMm01Config(name='64x32', height=64, width=32)`), or None for the default.

  Returns:
    The prepared builder; `builder.as_data_source(split)` reads it.

  Raises:
    LayoutError: bad layout or an undecodable image; nothing is left in `data_dir`.
    ValueError: unknown dataset or config.
  """
  config = _resolve_config(name, config)
  cls = _builder_cls(name)
  manual_dir = Path(manual_dir).expanduser()
  data_dir = Path(data_dir).expanduser().absolute()
  version_dir = data_dir / name / config.name / str(cls.VERSION)
  builder = cls(data_dir=os.fspath(data_dir), config=config, file_format=FILE_FORMAT)
  if (version_dir / "dataset_info.json").is_file():
    logging.info("%s already prepared at %s; reusing it", name, version_dir)
    return builder
  validate_layout(name, manual_dir, config)
  config_dir = version_dir.parent
  tracked = [version_dir, config_dir, data_dir / name, data_dir / "downloads", data_dir]
  paths_before = {p: p.exists() for p in tracked}
  incomplete_before = set(config_dir.glob(_INCOMPLETE_GLOB)) if config_dir.is_dir() else set()
  try:
    builder.download_and_prepare(
        file_format=FILE_FORMAT,
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  except BaseException:
    _remove_new(paths_before, incomplete_before, config_dir)
    raise
  return builder


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
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    config = make_config(args.name, args.config, height=args.height, width=args.width,
                         image_format=args.image_format)
    builder = build(args.name, manual_dir=args.manual_dir, data_dir=args.data_dir, config=config)
  except (layouts.LayoutError, ValueError) as e:
    sys.exit(f"error: {e}")
  counts = ", ".join(f"{s}: {v.num_examples}" for s, v in builder.info.splits.items())
  print(f"built {args.name}/{config.name} in {builder.data_dir} ({counts})")


if __name__ == "__main__":
  main()
