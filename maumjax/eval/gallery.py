"""SYSU-MM01 query list and per-trial gallery draws, read from an extracted tree.

Two gallery samplers are both "the protocol" but draw different images (protocol.md §1.8):

* `'agw'`: AGW's python-random draw (procedure A), reproduced image for image, including its
  quirks: it lists every directory entry, not only JPEGs, and sorts before drawing.
* `'official'`: the dataset authors' permutation file `rand_perm_cam.mat` (procedure B), as the
  official MATLAB kit and MPANet use it.

The pure functions `draw_agw` and `draw_official` take a folder listing instead of a path, so
evaluation code that holds the stored test pool (protocol.md §1.9) can draw from it without
touching the raw folders. All paths are relative to the SYSU-MM01 root, with forward slashes,
e.g. `cam1/0006/0025.jpg`.

References:
  protocol.md §1.3 (layout), §1.6 (query and gallery), §1.8 A and B (the two draws).
  AGW: M. Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook",
  TPAMI 2021 (`data_manager.py`, `process_gallery_sysu` / `process_query_sysu`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import scipy.io
import scipy.io.matlab

from maumjax.data import layouts

GALLERY_MODES = ("all", "indoor")
GALLERY_CAMERAS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
QUERY_CAMERAS = (3, 6)
SHOTS = (1, 10)
TRIALS = tuple(range(10))
SAMPLINGS = ("agw", "official")
PERM_VARIABLE = "rand_perm_cam"
PERM_FILE_NAME = "rand_perm_cam.mat"

# (camera, identity) -> the entry names of folder cam{camera}/{identity:04d}; a missing key
# means the folder does not exist.
Listing = Mapping[tuple[int, int], Sequence[str]]

_CAMERA_RE = re.compile(r"cam(\d+)")
_PERM_HELP = (f"{PERM_FILE_NAME} is not part of SYSU-MM01.zip: copy it from evaluation/data_split/ "
              "of the official repository github.com/wuancong/SYSU-MM01 into the dataset's exp/ "
              "folder, or pass perm_file")
_PERM_FIX = ("replace it with an unmodified copy from evaluation/data_split/ of "
             "github.com/wuancong/SYSU-MM01")


def _check_choice(name: str, value: object, choices: Sequence[object]) -> None:
  # bool is an int subclass; True must not pass for shot=1.
  if isinstance(value, bool) or value not in choices:
    raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")


def _check_args(mode: str, shot: int, trial: int) -> None:
  _check_choice("mode", mode, GALLERY_MODES)
  _check_choice("shot", shot, SHOTS)
  _check_choice("trial", trial, TRIALS)


def _components(path: str | os.PathLike[str]) -> tuple[str, str, str]:
  parts = PurePosixPath(os.fspath(path).replace("\\", "/")).parts
  if len(parts) < 3:
    raise ValueError(f"{os.fspath(path)!r} is not a SYSU-MM01 image path camN/NNNN/<file>")
  return parts[-3], parts[-2], parts[-1]


def gallery_camera(path: str | os.PathLike[str]) -> int:
  """Camera number of a SYSU-MM01 image path, read from its camera folder component.

  Args:
    path: `camN/NNNN/<file>`, relative or with any prefix (e.g. `cam1/0006/0025.jpg`).

  Returns:
    N, e.g. 1.

  Raises:
    ValueError: the path does not end in `camN/NNNN/<file>`.
  """
  cam_name, _, _ = _components(path)
  match = _CAMERA_RE.fullmatch(cam_name)
  if match is None:
    raise ValueError(f"{os.fspath(path)!r}: folder {cam_name!r} is not a camera folder camN")
  return int(match.group(1))


def path_identity(path: str | os.PathLike[str]) -> int:
  """Identity of a SYSU-MM01 image path, read from its identity folder component.

  Args:
    path: `camN/NNNN/<file>`, relative or with any prefix (e.g. `cam1/0006/0025.jpg`).

  Returns:
    int(NNNN), e.g. 6.

  Raises:
    ValueError: the path does not end in `camN/NNNN/<file>`.
  """
  _, id_name, _ = _components(path)
  if not id_name.isdigit():
    raise ValueError(f"{os.fspath(path)!r}: folder {id_name!r} is not an identity folder NNNN")
  return int(id_name)


def read_test_ids(root: str | os.PathLike[str]) -> tuple[int, ...]:
  """Reads the test identities as AGW does: the first line of exp/test_id.txt.

  Args:
    root: the SYSU-MM01 folder (holding cam1..cam6 and exp/).

  Returns:
    The identities, ascending.

  Raises:
    layouts.LayoutError: the file is missing, or its first line holds a token that is not a
      positive integer or lists an identity twice.
  """
  path = Path(root) / "exp" / "test_id.txt"
  fix = "re-extract exp/ from SYSU-MM01.zip"
  if not path.is_file():
    raise layouts.LayoutError(f"SYSU-MM01 split file {str(path)!r} is missing; {fix}")
  lines = path.read_text().splitlines()
  ids = []
  for token in (lines[0] if lines else "").split(","):
    token = token.strip()
    if not token.isdigit() or int(token) < 1:
      raise layouts.LayoutError(
          f"the first line of {str(path)!r} holds {token!r}, not a positive integer id; {fix}")
    ids.append(int(token))
  repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
  if repeated:
    raise layouts.LayoutError(f"{str(path)!r} lists ids {repeated} twice; {fix}")
  return tuple(sorted(ids))


def _list_folders(root: Path, ids: Iterable[int], cameras: Iterable[int], *,
                  jpg_only: bool) -> dict[tuple[int, int], list[str]]:
  listing = {}
  for camera in cameras:
    for identity in ids:
      folder = root / f"cam{camera}" / f"{identity:04d}"
      if not folder.is_dir():
        continue
      names = os.listdir(folder)
      if jpg_only:
        names = [n for n in names if n.endswith(".jpg") and (folder / n).is_file()]
      listing[camera, identity] = sorted(names)
  return listing


def draw_agw(test_ids: Iterable[int], listing: Listing, *, mode: str, shot: int,
             trial: int) -> list[str]:
  """AGW's python-random gallery draw (protocol.md §1.8 A, steps 2-5).

  Args:
    test_ids: the test identities.
    listing: names of ALL entries of each existing (gallery camera, test identity) folder;
      AGW does not filter by extension, so neither may the caller.
    mode: 'all' or 'indoor'.
    shot: 1 or 10 images per (identity, camera) folder.
    trial: 0..9, the seed.

  Returns:
    Gallery paths in draw order.

  Raises:
    ValueError: a bad argument, or a folder with fewer than `shot` entries.
  """
  _check_args(mode, shot, trial)
  # A private generator gives the stream of AGW's module-level random.seed(trial), and no
  # other code can consume draws in between.
  rng = random.Random(trial)
  out = []
  # AGW sorts the zero-padded id strings; the key keeps that order even past 9999.
  for identity in sorted(test_ids, key=lambda i: f"{i:04d}"):
    for camera in GALLERY_CAMERAS[mode]:
      if (camera, identity) not in listing:
        continue  # no folder: AGW skips it without drawing
      folder = f"cam{camera}/{identity:04d}"
      # AGW sorts full paths; they share the folder prefix, so sorting names is the same.
      names = sorted(listing[camera, identity])
      if len(names) < shot:
        raise ValueError(f"SYSU-MM01 folder {folder!r} holds {len(names)} entries, fewer than "
                         f"the {shot} a {shot}-shot gallery draws; re-extract SYSU-MM01.zip")
      picks = [rng.choice(names)] if shot == 1 else rng.sample(names, shot)
      out.extend(f"{folder}/{name}" for name in picks)
  return out


@dataclasses.dataclass(frozen=True)
class RandPerm:
  """The parsed official permutation file.

  Attributes:
    path: the file it was read from, for messages.
    entries: (camera, identity) -> [trials, n] int64 matrix of 1-based file numbers, one
      permutation per row; empty cells are left out.
  """

  path: str
  entries: Mapping[tuple[int, int], np.ndarray]


def _peel(value: object, *, keep_numeric: bool) -> object:
  """Strips the 1x1 object arrays loadmat may wrap around a cell or matrix."""
  while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
    inner = value.reshape(-1)[0]
    # Where a cell is expected, a 1x1 cell holding a matrix is a one-entry cell: keep it.
    if not isinstance(inner, np.ndarray) or (keep_numeric and inner.dtype != object):
      break
    value = inner
  return value


def _cell_items(value: object, what: str) -> list[object]:
  """Elements of a cell vector, whatever its orientation (1xN, Nx1 or squeezed N)."""
  value = np.asarray(_peel(value, keep_numeric=True))
  if value.size == 0:
    return []
  if value.dtype != object or value.ndim == 0 or value.size != max(value.shape):
    raise ValueError(f"{what} is a {value.dtype} array of shape {value.shape}, not a cell vector")
  return list(value.reshape(-1))


def load_rand_perm(perm_file: str | os.PathLike[str]) -> RandPerm:
  """Reads `rand_perm_cam.mat`: a 6x1 cell of per-camera cells over identity - 1.

  Args:
    perm_file: path of the file.

  Returns:
    The parsed matrices.

  Raises:
    FileNotFoundError: no such file (the message says where to get it).
    ValueError: not a MAT-file, no `rand_perm_cam` variable, or a malformed cell or entry.
  """
  path = os.fspath(perm_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SYSU-MM01 permutation file {path!r} not found; {_PERM_HELP}")
  try:
    data = scipy.io.loadmat(path)
  except (ValueError, TypeError, scipy.io.matlab.MatReadError) as e:
    raise ValueError(f"{path!r} is not a readable MAT-file ({e}); {_PERM_FIX}") from e
  if PERM_VARIABLE not in data:
    found = sorted(k for k in data if not k.startswith("__"))
    raise ValueError(f"{path!r} has no variable {PERM_VARIABLE!r} (found {found}); {_PERM_FIX}")
  cameras = _cell_items(data[PERM_VARIABLE], f"{PERM_VARIABLE} in {path!r}")
  if len(cameras) != len(layouts.SYSU_CAMERAS):
    raise ValueError(f"{PERM_VARIABLE} in {path!r} has {len(cameras)} camera entries, not "
                     f"{len(layouts.SYSU_CAMERAS)}; {_PERM_FIX}")
  entries = {}
  for camera, camera_cell in enumerate(cameras, start=1):
    for identity, entry in enumerate(
        _cell_items(camera_cell, f"camera {camera} of {path!r}"), start=1):
      matrix = np.asarray(_peel(entry, keep_numeric=False))
      where = f"camera {camera}, identity {identity} of {path!r}"
      if matrix.size == 0:
        continue
      if matrix.dtype.kind not in "uif" or matrix.ndim != 2:
        raise ValueError(f"{where} is a {matrix.dtype} array of shape {matrix.shape}, not a "
                         f"trials x n matrix of file numbers; {_PERM_FIX}")
      if matrix.dtype.kind == "f" and not np.array_equal(matrix, np.round(matrix)):
        raise ValueError(f"{where} holds non-integer file numbers; {_PERM_FIX}")
      matrix = matrix.astype(np.int64)
      if matrix.min() < 1:
        raise ValueError(f"{where} holds file number {matrix.min()}, but numbers are 1-based; "
                         f"{_PERM_FIX}")
      entries[camera, identity] = matrix
  return RandPerm(path, entries)


def draw_official(test_ids: Iterable[int], listing: Listing, perm: RandPerm, *, mode: str,
                  shot: int, trial: int) -> list[str]:
  """The official permutation-file gallery (protocol.md §1.8 B, step 3).

  Args:
    test_ids: the test identities.
    listing: entry names of each existing (gallery camera, test identity) folder.
    perm: from `load_rand_perm`.
    mode: 'all' or 'indoor'.
    shot: 1 or 10, the first `shot` values of the trial's row.
    trial: 0..9, the row.

  Returns:
    Gallery paths, cameras ascending, then identities ascending, then row order.

  Raises:
    ValueError: a bad argument; or, for a (camera, identity) with a folder, a missing entry,
      too few rows or columns, or a file number naming a missing file.
  """
  _check_args(mode, shot, trial)
  out = []
  for camera in GALLERY_CAMERAS[mode]:
    for identity in sorted(test_ids):
      if (camera, identity) not in listing:
        continue  # the official file has an empty cell here
      folder = f"cam{camera}/{identity:04d}"
      where = f"camera {camera}, identity {identity} in {perm.path!r}"
      matrix = perm.entries.get((camera, identity))
      if matrix is None:
        raise ValueError(f"{where}: no permutation although folder {folder!r} exists; the file "
                         f"does not match this copy of SYSU-MM01; {_PERM_FIX}")
      if matrix.shape[0] <= trial:
        raise ValueError(f"{where}: the {matrix.shape[0]}x{matrix.shape[1]} matrix has no row "
                         f"for trial {trial}; {_PERM_FIX}")
      if matrix.shape[1] < shot:
        raise ValueError(f"{where}: row {trial} holds {matrix.shape[1]} file numbers, fewer than "
                         f"the {shot} a {shot}-shot gallery takes; {_PERM_FIX}")
      present = set(listing[camera, identity])
      for number in matrix[trial, :shot].tolist():
        name = f"{number:04d}.jpg"
        if name not in present:
          raise ValueError(f"{where}: file number {number} names {folder}/{name}, which does "
                           "not exist; the file does not match this copy of SYSU-MM01, "
                           f"{_PERM_FIX}")
        out.append(f"{folder}/{name}")
  return out


def sysu_gallery(root: str | os.PathLike[str], *, mode: str = "all", shot: int = 1,
                 trial: int = 0, sampling: str = "agw",
                 perm_file: str | os.PathLike[str] | None = None) -> list[str]:
  """Draws the SYSU-MM01 gallery of one trial.

  Args:
    root: the SYSU-MM01 folder or the manual directory holding it.
    mode: 'all' (cams 1, 2, 4, 5) or 'indoor' (cams 1, 2).
    shot: 1 or 10 images per (test identity, gallery camera) folder.
    trial: 0..9.
    sampling: 'agw' (AGW's python-random draw) or 'official' (rand_perm_cam.mat).
    perm_file: for 'official'; default `<root>/exp/rand_perm_cam.mat`.

  Returns:
    Paths relative to the SYSU-MM01 root, in selection order.

  Raises:
    ValueError: a bad argument, or a folder or permutation entry that cannot serve the draw.
    layouts.LayoutError: SYSU-MM01 or exp/test_id.txt not found.
    FileNotFoundError: 'official' without the permutation file.
  """
  _check_args(mode, shot, trial)
  _check_choice("sampling", sampling, SAMPLINGS)
  root = layouts.find_sysu_root(root)
  test_ids = read_test_ids(root)
  # AGW draws from every directory entry; the official file only names .jpg files, so the same
  # unfiltered listing serves both.
  listing = _list_folders(root, test_ids, GALLERY_CAMERAS[mode], jpg_only=False)
  if sampling == "agw":
    return draw_agw(test_ids, listing, mode=mode, shot=shot, trial=trial)
  perm = load_rand_perm(root / "exp" / PERM_FILE_NAME if perm_file is None else perm_file)
  return draw_official(test_ids, listing, perm, mode=mode, shot=shot, trial=trial)


def sysu_query(root: str | os.PathLike[str]) -> list[str]:
  """Lists the SYSU-MM01 query: every infrared JPEG of the test identities (no randomness).

  Args:
    root: the SYSU-MM01 folder or the manual directory holding it.

  Returns:
    Paths relative to the root: identities ascending, then cam3, cam6, then file names sorted.

  Raises:
    layouts.LayoutError: SYSU-MM01 or exp/test_id.txt not found.
  """
  root = layouts.find_sysu_root(root)
  test_ids = read_test_ids(root)
  # AGW lists every entry here too; only JPEGs are images, and the real folders hold nothing
  # else, so filtering keeps stray files out of the query without changing it on real data.
  listing = _list_folders(root, test_ids, QUERY_CAMERAS, jpg_only=True)
  return [f"cam{camera}/{identity:04d}/{name}"
          for identity in test_ids for camera in QUERY_CAMERAS
          for name in listing.get((camera, identity), ())]
