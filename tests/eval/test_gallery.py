"""Tests of the SYSU-MM01 gallery draws and query list against independent re-implementations."""

from __future__ import annotations

import glob
import os
import random
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from maumjax.data import layouts, synthetic
from maumjax.eval import gallery

# Empty-file tree: (camera, identity) -> number of NNNN.jpg files. Test ids are 3, 5, 12 and
# 40; 5 is outdoor-only, 40 lacks cam4, 12 lacks cam5; 1 and 7 are not test ids.
_FOLDERS = {
    (1, 3): 12, (2, 3): 10, (4, 3): 11, (5, 3): 13, (3, 3): 4, (6, 3): 3,
    (4, 5): 15, (5, 5): 10, (6, 5): 5,
    (1, 12): 10, (2, 12): 14, (4, 12): 12, (3, 12): 2,
    (1, 40): 11, (2, 40): 10, (5, 40): 12, (3, 40): 3, (6, 40): 6,
    (1, 1): 12, (4, 1): 12, (3, 1): 2, (2, 7): 10, (6, 7): 2,
}
# AGW draws from every directory entry, so these strays must be drawable.
_STRAYS = {(1, 3): "Thumbs.db", (4, 5): "Thumbs.db", (2, 40): ".DS_Store", (3, 3): "Thumbs.db"}
_TEST_IDS = (3, 5, 12, 40)
_CASES = [(mode, shot) for mode in ("all", "indoor") for shot in (1, 10)]


@pytest.fixture(autouse=True)
def _restore_global_random():
  # The AGW reference below seeds the module-level generator; leave it as we found it.
  state = random.getstate()
  yield
  random.setstate(state)


def _write_empty_tree(root: Path) -> Path:
  for (camera, identity), n in _FOLDERS.items():
    folder = root / f"cam{camera}" / f"{identity:04d}"
    folder.mkdir(parents=True)
    for k in range(1, n + 1):
      (folder / f"{k:04d}.jpg").touch()
    if (camera, identity) in _STRAYS:
      (folder / _STRAYS[camera, identity]).touch()
  (root / "exp").mkdir()
  # Unsorted, spaced, and a second line that AGW never reads.
  (root / "exp" / "test_id.txt").write_text("12, 3,40,5\n1,7\n")
  return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
  return _write_empty_tree(tmp_path / "SYSU-MM01")


@pytest.fixture(scope="module")
def synthetic_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
  out = tmp_path_factory.mktemp("synthetic") / "SYSU-MM01"
  return synthetic.write_sysu_mm01(out, num_identities=10, images_per_camera=11, height=16,
                                   width=8, seed=3)


def _agw_reference(root: Path, mode: str, shot: int, trial: int) -> list[str]:
  """AGW's `process_gallery_sysu`, re-typed from protocol.md §1.8 A with the global generator."""
  data_path = str(root)
  random.seed(trial)
  rgb_cameras = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
  with open(os.path.join(data_path, "exp/test_id.txt")) as f:
    ids = f.read().splitlines()
    ids = [f"{x:04d}" for x in [int(y) for y in ids[0].split(",")]]
  files = []
  for pid in sorted(ids):
    for cam in rgb_cameras:
      img_dir = os.path.join(data_path, cam, pid)
      if os.path.isdir(img_dir):
        new_files = sorted([img_dir + "/" + i for i in os.listdir(img_dir)])
        if shot == 1:
          files.append(random.choice(new_files))
        else:
          files.extend(random.sample(new_files, 10))
  return [f[len(data_path) + 1:] for f in files]


def _mode_folders(root: Path, mode: str) -> list[tuple[int, int]]:
  cams = (1, 2, 4, 5) if mode == "all" else (1, 2)
  return [(c, i) for i in _read_ids(root) for c in cams
          if (root / f"cam{c}" / f"{i:04d}").is_dir()]


def _read_ids(root: Path) -> list[int]:
  first_line = (root / "exp" / "test_id.txt").read_text().split("\n")[0]
  return sorted(int(t) for t in first_line.split(","))


# ----------------------------------------------------------------------------------------------
# AGW draw


@pytest.mark.parametrize("mode,shot", _CASES)
@pytest.mark.parametrize("which", ["empty", "synthetic"])
def test_agw_matches_reference_implementation(tree, synthetic_tree, which, mode, shot):
  root = tree if which == "empty" else synthetic_tree
  for trial in (0, 1, 4, 9):
    want = _agw_reference(root, mode, shot, trial)
    assert gallery.sysu_gallery(root, mode=mode, shot=shot, trial=trial) == want


def test_agw_draws_stray_entries_as_agw_does(tree):
  drawn = {p for t in range(10) for p in gallery.sysu_gallery(tree, shot=10, trial=t)}
  # Ten of eleven entries per trial: over ten trials the strays are all but surely drawn, and
  # the equality test above shows it is what AGW does.
  assert {"cam1/0003/Thumbs.db", "cam4/0005/Thumbs.db", "cam2/0040/.DS_Store"} <= drawn


@pytest.mark.parametrize("mode,shot", _CASES)
def test_agw_is_deterministic_and_ignores_global_random(tree, mode, shot):
  random.seed(12345)
  first = gallery.sysu_gallery(tree, mode=mode, shot=shot, trial=2)
  random.seed("junk")
  random.random()
  assert gallery.sysu_gallery(tree, mode=mode, shot=shot, trial=2) == first
  draws = {tuple(gallery.sysu_gallery(tree, mode=mode, shot=shot, trial=t)) for t in range(10)}
  assert len(draws) == 10


def test_agw_does_not_advance_global_random(tree):
  random.seed(7)
  want = random.random()
  random.seed(7)
  gallery.sysu_gallery(tree, shot=10, trial=3)
  assert random.random() == want


@pytest.mark.parametrize("sampling", gallery.SAMPLINGS)
@pytest.mark.parametrize("mode,shot", _CASES)
def test_gallery_sizes_cameras_and_identities(tree, mode, shot, sampling):
  _write_perm(tree / "exp" / "rand_perm_cam.mat", _perm_mats(tree, seed=0))
  paths = gallery.sysu_gallery(tree, mode=mode, shot=shot, trial=5, sampling=sampling)
  folders = _mode_folders(tree, mode)
  assert len(paths) == shot * len(folders)
  per_folder = {}
  for p in paths:
    per_folder.setdefault((gallery.gallery_camera(p), gallery.path_identity(p)), []).append(p)
  assert sorted(per_folder) == sorted(folders)
  assert all(len(set(v)) == shot for v in per_folder.values())
  assert {c for c, _ in per_folder} == ({1, 2, 4, 5} if mode == "all" else {1, 2})
  assert {i for _, i in per_folder} <= set(_TEST_IDS)
  if mode == "indoor":
    assert 5 not in {i for _, i in per_folder}  # outdoor-only identity


def test_synthetic_indoor_gallery_is_a_subset_of_all(synthetic_tree):
  folders = _mode_folders(synthetic_tree, "indoor")
  assert 0 < len(folders) < len(_mode_folders(synthetic_tree, "all"))
  assert len(gallery.sysu_gallery(synthetic_tree, mode="indoor", shot=10)) == 10 * len(folders)


def test_gallery_accepts_the_manual_dir(tmp_path):
  root = _write_empty_tree(tmp_path / "manual" / "SYSU-MM01")
  assert (gallery.sysu_gallery(tmp_path / "manual", trial=1)
          == gallery.sysu_gallery(root, trial=1) == _agw_reference(root, "all", 1, 1))


def test_agw_multishot_needs_ten_entries(tree):
  folder = tree / "cam2" / "0012"
  for name in sorted(os.listdir(folder))[9:]:
    (folder / name).unlink()
  with pytest.raises(ValueError, match=r"cam2/0012.*9 entries"):
    gallery.sysu_gallery(tree, shot=10)
  assert len(gallery.sysu_gallery(tree, shot=1)) == len(_mode_folders(tree, "all"))


# ----------------------------------------------------------------------------------------------
# Official permutation file


def _perm_mats(root: Path, seed: int) -> dict[tuple[int, int], np.ndarray]:
  """10 x n uint8 permutations of 1..n for every folder with n JPEGs, like the real file."""
  rng = np.random.default_rng(seed)
  mats = {}
  for folder in sorted(root.glob("cam[1-6]/[0-9][0-9][0-9][0-9]")):
    n = len(list(folder.glob("*.jpg")))
    key = (int(folder.parent.name[3:]), int(folder.name))
    mats[key] = np.stack([rng.permutation(n) + 1 for _ in range(10)]).astype(np.uint8)
  return mats


def _write_perm(path: Path, mats: dict[tuple[int, int], np.ndarray], *,
                column: bool = False) -> None:
  """Saves the real nesting: a 6x1 cell of 1xN (or Nx1) cells over identity - 1."""
  num_ids = max(i for _, i in mats) + 2  # trailing empty cells, as past the last real id
  top = np.empty((6, 1), dtype=object)
  for camera in range(1, 7):
    cell = np.empty((num_ids, 1) if column else (1, num_ids), dtype=object)
    for identity in range(1, num_ids + 1):
      cell.flat[identity - 1] = mats.get((camera, identity), np.zeros((0, 0)))
    top[camera - 1, 0] = cell
  scipy.io.savemat(path, {"rand_perm_cam": top})


def _official_reference(root: Path, mats, mode: str, shot: int, trial: int) -> list[str]:
  cams = (1, 2, 4, 5) if mode == "all" else (1, 2)
  return [f"cam{c}/{i:04d}/{int(v):04d}.jpg"
          for c in cams for i in _read_ids(root)
          if (root / f"cam{c}" / f"{i:04d}").is_dir()
          for v in mats[c, i][trial, :shot]]


@pytest.mark.parametrize("mode,shot", _CASES)
@pytest.mark.parametrize("which", ["empty", "synthetic"])
def test_official_matches_permutation_matrices(tree, synthetic_tree, tmp_path, which, mode,
                                               shot):
  root = tree if which == "empty" else synthetic_tree
  mats = _perm_mats(root, seed=1)
  perm_file = tmp_path / "perm.mat"
  _write_perm(perm_file, mats, column=which == "synthetic")
  for trial in (0, 3, 9):
    got = gallery.sysu_gallery(root, mode=mode, shot=shot, trial=trial, sampling="official",
                               perm_file=perm_file)
    assert got == _official_reference(root, mats, mode, shot, trial)
    assert all((root / p).is_file() for p in got)


def test_official_default_location_and_missing_file(tree):
  with pytest.raises(FileNotFoundError) as info:
    gallery.sysu_gallery(tree, sampling="official")
  message = str(info.value)
  assert str(tree / "exp" / "rand_perm_cam.mat") in message
  assert "evaluation/data_split" in message and "wuancong/SYSU-MM01" in message
  assert "exp/" in message
  mats = _perm_mats(tree, seed=2)
  _write_perm(tree / "exp" / "rand_perm_cam.mat", mats)
  got = gallery.sysu_gallery(tree, mode="indoor", shot=10, trial=7, sampling="official")
  assert got == _official_reference(tree, mats, "indoor", 10, 7)
  with pytest.raises(FileNotFoundError, match="wuancong/SYSU-MM01"):
    gallery.sysu_gallery(tree, sampling="official", perm_file=tree / "nowhere.mat")


def _mutate(mats, how: str) -> int:
  """Breaks entry (camera 1, identity 3); returns the shot that exposes it."""
  if how == "missing":
    del mats[1, 3]
  elif how == "short_row":
    mats[1, 3] = mats[1, 3][:, :5]
    return 10
  elif how == "few_rows":
    mats[1, 3] = mats[1, 3][:4]
  elif how == "missing_file":
    mats[1, 3][6, 0] = 200
  return 1


@pytest.mark.parametrize("how", ["missing", "short_row", "few_rows", "missing_file"])
def test_official_entry_errors_name_camera_identity_and_file(tree, tmp_path, how):
  mats = _perm_mats(tree, seed=3)
  shot = _mutate(mats, how)
  perm_file = tmp_path / "perm.mat"
  _write_perm(perm_file, mats)
  with pytest.raises(ValueError) as info:
    gallery.sysu_gallery(tree, shot=shot, trial=6, sampling="official", perm_file=perm_file)
  message = str(info.value)
  assert "camera 1" in message and "identity 3" in message and str(perm_file) in message
  if how == "missing_file":
    assert "cam1/0003/0200.jpg" in message


@pytest.mark.parametrize("how", ["five_cameras", "wrong_name", "text_entry", "not_mat"])
def test_official_malformed_file(tree, tmp_path, how):
  perm_file = tmp_path / "perm.mat"
  mats = _perm_mats(tree, seed=4)
  if how == "not_mat":
    perm_file.write_text("not a MAT-file")
  elif how == "wrong_name":
    scipy.io.savemat(perm_file, {"perm": np.zeros((6, 1))})
  else:
    _write_perm(perm_file, mats)
    top = scipy.io.loadmat(perm_file)["rand_perm_cam"]
    if how == "five_cameras":
      top = top[:5]
    else:
      top[0, 0][0, 2] = "abc"
    scipy.io.savemat(perm_file, {"rand_perm_cam": top})
  with pytest.raises(ValueError, match=str(perm_file)):
    gallery.sysu_gallery(tree, sampling="official", perm_file=perm_file)


def test_load_rand_perm_skips_empty_cells(tree, tmp_path):
  mats = _perm_mats(tree, seed=5)
  _write_perm(tmp_path / "perm.mat", mats)
  perm = gallery.load_rand_perm(tmp_path / "perm.mat")
  assert sorted(perm.entries) == sorted(mats)
  for key, matrix in mats.items():
    np.testing.assert_array_equal(perm.entries[key], matrix)


# ----------------------------------------------------------------------------------------------
# Query, path helpers, arguments


@pytest.mark.parametrize("which", ["empty", "synthetic"])
def test_query_is_every_ir_jpeg_of_test_ids(tree, synthetic_tree, which):
  root = tree if which == "empty" else synthetic_tree
  want = []
  for identity in _read_ids(root):
    for cam in ("cam3", "cam6"):
      found = sorted(glob.glob(str(root / cam / f"{identity:04d}" / "*.jpg")))
      want.extend(f"{cam}/{identity:04d}/{Path(f).name}" for f in found)
  assert gallery.sysu_query(root) == want
  if which == "empty":
    assert len(want) == 4 + 3 + 5 + 2 + 3 + 6  # ids 3, 5, 12, 40; no stray, no ids 1 or 7


def test_path_helpers_parse_components():
  assert gallery.gallery_camera("cam1/0006/0025.jpg") == 1
  assert gallery.path_identity("cam1/0006/0025.jpg") == 6
  # Fixed offsets from the end (AGW) would misread these.
  assert gallery.gallery_camera("cam4/0123/Thumbs.db") == 4
  assert gallery.path_identity("/data/cam9/SYSU-MM01/cam5/0533/12.jpg") == 533
  assert gallery.gallery_camera(Path("SYSU-MM01") / "cam6" / "0001" / "0001.jpg") == 6
  with pytest.raises(ValueError, match="not a SYSU-MM01 image path"):
    gallery.path_identity("0006/0025.jpg")
  with pytest.raises(ValueError, match="'rgb' is not a camera folder"):
    gallery.gallery_camera("rgb/0006/0025.jpg")
  with pytest.raises(ValueError, match="'x006' is not an identity folder"):
    gallery.path_identity("cam1/x006/0025.jpg")


@pytest.mark.parametrize("kwargs,choices", [
    ({"mode": "outdoor"}, "('all', 'indoor')"),
    ({"shot": 5}, "(1, 10)"),
    ({"shot": True}, "(1, 10)"),
    ({"trial": 10}, "(0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"),
    ({"trial": -1}, "(0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"),
    ({"sampling": "random"}, "('agw', 'official')"),
])
def test_bad_arguments_list_the_choices(tree, kwargs, choices):
  with pytest.raises(ValueError) as info:
    gallery.sysu_gallery(tree, **kwargs)
  assert choices in str(info.value)
  assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_test_id_file_errors(tree):
  (tree / "exp" / "test_id.txt").write_text("3,5,\n")
  with pytest.raises(layouts.LayoutError, match="test_id.txt"):
    gallery.sysu_query(tree)
  (tree / "exp" / "test_id.txt").unlink()
  with pytest.raises(layouts.LayoutError, match="missing"):
    gallery.sysu_gallery(tree)
