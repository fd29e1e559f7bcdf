"""Scanning and validation of the extracted SYSU-MM01 and RegDB folders.

Pure Python (no TFDS): the TFDS builders, evaluation code (gallery sampling needs the sorted
per-folder file lists) and the raw-folder fallback reader all start from the trees built here.
Every problem raises `LayoutError` (a `maumjax.errors.UserError`) with one line naming the
offending path or value and the fix; messages about the manual dir name the caller's flag
(`flag=`, default `--manual_dir`). Layout problems surface in the scan and truncated or foreign
image files in `maumjax.data.images.check_images`, both before a build writes anything; damage
that only a full decode reveals surfaces while writing, and `maumjax.data.build` then removes
the partial output. Files in identity folders that are not the dataset's images are skipped and
listed (`ignored`). `sysu_fingerprint` / `regdb_fingerprint` summarise what a build reads (file
names and sizes, split-file contents) so a build can tell that its source changed.

Records are plain dicts with the fields `path` (relative to the dataset root, forward
slashes), `identity` (original id), `label` (contiguous training label, -1 outside training),
`camera`, `modality` (0 visible, 1 infrared) and `frame`.

References:
  Layouts, splits and counts: ../shared/spec/protocol.md sections 1.3-1.5 and 2.2-2.4.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from maumjax.errors import UserError

Record = dict[str, int | str]

SYSU_CAMERAS = (1, 2, 3, 4, 5, 6)
SYSU_RGB_CAMERAS = (1, 2, 4, 5)
SYSU_IR_CAMERAS = (3, 6)
# AGW caches each modality in identity order, cameras in this order inside an identity.
SYSU_TRAIN_CAMERA_ORDER = (1, 2, 4, 5, 3, 6)
SYSU_SPLITS = ("train", "query", "gallery")
SYSU_SPLIT_FILES = ("train", "val", "test")

# Counts of the official release (protocol.md 1.4): `(identities, rgb images, ir images)`.
SYSU_REAL_COUNTS = {
    "train": (296, 20284, 9929),
    "val": (99, 1974, 1980),
    "test": (96, 6775, 3803),
}
# A copy listing at least this many split identities is taken for the real release.
REAL_MIN_IDENTITIES = 400

REGDB_TRIALS = tuple(range(1, 11))
REGDB_SPLITS = ("train", "test_visible", "test_thermal")
REGDB_IDX_KINDS = ("train_visible", "train_thermal", "test_visible", "test_thermal")
# Official release (protocol.md 2.3): identities, images per identity and modality, and
# per idx file lines and identities.
REGDB_REAL_COUNTS = {
    "identities": 412,
    "images_per_modality": 10,
    "idx_lines": 2060,
    "idx_identities": 206,
}

_MODALITY_FOLDERS = {"visible": "Visible", "thermal": "Thermal"}
_SYSU_CAM_RE = re.compile(r"cam[1-6]")
_REGDB_NAME_RE = re.compile(r"[A-Za-z]+_(?:front|back)_[vt]_(\d{5})_\d+\.bmp")


# The flag that sets the manual dir, named in the messages; callers pass their own
# (training: `--config.data.manual_dir`).
MANUAL_DIR_FLAG = "--manual_dir"


class LayoutError(UserError, ValueError):
  """An extracted dataset folder does not have the expected layout or content."""


# ----------------------------------------------------------------------------------------------
# SYSU-MM01


@dataclasses.dataclass(frozen=True)
class SysuTree:
  """Scanned SYSU-MM01 folder.

  Attributes:
    root: the folder holding cam1..cam6 and exp/.
    train_ids, val_ids, test_ids: sorted identities from exp/{train,val,test}_id.txt.
    files: (camera, identity) -> sorted relative paths such as 'cam1/0006/0025.jpg', for every
      identity folder found (split or not).
    ignored: sorted relative paths of the other files in identity folders (not .jpg images,
      e.g. 'cam1/0006/Thumbs.db'); the builders skip them.
  """

  root: Path
  train_ids: tuple[int, ...]
  val_ids: tuple[int, ...]
  test_ids: tuple[int, ...]
  files: Mapping[tuple[int, int], tuple[str, ...]]
  ignored: tuple[str, ...] = ()


def _nonempty_dir(path: Path, what: str, fix: str) -> None:
  if not path.is_dir():
    raise LayoutError(f"{what} not found at {str(path)!r} (no such directory); {fix}")
  if not any(path.iterdir()):
    raise LayoutError(f"{what} at {str(path)!r} is empty; {fix}")


def _single_root(manual_dir: Path, is_root: Callable[[Path], bool], preferred: str,
                 flag: str) -> Path | None:
  """Returns `manual_dir`, `manual_dir/preferred` or its only subfolder passing `is_root`."""
  if is_root(manual_dir):
    return manual_dir
  if is_root(manual_dir / preferred):
    return manual_dir / preferred
  candidates = sorted(p for p in manual_dir.iterdir() if p.is_dir() and is_root(p))
  if len(candidates) > 1:
    names = ", ".join(repr(str(p)) for p in candidates)
    raise LayoutError(
        f"several dataset folders found under {str(manual_dir)!r}: {names}; "
        f"set {flag} to the one to build")
  return candidates[0] if candidates else None


def _has_sysu_cams(path: Path) -> bool:
  return path.is_dir() and any((path / f"cam{c}").is_dir() for c in SYSU_CAMERAS)


def find_sysu_root(manual_dir: str | os.PathLike[str], *, flag: str = MANUAL_DIR_FLAG) -> Path:
  """Locates the SYSU-MM01 folder: `manual_dir` itself or one level down.

  Args:
    manual_dir: directory the user extracted SYSU-MM01.zip into.
    flag: the caller's flag for the manual dir, named in the messages.

  Returns:
    The folder holding cam1..cam6 (and exp/).

  Raises:
    LayoutError: the directory is missing or empty, or holds no camN folders at depth 0 or 1.
  """
  manual_dir = Path(manual_dir)
  fix = f"extract SYSU-MM01.zip there or set {flag}"
  _nonempty_dir(manual_dir, "SYSU-MM01 manual directory", fix)
  root = _single_root(manual_dir, _has_sysu_cams, "SYSU-MM01", flag)
  if root is not None:
    return root
  hint = ""
  if (manual_dir / "Visible").is_dir() or (manual_dir / "Thermal").is_dir():
    hint = " (it looks like RegDB: Visible/ and Thermal/ found)"
  else:
    deeper = sorted(p.parent for p in manual_dir.glob("*/*/cam1") if p.is_dir())
    if deeper:
      hint = f" (cam folders found deeper, in {str(deeper[0])!r}: point {flag} there)"
  raise LayoutError(
      f"SYSU-MM01 not found at {str(manual_dir)!r} (no cam1..cam6 folders){hint}; {fix}")


def _parse_sysu_id_file(path: Path) -> tuple[int, ...]:
  """Parses one exp/*_id.txt: comma-separated unpadded ints, loose about whitespace."""
  fix = "re-extract exp/ from SYSU-MM01.zip"
  if not path.is_file():
    raise LayoutError(f"SYSU-MM01 split file {str(path)!r} is missing; {fix}")
  ids = []
  for token in re.split(r"[,\s]+", path.read_text().strip()):
    if not token:
      continue
    if not token.isdigit() or int(token) < 1:
      raise LayoutError(
          f"SYSU-MM01 split file {str(path)!r} holds {token!r}, not a positive integer id; {fix}")
    ids.append(int(token))
  if not ids:
    raise LayoutError(f"SYSU-MM01 split file {str(path)!r} lists no identities; {fix}")
  repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
  if repeated:
    raise LayoutError(f"SYSU-MM01 split file {str(path)!r} lists ids {repeated} twice; {fix}")
  return tuple(sorted(ids))


def _is_sysu_id_dir(name: str) -> bool:
  return len(name) == 4 and name.isdigit()


def _split_images(folder: Path, suffix: str, prefix: str) -> tuple[list[str], list[str]]:
  """Relative paths of the `suffix` images in `folder`, and of its other files (ignored)."""
  images, others = [], []
  for path in folder.iterdir():
    if path.suffix == suffix and path.is_file():
      images.append(f"{prefix}/{path.name}")
    elif not path.is_dir():
      others.append(f"{prefix}/{path.name}")
  return sorted(images), others


def _scan_sysu_camera(cam_dir: Path, camera: int,
                      ignored: list[str]) -> dict[tuple[int, int], tuple[str, ...]]:
  fix = "re-extract SYSU-MM01.zip"
  files = {}
  for id_dir in sorted(cam_dir.iterdir()):
    if not (id_dir.is_dir() and _is_sysu_id_dir(id_dir.name)):
      continue  # stray folders (e.g. extracted video frames) are not identities
    paths, others = _split_images(id_dir, ".jpg", f"cam{camera}/{id_dir.name}")
    ignored.extend(others)
    if not paths:
      raise LayoutError(f"SYSU-MM01 identity folder {str(id_dir)!r} holds no .jpg images; {fix}")
    files[camera, int(id_dir.name)] = tuple(paths)
  if not files:
    raise LayoutError(
        f"SYSU-MM01 camera folder {str(cam_dir)!r} holds no identity folders (NNNN/*.jpg); {fix}")
  return files


def scan_sysu_mm01(root: str | os.PathLike[str]) -> SysuTree:
  """Scans and validates an extracted SYSU-MM01 folder.

  Args:
    root: the folder holding cam1..cam6 and exp/ (see `find_sysu_root`).

  Returns:
    The scanned tree.

  Raises:
    LayoutError: a camera folder or split file is missing, empty or unparsable; a split
      identity has no images or lacks a modality; or an identity is in two splits.
  """
  root = Path(root)
  files: dict[tuple[int, int], tuple[str, ...]] = {}
  ignored: list[str] = []
  for camera in SYSU_CAMERAS:
    cam_dir = root / f"cam{camera}"
    if not cam_dir.is_dir():
      raise LayoutError(
          f"SYSU-MM01 camera folder {str(cam_dir)!r} is missing; re-extract SYSU-MM01.zip")
    files.update(_scan_sysu_camera(cam_dir, camera, ignored))
  exp_dir = root / "exp"
  if not exp_dir.is_dir():
    raise LayoutError(
        f"SYSU-MM01 split folder {str(exp_dir)!r} is missing; re-extract exp/ from SYSU-MM01.zip")
  split_ids = {s: _parse_sysu_id_file(exp_dir / f"{s}_id.txt") for s in SYSU_SPLIT_FILES}
  for i, first in enumerate(SYSU_SPLIT_FILES):
    for second in SYSU_SPLIT_FILES[i + 1:]:
      shared = sorted(set(split_ids[first]) & set(split_ids[second]))
      if shared:
        raise LayoutError(
            f'identities {shared} are listed in both {str(exp_dir / f"{first}_id.txt")!r} and '
            f'{str(exp_dir / f"{second}_id.txt")!r}; splits must be disjoint, re-extract exp/')
  for split, ids in split_ids.items():
    id_file = str(exp_dir / f"{split}_id.txt")
    for identity in ids:
      rgb = any((c, identity) in files for c in SYSU_RGB_CAMERAS)
      ir = any((c, identity) in files for c in SYSU_IR_CAMERAS)
      if not (rgb or ir):
        raise LayoutError(
            f"identity {identity} is listed in {id_file!r} but has no image folder "
            f"cam*/{identity:04d} under {str(root)!r}; re-extract SYSU-MM01.zip")
      if not (rgb and ir):
        missing = "RGB (cam1/2/4/5)" if ir else "IR (cam3/6)"
        raise LayoutError(
            f"identity {identity} listed in {id_file!r} has no {missing} images under "
            f"{str(root)!r}; every split identity needs both modalities, re-extract SYSU-MM01.zip")
  return SysuTree(root, split_ids["train"], split_ids["val"], split_ids["test"], files,
                  tuple(sorted(ignored)))


def _sysu_record(path: str, label: int) -> Record:
  cam_name, id_name, file_name = path.split("/")
  camera = int(cam_name[3:])
  stem = file_name.rsplit(".", 1)[0]
  return {
      "path": path,
      "identity": int(id_name),
      "label": label,
      "camera": camera,
      "modality": int(camera in SYSU_IR_CAMERAS),
      "frame": int(stem) if stem.isdigit() else -1,
  }


def sysu_records(tree: SysuTree, split: str) -> list[Record]:
  """Lists the records of one SYSU-MM01 split in generation order.

  Args:
    tree: from `scan_sysu_mm01`.
    split: 'train' (train + val identities, all cameras, labels 0..N-1 in ascending original
      id, as AGW), 'query' (IR images of test identities) or 'gallery' (RGB images of test
      identities; evaluation samples the per-trial gallery from this pool).

  Returns:
    Records ordered by identity, then camera (SYSU_TRAIN_CAMERA_ORDER for train, 3, 6 for
    query, 1, 2, 4, 5 for gallery), then file name.

  Raises:
    ValueError: unknown split.
  """
  if split == "train":
    ids, cameras = sorted(tree.train_ids + tree.val_ids), SYSU_TRAIN_CAMERA_ORDER
  elif split == "query":
    ids, cameras = tree.test_ids, SYSU_IR_CAMERAS
  elif split == "gallery":
    ids, cameras = tree.test_ids, SYSU_RGB_CAMERAS
  else:
    raise ValueError(f"unknown SYSU-MM01 split {split!r}; choose one of {SYSU_SPLITS}")
  records = []
  for label, identity in enumerate(ids):
    for camera in cameras:
      for path in tree.files.get((camera, identity), ()):
        records.append(_sysu_record(path, label if split == "train" else -1))
  return records


def sysu_count_warnings(tree: SysuTree) -> list[str]:
  """Compares a copy that looks real (>= 400 split ids) with the official counts.

  Returns:
    One message per differing count; empty for matching or small (synthetic) copies.
  """
  split_ids = {"train": tree.train_ids, "val": tree.val_ids, "test": tree.test_ids}
  if sum(len(v) for v in split_ids.values()) < REAL_MIN_IDENTITIES:
    return []
  messages = []
  for split, ids in split_ids.items():
    rgb = sum(len(tree.files.get((c, i), ())) for i in ids for c in SYSU_RGB_CAMERAS)
    ir = sum(len(tree.files.get((c, i), ())) for i in ids for c in SYSU_IR_CAMERAS)
    got, want = (len(ids), rgb, ir), SYSU_REAL_COUNTS[split]
    if got != want:
      messages.append(
          f"SYSU-MM01 at {str(tree.root)!r}: {split} has (identities, RGB, IR) = {got}, the "
          f"official release has {want}; check that the archive was fully extracted")
  return messages


# ----------------------------------------------------------------------------------------------
# RegDB


@dataclasses.dataclass(frozen=True)
class RegdbTree:
  """Scanned RegDB folder.

  Attributes:
    root: the folder holding Visible/, Thermal/ and idx/.
    visible, thermal: identity -> sorted relative paths such as 'Visible/3/x.bmp'.
    idx: (kind, trial) -> the parsed idx lines `(path, label)` in file order, for the kinds of
      REGDB_IDX_KINDS and the scanned trials.
    ignored: sorted relative paths of the other files in identity folders (not .bmp images);
      the builders skip them.
  """

  root: Path
  visible: Mapping[int, tuple[str, ...]]
  thermal: Mapping[int, tuple[str, ...]]
  idx: Mapping[tuple[str, int], tuple[tuple[str, int], ...]]
  ignored: tuple[str, ...] = ()


def _has_regdb_folders(path: Path) -> bool:
  return path.is_dir() and (path / "Visible").is_dir() and (path / "Thermal").is_dir()


def find_regdb_root(manual_dir: str | os.PathLike[str], *, flag: str = MANUAL_DIR_FLAG) -> Path:
  """Locates the RegDB folder: `manual_dir` itself or one level down.

  Args:
    manual_dir: directory the user extracted RegDB into.
    flag: the caller's flag for the manual dir, named in the messages.

  Returns:
    The folder holding Visible/, Thermal/ and idx/.

  Raises:
    LayoutError: the directory is missing or empty, or holds no Visible/ and Thermal/.
  """
  manual_dir = Path(manual_dir)
  fix = f"extract RegDB (Visible/, Thermal/, idx/) there or set {flag}"
  _nonempty_dir(manual_dir, "RegDB manual directory", fix)
  root = _single_root(manual_dir, _has_regdb_folders, "RegDB", flag)
  if root is not None:
    return root
  hint = " (it looks like SYSU-MM01: cam folders found)" if _has_sysu_cams(manual_dir) else ""
  raise LayoutError(
      f"RegDB not found at {str(manual_dir)!r} (no Visible/ and Thermal/ folders){hint}; {fix}")


def _scan_regdb_modality(folder: Path, ignored: list[str]) -> dict[int, tuple[str, ...]]:
  fix = "re-extract the RegDB archive"
  _nonempty_dir(folder, "RegDB image folder", fix)
  files = {}
  for pid_dir in folder.iterdir():
    if not (pid_dir.is_dir() and pid_dir.name.isdigit()):
      continue
    paths, others = _split_images(pid_dir, ".bmp", f"{folder.name}/{pid_dir.name}")
    ignored.extend(others)
    if not paths:
      raise LayoutError(f"RegDB identity folder {str(pid_dir)!r} holds no .bmp images; {fix}")
    files[int(pid_dir.name)] = tuple(paths)
  if not files:
    raise LayoutError(f"RegDB folder {str(folder)!r} holds no <pid>/*.bmp images; {fix}")
  return dict(sorted(files.items()))


def _parse_regdb_idx(path: Path, modality: str, known: set[str]) -> tuple[tuple[str, int], ...]:
  """Parses one idx file and checks that each listed image exists in the right folder."""
  fix = "re-extract idx/ from the RegDB distribution"
  lines = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    tokens = line.split()
    if len(tokens) != 2 or not re.fullmatch(r"-?\d+", tokens[1]):
      raise LayoutError(
          f'{str(path)!r} line {number} is {line!r}, not "<path> <integer label>"; {fix}')
    rel = tokens[0].replace("\\", "/")
    parts = rel.split("/")
    if len(parts) != 3 or parts[0] != _MODALITY_FOLDERS[modality] or not parts[1].isdigit():
      raise LayoutError(
          f"{str(path)!r} line {number} lists {rel!r}, not {_MODALITY_FOLDERS[modality]}/<pid>/"
          f"<name>.bmp; {fix}")
    if rel not in known:
      raise LayoutError(
          f"{str(path)!r} line {number} lists {str(path.parent.parent / rel)!r}, which does not "
          "exist; re-extract the RegDB archive next to idx/")
    lines.append((rel, int(tokens[1])))
  if not lines:
    raise LayoutError(f"RegDB idx file {str(path)!r} lists no images; {fix}")
  repeated = [p for p, n in collections.Counter(p for p, _ in lines).items() if n > 1]
  if repeated:
    raise LayoutError(f"{str(path)!r} lists {repeated[0]!r} more than once; {fix}")
  return tuple(lines)


def _label_map(path: Path, lines: Sequence[tuple[str, int]]) -> dict[int, int]:
  """Checks that the idx label is a bijection onto the file's identities."""
  pid_to_label: dict[int, int] = {}
  label_to_pid: dict[int, int] = {}
  for rel, label in lines:
    pid = int(rel.split("/")[1])
    if pid_to_label.setdefault(pid, label) != label or label_to_pid.setdefault(label, pid) != pid:
      raise LayoutError(
          f"{str(path)!r}: label {label} of {rel!r} breaks the one-to-one match between labels "
          f"and identity folders (identity {pid} has label {pid_to_label[pid]}, label {label} "
          f"has identity {label_to_pid[label]}); re-extract idx/ from the RegDB distribution")
  return pid_to_label


def scan_regdb(root: str | os.PathLike[str], trials: Iterable[int] = REGDB_TRIALS) -> RegdbTree:
  """Scans and validates an extracted RegDB folder.

  Args:
    root: the folder holding Visible/, Thermal/ and idx/ (see `find_regdb_root`).
    trials: trials whose four idx files are parsed and checked.

  Returns:
    The scanned tree.

  Raises:
    LayoutError: an image folder or idx file is missing; an idx line is malformed or lists a
      missing image; labels are not a bijection onto identities or differ between the visible
      and thermal files; or train and test identities overlap.
  """
  root = Path(root)
  ignored: list[str] = []
  visible = _scan_regdb_modality(root / "Visible", ignored)
  thermal = _scan_regdb_modality(root / "Thermal", ignored)
  known = {p for paths in (*visible.values(), *thermal.values()) for p in paths}
  idx_dir = root / "idx"
  idx = {}
  for trial in trials:
    if trial not in REGDB_TRIALS:
      raise ValueError(f"RegDB trial {trial} does not exist; choose one of {REGDB_TRIALS}")
    maps = {}
    for kind in REGDB_IDX_KINDS:
      path = idx_dir / f"{kind}_{trial}.txt"
      if not path.is_file():
        raise LayoutError(
            f"RegDB idx file {str(path)!r} is missing; idx/ must hold the 40 files "
            "{train,test}_{visible,thermal}_{1..10}.txt of Ye et al.'s protocol, copy them there")
      idx[kind, trial] = _parse_regdb_idx(path, kind.split("_")[1], known)
      maps[kind] = _label_map(path, idx[kind, trial])
    for stage in ("train", "test"):
      if maps[f"{stage}_visible"] != maps[f"{stage}_thermal"]:
        raise LayoutError(
            f'{str(idx_dir / f"{stage}_visible_{trial}.txt")!r} and '
            f'{str(idx_dir / f"{stage}_thermal_{trial}.txt")!r} give different identities or '
            "labels; each identity needs the same label in both, re-extract idx/")
    shared = sorted(set(maps["train_visible"]) & set(maps["test_visible"]))
    if shared:
      raise LayoutError(
          f'identities {shared[:10]} are in both {str(idx_dir / f"train_visible_{trial}.txt")!r} '
          f'and {str(idx_dir / f"test_visible_{trial}.txt")!r}; train and test must be disjoint, '
          "re-extract idx/")
  return RegdbTree(root, visible, thermal, idx, tuple(sorted(ignored)))


def _regdb_record(path: str, label: int) -> Record:
  folder, pid, name = path.split("/")
  match = _REGDB_NAME_RE.fullmatch(name)
  thermal = folder == "Thermal"
  return {
      "path": path,
      "identity": int(pid),
      "label": label,
      "camera": 2 if thermal else 1,
      "modality": int(thermal),
      "frame": int(match.group(1)) if match else -1,
  }


def regdb_records(tree: RegdbTree, trial: int, split: str) -> list[Record]:
  """Lists the records of one RegDB split of one trial, in idx file order.

  Args:
    tree: from `scan_regdb` (with `trial` among its scanned trials).
    trial: 1..10.
    split: 'train' (train_visible then train_thermal lines), 'test_visible' or 'test_thermal'.

  Returns:
    Records; `label` is the idx label.

  Raises:
    ValueError: unknown split, or the trial was not scanned.
  """
  kinds = {"train": REGDB_IDX_KINDS[:2], "test_visible": ("test_visible",),
           "test_thermal": ("test_thermal",)}
  if split not in kinds:
    raise ValueError(f"unknown RegDB split {split!r}; choose one of {REGDB_SPLITS}")
  if (kinds[split][0], trial) not in tree.idx:
    scanned = sorted({t for _, t in tree.idx})
    raise ValueError(f"RegDB trial {trial} was not scanned (scanned: {scanned}); pass it to "
                     "scan_regdb(trials=...)")
  return [_regdb_record(p, label) for kind in kinds[split] for p, label in tree.idx[kind, trial]]


def regdb_count_warnings(tree: RegdbTree) -> list[str]:
  """Compares a copy that looks real (>= 400 identities) with the official counts.

  Returns:
    One message per differing count; empty for matching or small (synthetic) copies.
  """
  if len(tree.visible) < REAL_MIN_IDENTITIES:
    return []
  real = REGDB_REAL_COUNTS
  messages = []
  for name, files in (("Visible", tree.visible), ("Thermal", tree.thermal)):
    per_id = collections.Counter(len(v) for v in files.values())
    if len(files) != real["identities"] or set(per_id) != {real["images_per_modality"]}:
      messages.append(
          f"RegDB {name}/ at {str(tree.root)!r} has {len(files)} identities with "
          f'{dict(per_id)} images each; the release has {real["identities"]} x '
          f'{real["images_per_modality"]}; check the extraction')
  for (kind, trial), lines in tree.idx.items():
    ids = {p.split("/")[1] for p, _ in lines}
    if (len(lines), len(ids)) != (real["idx_lines"], real["idx_identities"]):
      messages.append(
          f"RegDB idx/{kind}_{trial}.txt has {len(lines)} lines over {len(ids)} identities; the "
          f'protocol has {real["idx_lines"]} over {real["idx_identities"]}')
  return messages


# ----------------------------------------------------------------------------------------------
# Source fingerprints


def _fingerprint(root: Path, folders: Sequence[str], is_id_dir: Callable[[str], bool],
                 texts: Sequence[str]) -> dict[str, int | str]:
  """Hashes the names and sizes of the files in `<root>/<folder>/<id dir>/` and the contents
  of the small `texts` files: a stat walk, image contents are never read."""
  digest = hashlib.sha1()
  num_files = num_bytes = 0
  for folder in folders:
    try:
      id_dirs = sorted((e for e in os.scandir(root / folder) if is_id_dir(e.name) and e.is_dir()),
                       key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
      digest.update(f"{folder}: missing\n".encode())
      continue
    for id_dir in id_dirs:
      for entry in sorted(os.scandir(id_dir.path), key=lambda e: e.name):
        if entry.is_file():
          size = entry.stat().st_size
          num_files += 1
          num_bytes += size
          digest.update(f"{folder}/{id_dir.name}/{entry.name}\0{size}\n".encode())
  for text in texts:
    path = root / text
    data = path.read_bytes() if path.is_file() else b"missing"
    digest.update(f"{text}\0{len(data)}\n".encode() + hashlib.sha1(data).digest())
  return {"files": num_files, "bytes": num_bytes, "sha1": digest.hexdigest()}


def sysu_fingerprint(root: str | os.PathLike[str]) -> dict[str, int | str]:
  """A cheap fingerprint of what a SYSU-MM01 build reads from `root`.

  Covers the name and size of every file in the identity folders `cam1..cam6/NNNN/` and the
  contents of `exp/{train,val,test}_id.txt`; a stat walk (no image is opened), so a changed,
  added or removed image or split file changes it. Files elsewhere (e.g. `exp/rand_perm_cam.mat`,
  which only the evaluation reads) do not count.

  Returns:
    `{"files": number of files, "bytes": their total size, "sha1": hex digest}`.
  """
  return _fingerprint(Path(root), [f"cam{c}" for c in SYSU_CAMERAS], _is_sysu_id_dir,
                      [f"exp/{s}_id.txt" for s in SYSU_SPLIT_FILES])


def regdb_fingerprint(root: str | os.PathLike[str],
                      trials: Iterable[int] = REGDB_TRIALS) -> dict[str, int | str]:
  """A cheap fingerprint of what a RegDB build of `trials` reads from `root`.

  Covers the name and size of every file in `Visible/<pid>/` and `Thermal/<pid>/` and the
  contents of the idx files of `trials`; see `sysu_fingerprint`.
  """
  texts = [f"idx/{kind}_{t}.txt" for t in trials for kind in REGDB_IDX_KINDS]
  return _fingerprint(Path(root), list(_MODALITY_FOLDERS.values()), str.isdigit, texts)
