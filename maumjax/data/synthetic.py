"""Seeded synthetic stand-ins for SYSU-MM01 and RegDB, written in the real on-disk layouts.

The real datasets are licence-gated (protocol.md §1.1, §2.1), so tests and the default demo use
procedurally drawn people (`maumjax.data.synthetic_render`) with a real modality gap: visible
cameras see colour, infrared cameras see heat and material, and only shape, accessories, garment
pattern and material carry identity across the two. Layouts follow protocol.md §1.3 and §2.2:

* `write_sysu_mm01`: `cam1..cam6/NNNN/NNNN.jpg` (cams 3 and 6 infrared, stored as 3-channel grey
  JPEG) and `exp/{train,val,test,available}_id.{txt,mat}`. Identity numbers have gaps, one or two
  extra identities appear only in RGB cameras and in no split file, some test identities are
  missing from cams 1 and 2 (indoor search has unmatched queries), and each camera has its own
  image size.
* `write_regdb`: `Visible/<pid>/..._v_NNNNN_<pid>.bmp`, `Thermal/<pid>/..._t_NNNNN_<pid>.bmp`
  (8-bit grey), unpadded pids, and `idx/{train,test}_{visible,thermal}_{t}.txt`.

Every (camera, identity) folder holds `images_per_camera` images; keep it >= 10 when the
multi-shot SYSU protocol (ten gallery images per folder) is to be exercised. Output is
byte-identical for a seed. Both writers fill a temporary sibling directory and rename it into
place, so a failure leaves nothing behind.

Command line (prints what it wrote):
  python -m maumjax.data.synthetic --layout sysu_mm01 --out /tmp/sysu [--num_identities 40]
      [--nir 0.5]
  python -m maumjax.data.synthetic --layout regdb --out /tmp/regdb [--images_per_modality 10]

Timing (one core of a 2-core Xeon VM, Python 3.11, about 2.5 ms per image): the SYSU default
(40 listed + 2 RGB-only identities, 12 images per folder, 1,992 JPEGs, 128x64 base) takes
5.3-5.5 s; the RegDB default (20 identities, 400 BMPs, 10 trials) 1.0 s.

Learnability check (not a test): a 6-conv CNN with only an identity cross-entropy, trained on the
80 train+val identities of a 100-identity tree at 64x32 for 1,500 steps of 64 images, reached
IR->RGB R1 27.5% / mAP 26.0% on the 20 test identities (all gallery images; chance R1 5%).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import scipy.io
from PIL import Image

from maumjax.data import synthetic_render as render_lib

RGB_CAMERAS = (1, 2, 4, 5)
IR_CAMERAS = (3, 6)
# Per-camera (height, width) factors on the base size: the real images differ in size per
# camera, so builders must resize (protocol.md §4.1).
SYSU_SIZE_FACTORS = {1: (1.0, 1.0), 2: (1.12, 1.09), 3: (0.9, 0.94), 4: (1.25, 1.19),
                     5: (0.8, 0.84), 6: (1.06, 1.0)}
JPEG_QUALITY = 90
# Independent random streams: SeedSequence((seed, stream, ...)) keeps every draw a function of
# what it describes, not of the order in which things are written.
_PLAN, _PERSON, _IMAGE, _CAMERA, _TRIAL = range(5)


def _rng(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng((seed, *keys))


def _tint(rng: np.random.Generator) -> tuple[float, float, float]:
  # Colour temperature: warm light raises red and lowers blue, cool light the reverse.
  t = rng.uniform(-1.0, 1.0)
  jitter = rng.uniform(0.95, 1.05, 3)
  return tuple(float(c) for c in np.array([1 + 0.15 * t, 1.0, 1 - 0.15 * t]) * jitter)


def _camera(modality: str, height: int, width: int, rng: np.random.Generator, *,
            clutter: int = 0, nir: float = 0.0) -> render_lib.Camera:
  view = dict(height=height, width=width, scale=float(rng.uniform(0.88, 1.06)),
              offset_y=float(rng.uniform(-0.04, 0.04)))
  if modality == "ir":
    return render_lib.Camera(
      "ir", **view, noise=float(rng.uniform(0.015, 0.03)), blur=float(rng.uniform(0.6, 1.0)),
      gain=float(rng.uniform(0.85, 1.15)), ambient=float(rng.uniform(0.12, 0.25)),
      clutter=clutter, nir=float(nir))
  return render_lib.Camera(
    "rgb", **view, noise=float(rng.uniform(0.01, 0.025)), tint=_tint(rng),
    brightness=float(rng.uniform(0.8, 1.15)), contrast=float(rng.uniform(0.8, 1.2)),
    background=tuple(float(c) for c in rng.uniform(0.2, 0.8, 3)),
    bg_kind=int(rng.integers(4)), bg_freq=float(rng.uniform(2.0, 8.0)))


def sysu_cameras(height: int, width: int, seed: int,
                 nir: float = 0.0) -> dict[int, render_lib.Camera]:
  """The six SYSU-MM01 cameras: 1, 2, 4, 5 visible; 3 indoor infrared; 6 cluttered infrared.

  `nir` is the infrared cameras' weight of reflected near-infrared light
  (`maumjax.data.synthetic_render.Camera.nir`; 0 = thermal only).
  """
  cams = {}
  for cam, (fh, fw) in SYSU_SIZE_FACTORS.items():
    modality = "ir" if cam in IR_CAMERAS else "rgb"
    cams[cam] = _camera(modality, max(8, round(height * fh)), max(4, round(width * fw)),
                        _rng(seed, _CAMERA, cam), clutter=3 if cam == 6 else 0, nir=nir)
  return cams


@contextlib.contextmanager
def _staging(out_dir: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of `out_dir`, renamed to `out_dir` if the body succeeds."""
  out = pathlib.Path(out_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"output directory '{out}' exists and is not an empty directory; pass "
                          "an empty or new directory")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  try:
    yield tmp
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
    if out.exists():
      out.rmdir()
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_id_list(exp: pathlib.Path, name: str, ids: list[int]) -> None:
  (exp / f"{name}.txt").write_text(",".join(str(i) for i in ids) + "\n")
  buf = io.BytesIO()
  scipy.io.savemat(buf, {"id": np.array([ids], np.float64)})
  data = bytearray(buf.getvalue())
  # savemat stamps the creation time into the 116-byte text header; a fixed text keeps the
  # files byte-reproducible.
  data[:116] = b"MATLAB 5.0 MAT-file, written by maumjax.data.synthetic".ljust(116, b" ")
  (exp / f"{name}.mat").write_bytes(bytes(data))


def _subset(rng: np.random.Generator, cams: tuple[int, ...], p: float) -> list[int]:
  """Each camera with probability p; one at random if none was drawn."""
  chosen = [c for c in cams if rng.random() < p]
  return chosen or [int(rng.choice(cams))]


def sysu_plan(num_identities: int, seed: int) -> tuple[dict[str, list[int]], dict[int, list[int]]]:
  """Draws identity numbers, splits and which cameras saw whom.

  Args:
    num_identities: identities listed in the split files (the "available" ones), >= 6.
    seed: random seed.

  Returns:
    `splits`: "train", "val", "test", "available" -> sorted identity numbers (available = the
    union of the three), and `cameras`: identity -> sorted cameras it appears in, including the
    1-2 unavailable identities (RGB cameras only, in no split).

  Raises:
    ValueError: `num_identities` < 6 (3 test ids are needed to have both indoor and
      outdoor-only test identities, plus 1 val and 2 train) or > 8000.
  """
  if not 6 <= num_identities <= 8000:
    raise ValueError(f"num_identities={num_identities} is out of range; use 6..8000 (folder "
                     "numbers have 4 digits)")
  rng = _rng(seed, _PLAN)
  n_extra = int(rng.integers(1, 3))
  total = num_identities + n_extra
  # About 13% of the folder numbers stay unused, as in the real data (491 valid of 533).
  numbers = rng.choice(np.arange(1, max(total + 1, math.ceil(1.15 * total)) + 1), total,
                       replace=False)
  extra, listed = sorted(numbers[:n_extra].tolist()), numbers[n_extra:].tolist()
  n_test = max(3, round(0.2 * num_identities))
  n_val = max(1 if num_identities < 10 else 2, round(0.2 * num_identities))
  splits = {"test": sorted(listed[:n_test]), "val": sorted(listed[n_test:n_test + n_val]),
            "train": sorted(listed[n_test + n_val:]), "available": sorted(listed)}
  # More than half, but not all, test identities are seen indoors (real data: 56 of 96).
  n_indoor = min(n_test - 1, max(n_test // 2 + 1, round(0.58 * n_test)))
  indoor = set(rng.choice(splits["test"], n_indoor, replace=False).tolist())
  cameras = {}
  for pid in splits["train"] + splits["val"]:
    cameras[pid] = _subset(rng, RGB_CAMERAS, 0.7) + _subset(rng, IR_CAMERAS, 0.75)
  for pid in splits["test"]:
    cameras[pid] = (([1, 2] if pid in indoor else []) + _subset(rng, (4, 5), 0.85)
                    + _subset(rng, IR_CAMERAS, 0.85))
  for pid in extra:
    cameras[pid] = _subset(rng, RGB_CAMERAS, 0.5)
  return splits, {pid: sorted(cams) for pid, cams in sorted(cameras.items())}


def write_sysu_mm01(out_dir: str | os.PathLike, *, num_identities: int = 40,
                    images_per_camera: int = 12, height: int = 128, width: int = 64,
                    seed: int = 0, nir: float = 0.0,
                    progress: Callable[[int], None] | None = None) -> pathlib.Path:
  """Writes a synthetic SYSU-MM01 tree (protocol.md §1.3).

  Args:
    out_dir: new or empty directory to create the tree in.
    num_identities: identities in the split files, >= 6; 1-2 RGB-only identities are added.
    images_per_camera: images in every (camera, identity) folder; >= 10 for multi-shot.
    height: base image height; each camera scales it (`SYSU_SIZE_FACTORS`).
    width: base image width.
    seed: random seed (>= 0); the same seed writes byte-identical files.
    nir: weight in [0, 1] of reflected near-infrared light in the infrared cameras' images of
      people (SYSU-MM01's infrared cameras are near-infrared ones); 0, the default, renders
      them thermal only, so no colour information reaches them (`synthetic_render`).
    progress: called with 1 after each image (`sysu_image_count` of them in all).

  Returns:
    The root, `out_dir`.

  Raises:
    ValueError: a size or count is out of range.
    FileExistsError: `out_dir` exists and is not empty.
  """
  _check_sizes(images_per_camera=images_per_camera, height=height, width=width, seed=seed)
  if images_per_camera > 9999:
    raise ValueError(f"images_per_camera={images_per_camera} exceeds 9999 (4-digit file names)")
  splits, cameras = sysu_plan(num_identities, seed)
  cams = sysu_cameras(height, width, seed, nir)
  with _staging(out_dir) as root:
    for pid, pid_cams in cameras.items():
      person = render_lib.sample_person(_rng(seed, _PERSON, pid))
      for cam in pid_cams:
        folder = root / f"cam{cam}" / f"{pid:04d}"
        folder.mkdir(parents=True)
        for frame in range(1, images_per_camera + 1):
          rng = _rng(seed, _IMAGE, cam, pid, frame)
          img = render_lib.render(person, render_lib.sample_pose(rng), cams[cam], rng)
          Image.fromarray(img).save(folder / f"{frame:04d}.jpg", quality=JPEG_QUALITY)
          if progress is not None:
            progress(1)
    exp = root / "exp"
    exp.mkdir()
    for name in ("train", "val", "test", "available"):
      _write_id_list(exp, f"{name}_id", splits[name])
  return pathlib.Path(out_dir)


def sysu_image_count(num_identities: int, images_per_camera: int, seed: int) -> int:
  """How many images `write_sysu_mm01` writes for these parameters."""
  _, cameras = sysu_plan(num_identities, seed)
  return sum(len(cams) for cams in cameras.values()) * images_per_camera


def regdb_cameras(height: int, width: int, seed: int) -> tuple[render_lib.Camera,
                                                                 render_lib.Camera]:
  """The RegDB dual camera: (visible, thermal), sharing one viewpoint."""
  visible = _camera("rgb", height, width, _rng(seed, _CAMERA, 101))
  thermal = _camera("ir", height, width, _rng(seed, _CAMERA, 102))
  thermal = dataclasses.replace(thermal, scale=visible.scale, offset_y=visible.offset_y)
  return visible, thermal


def write_regdb(out_dir: str | os.PathLike, *, num_identities: int = 20,
                images_per_modality: int = 10, height: int = 128, width: int = 64,
                seed: int = 0, num_trials: int = 10,
                progress: Callable[[int], None] | None = None) -> pathlib.Path:
  """Writes a synthetic RegDB tree (protocol.md §2.2).

  The i-th visible and i-th thermal image of an identity share pose, view and frame number, as
  the dual camera's roughly aligned pairs do.

  Args:
    out_dir: new or empty directory to create the tree in.
    num_identities: identities, even (each trial puts half in train, half in test).
    images_per_modality: visible (and thermal) images per identity.
    height: image height.
    width: image width.
    seed: random seed (>= 0); the same seed writes byte-identical files.
    num_trials: split files `idx/*_{1..num_trials}.txt`.
    progress: called with 1 after each image (2 * num_identities * images_per_modality).

  Returns:
    The root, `out_dir`.

  Raises:
    ValueError: `num_identities` is odd or < 2, or another size or count is out of range.
    FileExistsError: `out_dir` exists and is not empty.
  """
  if num_identities < 2 or num_identities % 2:
    raise ValueError(f"num_identities={num_identities} must be even and >= 2: each trial "
                     "splits the identities into two halves")
  _check_sizes(images_per_camera=images_per_modality, height=height, width=width, seed=seed)
  if num_trials < 1 or num_identities * images_per_modality > 45_000:
    raise ValueError(f"num_trials={num_trials} must be >= 1 and num_identities * "
                     f"images_per_modality={num_identities * images_per_modality} <= 45000 "
                     "(frame numbers have 5 digits)")
  visible, thermal = regdb_cameras(height, width, seed)
  plan = _rng(seed, _PLAN)
  frame = int(plan.integers(1, 9_000))
  files: dict[str, dict[int, list[str]]] = {"Visible": {}, "Thermal": {}}
  with _staging(out_dir) as root:
    for pid in range(1, num_identities + 1):
      person = render_lib.sample_person(_rng(seed, _PERSON, pid))
      gender = "male" if plan.random() < 0.5 else "female"
      for modality in files:
        (root / modality / str(pid)).mkdir(parents=True)
        files[modality][pid] = []
      for i in range(images_per_modality):
        pose = render_lib.sample_pose(_rng(seed, _IMAGE, pid, i))
        view = "back" if pose.facing_back else "front"
        for stream, (modality, code, cam) in enumerate(
            (("Visible", "v", visible), ("Thermal", "t", thermal)), start=1):
          # stream >= 1: a trailing 0 would alias the pose stream (SeedSequence zero-pads keys).
          img = render_lib.render(person, pose, cam, _rng(seed, _IMAGE, pid, i, stream))
          name = f"{gender}_{view}_{code}_{frame:05d}_{pid}.bmp"
          pil = Image.fromarray(img[..., 0], "L") if cam is thermal else Image.fromarray(img)
          pil.save(root / modality / str(pid) / name)
          files[modality][pid].append(name)
          if progress is not None:
            progress(1)
        frame += int(plan.integers(1, 3))
    idx = root / "idx"
    idx.mkdir()
    for t in range(1, num_trials + 1):
      perm = _rng(seed, _TRIAL, t).permutation(np.arange(1, num_identities + 1)).tolist()
      halves = {"train": sorted(perm[:num_identities // 2]),
                "test": sorted(perm[num_identities // 2:])}
      for split, pids in halves.items():
        for modality in files:
          lines = [f"{modality}/{pid}/{name} {label}\n" for label, pid in enumerate(pids)
                   for name in sorted(files[modality][pid])]
          (idx / f"{split}_{modality.lower()}_{t}.txt").write_text("".join(lines))
  return pathlib.Path(out_dir)


def _check_sizes(*, images_per_camera: int, height: int, width: int, seed: int) -> None:
  if images_per_camera < 1 or height < 16 or width < 8 or seed < 0:
    raise ValueError(f"images={images_per_camera}, height={height}, width={width}, seed={seed} "
                     "out of range; need images >= 1, height >= 16, width >= 8, seed >= 0")


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m maumjax.data.synthetic",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--layout", required=True, choices=("sysu_mm01", "regdb"))
  parser.add_argument("--out", required=True, type=pathlib.Path, help="new or empty directory")
  parser.add_argument("--num_identities", type=int)
  parser.add_argument("--images_per_camera", type=int, help="sysu_mm01 only")
  parser.add_argument("--images_per_modality", type=int, help="regdb only")
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--nir", type=float, help="sysu_mm01 only: weight in [0, 1] of reflected "
                      "near-infrared light in the infrared images (default 0, thermal only)")
  args = parser.parse_args(argv)
  sysu = args.layout == "sysu_mm01"
  right, wrong = (("images_per_camera", "images_per_modality") if sysu
                  else ("images_per_modality", "images_per_camera"))
  opts = vars(args)
  if opts[wrong] is not None:
    parser.error(f"--{wrong} does not apply to --layout {args.layout}; use --{right}")
  if args.nir is not None and not sysu:
    parser.error("--nir does not apply to --layout regdb (RegDB's infrared camera is thermal)")
  kwargs = dict(height=args.height, width=args.width, seed=args.seed)
  if args.nir is not None:
    kwargs["nir"] = args.nir
  if args.num_identities is not None:
    kwargs["num_identities"] = args.num_identities
  if opts[right] is not None:
    kwargs[right] = opts[right]
  start = time.perf_counter()
  try:
    root = (write_sysu_mm01 if sysu else write_regdb)(args.out, **kwargs)
  except (FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  seconds = time.perf_counter() - start
  if sysu:
    rgb = sum(len(list(root.glob(f"cam{c}/*/*.jpg"))) for c in RGB_CAMERAS)
    ir = sum(len(list(root.glob(f"cam{c}/*/*.jpg"))) for c in IR_CAMERAS)
    listed = (root / "exp" / "available_id.txt").read_text().count(",") + 1
    ids = f"{listed} listed + {len({p.name for p in root.glob('cam*/*')}) - listed} RGB-only"
  else:
    rgb, ir = len(list(root.glob("Visible/*/*.bmp"))), len(list(root.glob("Thermal/*/*.bmp")))
    ids = str(len(list(root.glob("Visible/*"))))
  print(f"wrote {args.layout} to {root}: {ids} identities, {rgb} visible + {ir} infrared "
        f"images in {seconds:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
