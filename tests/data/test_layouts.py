"""Tests of the SYSU-MM01 / RegDB folder scanner on tiny hand-written trees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from maumjax.data import layouts

# identity -> cameras; 7 and 8 are extra RGB-only ids, as in the real data (in no split file).
_SYSU_CAMS = {1: (1, 3, 4), 2: (2, 6), 3: (1, 2, 3, 5, 6), 4: (4, 6), 5: (1, 2, 3),
              6: (5, 6), 7: (1,), 8: (4,)}
_SYSU_SPLITS = {"train": (1, 3, 2), "val": (4,), "test": (5, 6)}


def _write_jpeg(path: Path, colour: tuple[int, int, int], size=(4, 8)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, colour).save(path, quality=95)


def _write_sysu(root: Path, cams=_SYSU_CAMS, splits=_SYSU_SPLITS, n: int = 2) -> Path:
  """Writes `n` solid-colour JPEGs per (camera, identity) folder plus exp/*_id.txt."""
  for pid, pid_cams in cams.items():
    for cam in pid_cams:
      for k in range(1, n + 1):
        _write_jpeg(root / f"cam{cam}" / f"{pid:04d}" / f"{k:04d}.jpg", (cam * 40, pid * 30, k))
  (root / "exp").mkdir(parents=True, exist_ok=True)
  for name, ids in splits.items():
    (root / "exp" / f"{name}_id.txt").write_text(",".join(map(str, ids)))
  return root


def _write_regdb(root: Path, num_ids: int = 6, n: int = 2, trials=(1, 2)) -> Path:
  """Writes grey/colour BMPs and idx files splitting ids by parity (rotated per trial)."""
  for pid in range(1, num_ids + 1):
    for k in range(n):
      for folder, code in (("Visible", "v"), ("Thermal", "t")):
        path = root / folder / str(pid) / f"male_front_{code}_{100 * pid + k:05d}_{pid}.bmp"
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "L" if code == "t" else "RGB"
        Image.new(mode, (4, 8), 100 if mode == "L" else (pid, k, 9)).save(path)
  (root / "idx").mkdir(parents=True, exist_ok=True)
  for t in trials:
    train = [p for p in range(1, num_ids + 1) if (p + t) % 2 == 0]
    test = [p for p in range(1, num_ids + 1) if (p + t) % 2 == 1]
    for stage, pids in (("train", train), ("test", test)):
      for folder in ("Visible", "Thermal"):
        lines = [f"{folder}/{p}/{f.name} {label}\n" for label, p in enumerate(pids)
                 for f in sorted((root / folder / str(p)).iterdir())]
        (root / "idx" / f"{stage}_{folder.lower()}_{t}.txt").write_text("".join(lines))
  return root


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises(layouts.LayoutError) as info:
    fn(*args, **kwargs)
  return str(info.value)


# ----------------------------------------------------------------------------------------------
# SYSU-MM01


@pytest.mark.parametrize("sub", ["", "SYSU-MM01", "my_copy"])
def test_find_sysu_root_accepts_folder_or_one_level_down(tmp_path, sub):
  root = _write_sysu(tmp_path / sub if sub else tmp_path)
  assert layouts.find_sysu_root(tmp_path) == root


def test_find_sysu_root_errors_name_the_path(tmp_path):
  missing = tmp_path / "nope"
  assert repr(str(missing)) in _error(layouts.find_sysu_root, missing)
  (tmp_path / "empty").mkdir()
  assert "empty" in _error(layouts.find_sysu_root, tmp_path / "empty")
  _write_sysu(tmp_path / "a" / "b" / "SYSU-MM01")
  message = _error(layouts.find_sysu_root, tmp_path / "a")
  assert repr(str(tmp_path / "a")) in message and "cam1..cam6" in message
  assert str(tmp_path / "a" / "b" / "SYSU-MM01") in message  # where the data really is
  regdb = _write_regdb(tmp_path / "regdb")
  assert "RegDB" in _error(layouts.find_sysu_root, regdb)
  # The fix names the caller's flag: the build tool's by default, training's when asked.
  assert "set --manual_dir" in _error(layouts.find_sysu_root, missing)
  flagged = _error(layouts.find_regdb_root, missing, flag="--config.data.manual_dir")
  assert "set --config.data.manual_dir" in flagged and "--manual_dir" not in flagged


def test_layout_error_is_a_one_line_user_error(tmp_path):
  from maumjax.errors import UserError

  assert issubclass(layouts.LayoutError, UserError) and issubclass(layouts.LayoutError, ValueError)
  assert "\n" not in _error(layouts.find_sysu_root, tmp_path / "nope")


def test_fingerprint_follows_names_sizes_and_split_files(tmp_path):
  root = _write_sysu(tmp_path)
  first = layouts.sysu_fingerprint(root)
  n_images = sum(len(c) for c in _SYSU_CAMS.values()) * 2
  assert first["files"] == n_images and first == layouts.sysu_fingerprint(root)
  (root / "exp" / "rand_perm_cam.mat").write_bytes(b"x")  # read by evaluation only
  (root / "cam1" / "frames").mkdir()  # not an identity folder
  (root / "cam1" / "frames" / "x.jpg").write_bytes(b"x")
  assert layouts.sysu_fingerprint(root) == first
  image = root / "cam1" / "0001" / "0001.jpg"
  image.write_bytes(image.read_bytes() + b"\0")
  resized = layouts.sysu_fingerprint(root)
  assert resized["sha1"] != first["sha1"] and resized["bytes"] == first["bytes"] + 1
  (root / "exp" / "val_id.txt").write_text("3")  # same size, other identity
  assert layouts.sysu_fingerprint(root)["sha1"] != resized["sha1"]
  regdb = _write_regdb(tmp_path / "regdb")
  base = layouts.regdb_fingerprint(regdb, (1,))
  (regdb / "idx" / "test_thermal_2.txt").write_text("")  # another trial's file
  assert layouts.regdb_fingerprint(regdb, (1,)) == base
  assert layouts.regdb_fingerprint(regdb, (2,))["sha1"] != base["sha1"]


def test_scan_sysu_parses_ids_and_ignores_strays(tmp_path):
  root = _write_sysu(tmp_path)
  (root / "exp" / "train_id.txt").write_text(" 3, 1 ,2,\n")
  (root / "cam1" / "0001" / "notes.txt").write_text("x")
  (root / "cam1" / "0001" / "thumbs.png").write_bytes(b"")
  _write_jpeg(root / "cam1" / "frames" / "0001.jpg", (1, 2, 3))
  _write_jpeg(root / "cam1" / "12345" / "0001.jpg", (1, 2, 3))
  _write_jpeg(root / "video" / "0001" / "0001.jpg", (1, 2, 3))
  tree = layouts.scan_sysu_mm01(root)
  assert (tree.train_ids, tree.val_ids, tree.test_ids) == ((1, 2, 3), (4,), (5, 6))
  assert tree.files[1, 1] == ("cam1/0001/0001.jpg", "cam1/0001/0002.jpg")
  expected_keys = {(c, p) for p, cams in _SYSU_CAMS.items() for c in cams}
  assert set(tree.files) == expected_keys
  # Files in identity folders that are not images are listed; stray folders are not.
  assert tree.ignored == ("cam1/0001/notes.txt", "cam1/0001/thumbs.png")


def test_sysu_records_order_labels_and_fields(tmp_path):
  tree = layouts.scan_sysu_mm01(_write_sysu(tmp_path))
  train = layouts.sysu_records(tree, "train")
  # Train + val ids 1..4 ascending -> labels 0..3; cameras in 1, 2, 4, 5, 3, 6 order.
  keys = [(r["identity"], r["camera"], r["frame"]) for r in train]
  order = {c: i for i, c in enumerate(layouts.SYSU_TRAIN_CAMERA_ORDER)}
  assert keys == sorted(keys, key=lambda k: (k[0], order[k[1]], k[2]))
  assert [k[:2] for k in keys[::2]] == [(1, 1), (1, 4), (1, 3), (2, 2), (2, 6), (3, 1), (3, 2),
                                         (3, 5), (3, 3), (3, 6), (4, 4), (4, 6)]
  assert {r["identity"]: r["label"] for r in train} == {1: 0, 2: 1, 3: 2, 4: 3}
  assert train[4] == {"path": "cam3/0001/0001.jpg", "identity": 1, "label": 0, "camera": 3,
                      "modality": 1, "frame": 1}
  query = layouts.sysu_records(tree, "query")
  assert [r["path"] for r in query] == [
      "cam3/0005/0001.jpg", "cam3/0005/0002.jpg", "cam6/0006/0001.jpg", "cam6/0006/0002.jpg"]
  gallery = layouts.sysu_records(tree, "gallery")
  assert [(r["identity"], r["camera"]) for r in gallery[::2]] == [(5, 1), (5, 2), (6, 5)]
  assert all(r["label"] == -1 and r["modality"] == 0 for r in gallery)
  assert all(r["label"] == -1 and r["modality"] == 1 for r in query)
  with pytest.raises(ValueError, match="query"):
    layouts.sysu_records(tree, "test")


def _break(root: Path, how: str) -> Path:
  """Applies one layout defect; returns the path the error must name."""
  exp = root / "exp"
  if how == "missing_split_file":
    (exp / "val_id.txt").unlink()
    return exp / "val_id.txt"
  if how == "bad_token":
    (exp / "test_id.txt").write_text("5,6x")
    return exp / "test_id.txt"
  if how == "listed_without_folder":
    (exp / "test_id.txt").write_text("5,6,9")
    return exp / "test_id.txt"
  if how == "missing_modality":
    shutil.rmtree(root / "cam6" / "0002")
    return exp / "train_id.txt"
  if how == "empty_camera":
    shutil.rmtree(root / "cam5")
    (root / "cam5" / "stray").mkdir(parents=True)
    return root / "cam5"
  if how == "missing_camera":
    shutil.rmtree(root / "cam5")
    return root / "cam5"
  if how == "empty_identity":
    for f in (root / "cam4" / "0001").iterdir():
      f.unlink()
    return root / "cam4" / "0001"
  if how == "overlapping_splits":
    (exp / "val_id.txt").write_text("4,3")
    return exp / "train_id.txt"
  if how == "missing_exp":
    shutil.rmtree(exp)
    return exp
  raise AssertionError(how)


@pytest.mark.parametrize("how", [
    "missing_split_file", "bad_token", "listed_without_folder", "missing_modality",
    "empty_camera", "missing_camera", "empty_identity", "overlapping_splits", "missing_exp"])
def test_scan_sysu_errors_name_path_and_fix(tmp_path, how):
  root = _write_sysu(tmp_path)
  path = _break(root, how)
  message = _error(layouts.scan_sysu_mm01, root)
  assert repr(str(path)) in message
  assert "re-extract" in message
  if how == "bad_token":
    assert "'6x'" in message
  if how in ("listed_without_folder", "missing_modality"):
    assert "identity " + ("9" if how == "listed_without_folder" else "2") in message


def test_sysu_count_warnings_only_for_real_looking_copies(tmp_path):
  tree = layouts.scan_sysu_mm01(_write_sysu(tmp_path))
  assert layouts.sysu_count_warnings(tree) == []
  ids = tuple(range(1, 492))
  big = layouts.SysuTree(tmp_path, ids[:296], ids[296:395], ids[395:],
                         {(c, i): ("x.jpg",) for c in (1, 3) for i in ids})
  messages = layouts.sysu_count_warnings(big)
  assert len(messages) == 3 and "(296, 20284, 9929)" in messages[0]


# ----------------------------------------------------------------------------------------------
# RegDB


def test_find_regdb_root(tmp_path):
  root = _write_regdb(tmp_path / "RegDB")
  assert layouts.find_regdb_root(tmp_path) == root
  assert layouts.find_regdb_root(root) == root
  sysu = _write_sysu(tmp_path / "other" / "SYSU-MM01")
  message = _error(layouts.find_regdb_root, sysu)
  assert repr(str(sysu)) in message and "SYSU-MM01" in message


def test_scan_regdb_and_records(tmp_path):
  root = _write_regdb(tmp_path, num_ids=6, n=2, trials=(1, 3))
  tree = layouts.scan_regdb(root, trials=(1, 3))
  assert list(tree.visible) == [1, 2, 3, 4, 5, 6]
  train = layouts.regdb_records(tree, 1, "train")
  # Trial 1 trains on odd pids 1, 3, 5: visible lines then thermal lines, in idx order.
  assert [(r["identity"], r["modality"]) for r in train[::2]] == [
      (1, 0), (3, 0), (5, 0), (1, 1), (3, 1), (5, 1)]
  assert train[0] == {"path": "Visible/1/male_front_v_00100_1.bmp", "identity": 1, "label": 0,
                      "camera": 1, "modality": 0, "frame": 100}
  assert train[7]["camera"] == 2 and train[7]["label"] == 0 and train[7]["frame"] == 101
  thermal = layouts.regdb_records(tree, 1, "test_thermal")
  assert {r["identity"] for r in thermal} == {2, 4, 6} and {r["camera"] for r in thermal} == {2}
  assert {r["identity"] for r in layouts.regdb_records(tree, 3, "train")} == {1, 3, 5}
  with pytest.raises(ValueError, match="not scanned"):
    layouts.regdb_records(tree, 2, "train")
  assert layouts.regdb_count_warnings(tree) == []


def test_regdb_frame_is_minus_one_for_other_names(tmp_path):
  root = _write_regdb(tmp_path, trials=(1,))
  src = root / "Visible" / "1" / "male_front_v_00100_1.bmp"
  src.rename(src.with_name("img1.bmp"))
  idx = root / "idx" / "train_visible_1.txt"
  idx.write_text(idx.read_text().replace("male_front_v_00100_1.bmp", "img1.bmp"))
  records = layouts.regdb_records(layouts.scan_regdb(root, trials=(1,)), 1, "train")
  assert records[0]["path"] == "Visible/1/img1.bmp" and records[0]["frame"] == -1


def _break_regdb(root: Path, how: str) -> tuple[Path, str]:
  """Applies one defect to trial 1; returns the path the error names and another fragment."""
  idx = root / "idx"
  path = idx / "train_visible_1.txt"
  lines = path.read_text().splitlines(keepends=True)
  if how == "missing_idx":
    (idx / "test_thermal_1.txt").unlink()
    return idx / "test_thermal_1.txt", "{train,test}_{visible,thermal}_{1..10}.txt"
  if how == "bad_line":
    path.write_text("".join(lines[:1]) + "Visible/1/x.bmp zero\n")
    return path, "line 2"
  if how == "missing_file":
    (root / "Visible" / "3" / "male_front_v_00300_3.bmp").unlink()
    return root / "Visible" / "3" / "male_front_v_00300_3.bmp", "does not exist"
  if how == "label_not_bijective":
    path.write_text("".join(lines[:2]) + "".join(x.replace(" 1\n", " 0\n") for x in lines[2:4]))
    return path, "label 0"
  if how == "modalities_disagree":
    thermal = idx / "train_thermal_1.txt"
    swapped = {" 0\n": " 1\n", " 1\n": " 0\n"}
    thermal.write_text("".join(
        x[:-3] + swapped.get(x[-3:], x[-3:]) for x in thermal.read_text().splitlines(True)))
    return path, "same label"
  if how == "train_test_overlap":
    extra = (idx / "test_visible_1.txt").read_text().splitlines(keepends=True)[0]
    path.write_text("".join(lines) + extra.rsplit(" ", 1)[0] + " 3\n")
    thermal = idx / "train_thermal_1.txt"
    extra = (idx / "test_thermal_1.txt").read_text().splitlines(keepends=True)[0]
    thermal.write_text(thermal.read_text() + extra.rsplit(" ", 1)[0] + " 3\n")
    return path, "disjoint"
  raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing_idx", "bad_line", "missing_file", "label_not_bijective",
                                 "modalities_disagree", "train_test_overlap"])
def test_scan_regdb_errors_name_path_and_fix(tmp_path, how):
  root = _write_regdb(tmp_path, trials=(1,))
  path, fragment = _break_regdb(root, how)
  message = _error(layouts.scan_regdb, root, trials=(1,))
  assert repr(str(path)) in message and fragment in message


def test_scan_regdb_requires_all_ten_trials_by_default(tmp_path):
  root = _write_regdb(tmp_path, trials=(1, 2))
  assert repr(str(root / "idx" / "train_visible_3.txt")) in _error(layouts.scan_regdb, root)


def test_regdb_count_warnings_for_real_looking_copies(tmp_path):
  visible = {p: ("a",) * 10 for p in range(1, 413)}
  tree = layouts.RegdbTree(tmp_path, visible, {**visible, 412: ("a",) * 9},
                           {("train_visible", 1): (("Visible/1/a", 0),) * 5})
  messages = layouts.regdb_count_warnings(tree)
  assert len(messages) == 2 and "Thermal" in messages[0] and "2060" in messages[1]
