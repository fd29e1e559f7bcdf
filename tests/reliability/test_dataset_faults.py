"""Dataset faults a user runs into: another or a changed manual dir, damaged images, a killed
build, stray files, and a manual-dir message that names the wrong flag.

Every test builds tiny synthetic trees (6-7 identities, one or two images per folder, 16x8
builds), so the module runs in a few seconds after the TFDS import.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maumjax.data import build, images, layouts, synthetic
from maumjax.data import prepare as prepare_lib
from maumjax.data.regdb import Regdb
from maumjax.data.sysu_mm01 import SysuMm01, SysuMm01Config
from maumjax.errors import UserError

_SMALL = SysuMm01Config(name="16x8", height=16, width=8)


def _sysu(path: Path, seed: int = 0, num_identities: int = 6, images_per_camera: int = 1) -> Path:
  return synthetic.write_sysu_mm01(path, num_identities=num_identities,
                                   images_per_camera=images_per_camera, height=32, width=16,
                                   seed=seed)


def _prepare(manual: Path | str, **kwargs) -> prepare_lib.PreparedDataset:
  return prepare_lib.prepare_dataset("sysu_mm01", manual_dir=manual, height=16, width=8,
                                     **kwargs)


def _listed_train_ids(root: Path) -> set[int]:
  text = ",".join((root / "exp" / f"{s}_id.txt").read_text() for s in ("train", "val"))
  return {int(t) for t in re.split(r"[,\s]+", text) if t}


def _stored(builder, split: str = "train") -> list[tuple[str, int]]:
  source = builder.as_data_source(split)
  return [(source[i]["path"].decode(), int(source[i]["identity"])) for i in range(len(source))]


def _first_image_equals(builder, root: Path) -> bool:
  row = builder.as_data_source("train")[0]
  expected = Image.open(root / row["path"].decode()).convert("RGB").resize((8, 16),
                                                                          Image.LANCZOS)
  return np.array_equal(row["image"], np.asarray(expected))


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("MAUMJAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


# ----------------------------------------------------------------------------------------------
# A second dataset folder, or a changed one, gets its own build (issue 14 item 7)


def test_second_manual_dir_gets_its_own_build(tmp_path, cache, capsys):
  a = _sysu(tmp_path / "a" / "SYSU-MM01", seed=1)
  b = _sysu(tmp_path / "b", seed=2, num_identities=7)
  assert _listed_train_ids(a) != _listed_train_ids(b)
  first = _prepare(tmp_path / "a")
  assert {i for _, i in _stored(first.builder)} == _listed_train_ids(a)
  second = _prepare(b)
  assert second.data_dir == first.data_dir == cache / "tfds" / "real"  # same cache slot
  assert {i for _, i in _stored(second.builder)} == _listed_train_ids(b)
  assert _first_image_equals(second.builder, b)
  out = capsys.readouterr().out
  assert f"was built from {a}, not from {b}; rebuilding" in out
  # Back to the first folder: rebuilt again, then reused while nothing changes.
  assert {i for _, i in _stored(_prepare(a).builder)} == _listed_train_ids(a)
  version_dir = cache / "tfds" / "real" / "sysu_mm01" / "16x8" / "1.0.0"
  stamp = (version_dir / "dataset_info.json").stat().st_mtime_ns
  capsys.readouterr()
  assert {i for _, i in _stored(_prepare(a).builder)} == _listed_train_ids(a)
  assert "using sysu_mm01/16x8" in capsys.readouterr().out
  assert (version_dir / "dataset_info.json").stat().st_mtime_ns == stamp


def test_changed_files_at_the_same_path_are_noticed(tmp_path, cache, capsys):
  root = _sysu(tmp_path / "manual", seed=3, images_per_camera=2)
  before = _stored(_prepare(root).builder)
  removed = root / before[0][0]
  removed.unlink()
  after = _stored(_prepare(root).builder)
  assert after == [r for r in before if r[0] != before[0][0]]
  assert "changed since sysu_mm01/16x8 was built" in capsys.readouterr().out
  # A re-extracted, different copy at the same path.
  shutil.rmtree(root)
  _sysu(root, seed=4, num_identities=7)
  assert {i for _, i in _stored(_prepare(root).builder)} == _listed_train_ids(root)
  # The fingerprint: every file of the identity folders, and the split files' contents.
  record = build.source_record("sysu_mm01", root)
  assert record["files"] == sum(1 for _ in root.glob("cam*/*/*")) and record["bytes"] > 0
  assert build.source_record("sysu_mm01", root) == record
  id_file = root / "exp" / "test_id.txt"
  id_file.write_text(",".join(reversed(id_file.read_text().strip().split(","))) + "\n")
  changed = build.source_record("sysu_mm01", root)
  assert changed["sha1"] != record["sha1"] and changed["bytes"] == record["bytes"]


def test_failed_rebuild_keeps_the_good_build(tmp_path, monkeypatch, capsys):
  a, b = _sysu(tmp_path / "a", seed=1), _sysu(tmp_path / "b", seed=2, num_identities=7)
  data_dir = tmp_path / "tfds"
  good = _stored(build.build("sysu_mm01", manual_dir=a, data_dir=data_dir, config=_SMALL))
  tree_before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
  calls = []

  def fail_late(path, **kwargs):  # damage only a full decode finds, in the middle of the write
    calls.append(path)
    if len(calls) == 5:
      raise layouts.LayoutError(f"cannot decode image {str(path)!r}")
    return encode(path, **kwargs)

  encode = images.encode_resized
  monkeypatch.setattr(images, "encode_resized", fail_late)
  with pytest.raises(layouts.LayoutError):
    build.build("sysu_mm01", manual_dir=b, data_dir=data_dir, config=_SMALL)
  monkeypatch.undo()
  assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == tree_before
  reopened = build.load_source("sysu_mm01", "train", data_dir=data_dir, config="16x8")
  assert [(reopened[i]["path"].decode(), int(reopened[i]["identity"]))
          for i in range(len(reopened))] == good


# ----------------------------------------------------------------------------------------------
# Damaged images are refused before anything is written (item 10)


def _damage(path: Path, how: str) -> None:
  data = path.read_bytes()
  if how == "truncated":
    path.write_bytes(data[:len(data) // 2])
  elif how == "random":
    path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), np.uint8).tobytes())
  else:  # a truncated PNG under the dataset's file name
    buffer = Image.open(path).convert("RGB")
    buffer.save(path, format="PNG")
    path.write_bytes(path.read_bytes()[:-20])


@pytest.mark.parametrize("dataset,how", [
    ("sysu_mm01", "truncated"), ("sysu_mm01", "random"), ("sysu_mm01", "png_truncated"),
    ("regdb", "truncated"), ("regdb", "random")])
def test_damaged_image_is_refused_before_writing(tmp_path, cache, monkeypatch, capsys, dataset,
                                                 how):
  def no_writing(self, *args, **kwargs):
    raise AssertionError("the builder started writing")

  monkeypatch.setattr(SysuMm01, "download_and_prepare", no_writing)
  monkeypatch.setattr(Regdb, "download_and_prepare", no_writing)
  if dataset == "sysu_mm01":
    root = _sysu(tmp_path / "manual", seed=5)
    bad = sorted(root.glob("cam3/*/*.jpg"))[-1]
  else:
    root = synthetic.write_regdb(tmp_path / "manual", num_identities=4, images_per_modality=2,
                                 height=32, width=16, num_trials=1)
    bad = sorted(root.glob("Thermal/*/*.bmp"))[-1]
  _damage(bad, how)
  with pytest.raises(layouts.LayoutError) as info:
    prepare_lib.prepare_dataset(dataset, manual_dir=root, height=16, width=8)
  message = str(info.value)
  assert isinstance(info.value, UserError)
  assert "\n" not in message and repr(str(bad)) in message and "re-extract" in message
  assert " at 0x" not in message and "<" not in message  # no object repr
  assert not (cache / "tfds").exists()
  out = capsys.readouterr()
  assert "Downloading" not in out.out + out.err and "Building" not in out.out


# ----------------------------------------------------------------------------------------------
# A build killed with -9 leaves folders that the next build removes (item 10)


_KILLED_BUILD = """
import sys, time
from maumjax.data import build, images
from maumjax.data.sysu_mm01 import SysuMm01Config
encode = images.encode_resized
def slow(path, **kwargs):
  print("writing", flush=True)
  time.sleep(600)
images.encode_resized = slow
build.build("sysu_mm01", manual_dir=sys.argv[1], data_dir=sys.argv[2],
            config=SysuMm01Config(name="16x8", height=16, width=8))
"""


def test_leftovers_of_a_killed_build_are_removed(tmp_path, capsys):
  root = _sysu(tmp_path / "manual", seed=6)
  data_dir = tmp_path / "tfds"
  config_dir = data_dir / "sysu_mm01" / "16x8"
  proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_KILLED_BUILD), str(root),
                           str(data_dir)], stdout=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 120
    line = ""
    while "writing" not in line and time.monotonic() < deadline:
      line = proc.stdout.readline()
      if not line and proc.poll() is not None:
        break
    assert "writing" in line, "the child build did not start writing"
  finally:
    proc.kill()  # SIGKILL: nothing of the build's own clean-up runs
    proc.wait()
    proc.stdout.close()
  left = [p for p in data_dir.rglob("*") if p.name.startswith("incomplete.")]
  assert left, "the killed build should have left TFDS's incomplete.* folder"
  # TFDS's own temp folder, as a build killed before this fix left it beside the version.
  (config_dir / "incomplete.ABC123_1.0.0").mkdir()
  (config_dir / "incomplete.ABC123_1.0.0" / "x.array_record").write_bytes(b"x")
  builder = build.build("sysu_mm01", manual_dir=root, data_dir=data_dir, config=_SMALL)
  assert not [p for p in data_dir.rglob("*") if p.name.startswith(("incomplete.", ".maumjax-s"))]
  assert {p.name for p in config_dir.iterdir()} <= {"1.0.0", ".maumjax-build.lock"}
  assert "left by an interrupted build" in capsys.readouterr().out
  assert len(builder.as_data_source("train")) > 0


# ----------------------------------------------------------------------------------------------
# Stray files are counted in the summary (item 11)


def test_ignored_files_are_counted_in_the_build_summary(tmp_path, capsys):
  root = _sysu(tmp_path / "manual", seed=7)
  folder = sorted(root.glob("cam1/*"))[0]
  (folder / "Thumbs.db").write_bytes(b"\0" * 10)
  (folder / "notes.txt").write_text("stray")
  builder = build.build("sysu_mm01", manual_dir=root, data_dir=tmp_path / "tfds", config=_SMALL)
  summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("built")]
  assert len(summary) == 1
  rel = folder.relative_to(root).as_posix()
  assert "ignored 2 file(s) in identity folders" in summary[0]
  assert f"{rel}/Thumbs.db" in summary[0]
  assert not any(r[0].endswith((".db", ".txt")) for r in _stored(builder))


# ----------------------------------------------------------------------------------------------
# The manual-dir message names the caller's flag (item 12), and generation is not silent (14)


def test_manual_dir_message_names_the_training_flag(tmp_path, cache):
  missing = tmp_path / "nope"
  data = {"name": "sysu_mm01", "manual_dir": str(missing), "data_dir": "", "height": 16,
          "width": 8, "trial": 1, "image_format": "png", "synthetic": {}}
  for call in (lambda: _prepare(missing), lambda: prepare_lib.prepare_from_config(data),
               lambda: prepare_lib.prepare_dataset("regdb", manual_dir=missing)):
    with pytest.raises(layouts.LayoutError) as info:
      call()
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert repr(str(missing)) in message and "--config.data.manual_dir" in message
    assert "--manual_dir" not in message
  _sysu(tmp_path / "two" / "x", seed=1)
  _sysu(tmp_path / "two" / "y", seed=2)
  with pytest.raises(layouts.LayoutError, match="set --config.data.manual_dir to the one"):
    _prepare(tmp_path / "two")
  # The build command line keeps its own flag.
  with pytest.raises(SystemExit, match="set --manual_dir$"):
    build.main(["sysu_mm01", "--manual_dir", str(missing), "--data_dir", str(tmp_path / "t")])


def test_synthetic_generation_says_what_it_does(cache, capsys):
  spec = prepare_lib.SyntheticSpec(num_identities=6, images_per_camera=1, height=32, width=16)
  prepared = prepare_lib.prepare_dataset("sysu_mm01", height=16, width=8, synthetic=spec)
  out = capsys.readouterr()
  lines = out.out.splitlines()
  assert lines[0].startswith("Generating synthetic sysu_mm01 data (6 identities, ")
  assert str(prepared.manual_dir) in lines[0]
  count = synthetic.sysu_image_count(6, 1, 0)
  assert any(line.startswith(f"generated {count} images in ") for line in lines)
  assert any(line.startswith("Building sysu_mm01/16x8 from ") for line in lines)
  assert "Downloading" not in out.out + out.err
  # Not a terminal: a count line per quarter on stdout, no bar; stderr stays for errors.
  assert "  generating synthetic sysu_mm01: " in out.out and out.err == ""
  # Another parameter set in the same data_dir gets its own build.
  other = prepare_lib.SyntheticSpec(num_identities=7, images_per_camera=1, height=32, width=16)
  again = prepare_lib.prepare_dataset("sysu_mm01", height=16, width=8, synthetic=other,
                                      data_dir=prepared.data_dir)
  assert {i for _, i in _stored(again.builder)} == _listed_train_ids(again.manual_dir)
