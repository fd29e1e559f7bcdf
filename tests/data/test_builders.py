"""Builds the SYSU-MM01 and RegDB TFDS datasets from synthetic trees and checks them.

Expected records are derived here from the directory tree and split files directly, not via
`maumjax.data.layouts`, so the builders are checked against the layout definition.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from maumjax.data import build, layouts, synthetic
from maumjax.data.regdb import Regdb, RegdbConfig
from maumjax.data.sysu_mm01 import SysuMm01, SysuMm01Config
from tests.data.test_layouts import _write_regdb, _write_sysu

_SYSU_SMALL = SysuMm01Config(name="32x16", height=32, width=16)
_FIELDS = ("path", "identity", "label", "camera", "modality", "frame")


def _ids(path: Path) -> list[int]:
  return sorted(int(t) for t in re.split(r"[,\s]+", path.read_text()) if t)


def _folder_files(root: Path, cam: int, pid: int) -> list[Path]:
  return sorted((root / f"cam{cam}" / f"{pid:04d}").glob("*.jpg"))


def _expected_sysu(root: Path, split: str) -> list[dict]:
  exp = root / "exp"
  if split == "train":
    ids, cams = sorted(_ids(exp / "train_id.txt") + _ids(exp / "val_id.txt")), (1, 2, 4, 5, 3, 6)
  else:
    ids, cams = _ids(exp / "test_id.txt"), ((3, 6) if split == "query" else (1, 2, 4, 5))
  out = []
  for label, pid in enumerate(ids):
    for cam in cams:
      for f in _folder_files(root, cam, pid):
        out.append({"path": f.relative_to(root).as_posix(), "identity": pid,
                    "label": label if split == "train" else -1, "camera": cam,
                    "modality": int(cam in (3, 6)), "frame": int(f.stem)})
  return out


def _expected_regdb(root: Path, trial: int, split: str) -> list[dict]:
  kinds = {"train": ("train_visible", "train_thermal")}.get(split, (split,))
  out = []
  for kind in kinds:
    for line in (root / "idx" / f"{kind}_{trial}.txt").read_text().splitlines():
      rel, label = line.split()
      folder, pid, name = rel.split("/")
      out.append({"path": rel, "identity": int(pid), "label": int(label),
                  "camera": 1 if folder == "Visible" else 2, "modality": int(folder == "Thermal"),
                  "frame": int(name.split("_")[3])})
  return out


def _stored(source) -> list[dict]:
  rows = [source[i] for i in range(len(source))]
  return [{k: (r[k].decode() if k == "path" else int(r[k])) for k in _FIELDS} for r in rows]


def _assert_images_match(root: Path, source, height: int, width: int) -> None:
  for i in range(len(source)):
    row = source[i]
    expected = Image.open(root / row["path"].decode()).convert("RGB").resize(
        (width, height), Image.LANCZOS)
    np.testing.assert_array_equal(row["image"], np.asarray(expected), err_msg=row["path"])


def _leftovers(data_dir: Path) -> list[str]:
  return sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*")) \
      if data_dir.exists() else []


@pytest.fixture(scope="module")
def sysu(tmp_path_factory):
  base = tmp_path_factory.mktemp("sysu")
  root = synthetic.write_sysu_mm01(base / "manual" / "SYSU-MM01", num_identities=10,
                                   images_per_camera=3)
  builder = build.build("sysu_mm01", manual_dir=base / "manual", data_dir=base / "tfds",
                        config=_SYSU_SMALL)
  return root, builder, base / "tfds"


@pytest.fixture(scope="module")
def regdb(tmp_path_factory):
  base = tmp_path_factory.mktemp("regdb")
  root = synthetic.write_regdb(base / "RegDB", num_identities=10, images_per_modality=3)
  builders = {t: build.build("regdb", manual_dir=root, data_dir=base / "tfds",
                             config=RegdbConfig(name=f"t{t}", trial=t, height=32, width=16))
              for t in (1, 3)}
  return root, builders, base / "tfds"


@pytest.mark.parametrize("split", ["train", "query", "gallery"])
def test_sysu_splits_match_tree(sysu, split):
  root, builder, _ = sysu
  source = builder.as_data_source(split)
  expected = _expected_sysu(root, split)
  assert builder.info.splits[split].num_examples == len(expected) > 0
  # Same records in generation order: storage was not shuffled.
  assert _stored(source) == expected
  _assert_images_match(root, source, 32, 16)
  if split == "train":
    labels = [r["label"] for r in expected]
    assert sorted(set(labels)) == list(range(len(set(labels))))
  assert "tensorflow" not in sys.modules


def test_sysu_extra_ids_and_features(sysu):
  root, builder, data_dir = sysu
  exp = root / "exp"
  listed = set(_ids(exp / "train_id.txt") + _ids(exp / "val_id.txt") + _ids(exp / "test_id.txt"))
  on_disk = {int(p.name) for p in root.glob("cam*/[0-9][0-9][0-9][0-9]")}
  assert on_disk - listed  # the synthetic tree has RGB-only ids in no split; they are skipped
  stored = {r["identity"] for s in ("train", "query", "gallery")
            for r in _stored(builder.as_data_source(s))}
  assert stored == listed
  assert builder.info.features["modality"].names == ["visible", "infrared"]
  assert builder.info.disable_shuffling
  via_tfds = tfds.data_source("sysu_mm01/32x16", split="query", data_dir=data_dir)
  assert _stored(via_tfds) == _expected_sysu(root, "query")
  via_load = build.load_source("sysu_mm01", "gallery", data_dir=data_dir, config="32x16")
  assert via_load[0]["image"].shape == (32, 16, 3)
  assert len(via_load) == len(_expected_sysu(root, "gallery"))


@pytest.mark.parametrize("split", ["train", "test_visible", "test_thermal"])
def test_regdb_splits_match_idx_files(regdb, split):
  root, builders, _ = regdb
  for trial, builder in builders.items():
    source = builder.as_data_source(split)
    expected = _expected_regdb(root, trial, split)
    assert builder.info.splits[split].num_examples == len(expected) > 0
    assert _stored(source) == expected
    _assert_images_match(root, source, 32, 16)
  assert "tensorflow" not in sys.modules


def test_regdb_trials_pick_their_idx_files(regdb):
  _, builders, data_dir = regdb
  ids = {t: {r["identity"] for r in _stored(b.as_data_source("train"))}
         for t, b in builders.items()}
  assert ids[1] != ids[3]
  train = _stored(builders[1].as_data_source("train"))
  assert sorted({r["label"] for r in train}) == list(range(5))
  thermal = build.load_source("regdb", "test_thermal", data_dir=data_dir, config="t3")
  assert {int(thermal[i]["modality"]) for i in range(len(thermal))} == {1}


def test_cli_builds_sized_config_and_jpeg(tmp_path):
  manual = _write_regdb(tmp_path / "manual", num_ids=4, n=2, trials=range(1, 11))
  data_dir = tmp_path / "tfds"
  build.main(["regdb", "--manual_dir", str(manual), "--data_dir", str(data_dir),
              "--config", "trial_2", "--height", "24", "--width", "12",
              "--image_format", "jpeg"])
  source = build.load_source("regdb", "train", data_dir=data_dir, config="trial_2_24x12_jpeg")
  assert len(source) == len(_expected_regdb(manual, 2, "train"))
  assert source[0]["image"].shape == (24, 12, 3)
  expected = Image.open(manual / source[0]["path"].decode()).convert("RGB").resize(
      (12, 24), Image.LANCZOS)
  assert np.abs(source[0]["image"].astype(int) - np.asarray(expected)).mean() < 4
  with pytest.raises(SystemExit, match=re.escape(repr(str(tmp_path / "nope")))):
    build.main(["sysu_mm01", "--manual_dir", str(tmp_path / "nope"), "--data_dir",
                str(data_dir)])
  with pytest.raises(FileNotFoundError, match="maumjax.data.build"):
    build.load_source("regdb", "train", data_dir=data_dir, config="trial_5")


def test_config_checks():
  with pytest.raises(ValueError, match="predefined"):
    build.build("sysu_mm01", manual_dir="x", data_dir="y",
                config=SysuMm01Config(name="288x144", height=32, width=16))
  with pytest.raises(ValueError, match="384x128"):
    build.make_config("sysu_mm01", "999x1")
  with pytest.raises(ValueError, match="regdb"):
    build.build("market1501", manual_dir="x", data_dir="y")
  assert build.make_config("sysu_mm01", height=384, width=128).name == "384x128"
  assert build.make_config("regdb", "trial_4").trial == 4


def _corrupt_image(root: Path) -> Path:
  path = sorted(root.glob("cam6/*/*.jpg"))[-1]
  path.write_bytes(path.read_bytes()[:-30])
  return path


@pytest.mark.parametrize("defect", ["missing_manual", "regdb_given", "missing_test_ids",
                                    "truncated_image"])
def test_sysu_failures_leave_nothing(tmp_path, defect):
  manual = tmp_path / "manual"
  root = _write_sysu(manual / "SYSU-MM01")
  named = manual
  if defect == "missing_manual":
    manual = named = tmp_path / "nope"
  elif defect == "regdb_given":
    manual = named = _write_regdb(tmp_path / "regdb")
  elif defect == "missing_test_ids":
    named = root / "exp" / "test_id.txt"
    named.unlink()
  else:
    named = _corrupt_image(root)
  data_dir = tmp_path / "tfds"
  with pytest.raises(layouts.LayoutError, match=re.escape(repr(str(named)))):
    build.build("sysu_mm01", manual_dir=manual, data_dir=data_dir, config=_SYSU_SMALL)
  assert _leftovers(data_dir) == [] and not data_dir.exists()


def test_failure_keeps_other_builds(tmp_path):
  root = _write_regdb(tmp_path / "RegDB", trials=range(1, 11))
  data_dir = tmp_path / "tfds"
  small = {t: RegdbConfig(name=f"t{t}", trial=t, height=16, width=8) for t in (1, 2)}
  build.build("regdb", manual_dir=root, data_dir=data_dir, config=small[1])
  before = _leftovers(data_dir)
  bad = sorted((root / "Thermal").glob("*/*.bmp"))
  bad = [p for p in bad if p.relative_to(root).as_posix() in
         (root / "idx" / "test_thermal_2.txt").read_text()][0]
  bad.write_bytes(bad.read_bytes()[:-7])
  with pytest.raises(layouts.LayoutError, match=re.escape(repr(str(bad)))):
    build.build("regdb", manual_dir=root, data_dir=data_dir, config=small[2])
  assert _leftovers(data_dir) == before
  assert not any("incomplete" in p for p in before)
  assert len(build.load_source("regdb", "train", data_dir=data_dir, config="t1")) > 0


def test_tfds_missing_manual_dir_error_is_wrapped(tmp_path):
  (tmp_path / "empty").mkdir()
  builders = [SysuMm01(data_dir=tmp_path / "tfds", config=_SYSU_SMALL),
              Regdb(data_dir=tmp_path / "tfds", config=RegdbConfig(name="s", height=16, width=8))]
  builders[1].manual_dir_flag = "--config.data.manual_dir"  # as `build.build(flag=...)` sets
  for builder, flag in zip(builders, ("--manual_dir", "--config.data.manual_dir")):
    with pytest.raises(layouts.LayoutError, match=f"set {re.escape(flag)} ") as info:
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=tmp_path / "empty"))
    assert "\n" not in str(info.value)  # one line, as every UserError


def test_no_tensorflow_imported():
  assert "tensorflow" not in sys.modules
