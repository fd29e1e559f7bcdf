"""Tests for maumjax.data.synthetic: layouts, image content, the modality gap, determinism, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
import time

import numpy as np
import pytest
import scipy.io
from PIL import Image

from maumjax.data import synthetic
from maumjax.data import synthetic_render as render_lib

_SMALL = dict(num_identities=10, images_per_camera=3, height=32, width=16)
_RGB, _IR = (1, 2, 4, 5), (3, 6)


def _tree_hashes(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _read_ids(root: pathlib.Path, name: str) -> list[int]:
  text = (root / "exp" / f"{name}_id.txt").read_text()
  # The real format: exactly one line of unpadded comma-separated integers.
  assert re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*\n?", text), text
  return [int(x) for x in text.split(",")]


def _folders(root: pathlib.Path) -> dict[int, set[int]]:
  """camera -> identity numbers with a folder in it."""
  return {c: {int(p.name) for p in (root / f"cam{c}").iterdir()} for c in range(1, 7)}


@pytest.fixture(scope="module")
def sysu(tmp_path_factory) -> pathlib.Path:
  return synthetic.write_sysu_mm01(tmp_path_factory.mktemp("s") / "sysu", **_SMALL, seed=3)


@pytest.fixture(scope="module")
def regdb(tmp_path_factory) -> pathlib.Path:
  # 12 identities, so pids 10-12 sort before 2 lexically.
  return synthetic.write_regdb(tmp_path_factory.mktemp("r") / "regdb", num_identities=12,
                               images_per_modality=4, height=32, width=16, num_trials=3, seed=1)


def test_sysu_naming_and_contiguous_frames(sysu):
  assert sorted(p.name for p in sysu.iterdir()) == [f"cam{c}" for c in range(1, 7)] + ["exp"]
  for cam_dir in sysu.glob("cam*"):
    for id_dir in cam_dir.iterdir():
      assert re.fullmatch(r"\d{4}", id_dir.name) and int(id_dir.name) >= 1
      names = sorted(p.name for p in id_dir.iterdir())
      assert names == [f"{i:04d}.jpg" for i in range(1, 4)], (id_dir, names)
  assert sorted(p.name for p in (sysu / "exp").iterdir()) == sorted(
    f"{n}_id.{e}" for n in ("train", "val", "test", "available") for e in ("txt", "mat"))


def test_sysu_splits(sysu):
  split = {n: _read_ids(sysu, n) for n in ("train", "val", "test", "available")}
  train, val, test = set(split["train"]), set(split["val"]), set(split["test"])
  assert not (train & val or train & test or val & test)
  assert sorted(train | val | test) == split["available"]
  assert len(split["available"]) == 10
  assert len(train) >= 2 and len(val) >= 1 and len(test) >= 3 and len(train) > len(test)
  for name, ids in split.items():
    mat = scipy.io.loadmat(sysu / "exp" / f"{name}_id.mat")["id"]
    assert mat.shape == (1, len(ids)) and mat.ravel().tolist() == ids

  folders = _folders(sysu)
  for pid in split["available"]:
    assert any(pid in folders[c] for c in _RGB) and any(pid in folders[c] for c in _IR), pid
  indoor = {pid for pid in test if pid in folders[1] and pid in folders[2]}
  outdoor_only = {pid for pid in test if pid not in folders[1] and pid not in folders[2]}
  assert indoor | outdoor_only == test, "a test id is in only one of cam1/cam2"
  assert len(test) / 2 < len(indoor) < len(test)
  for pid in test:
    assert pid in folders[4] | folders[5] and pid in folders[3] | folders[6], pid

  all_ids = set().union(*folders.values())
  unavailable = all_ids - set(split["available"])
  assert 1 <= len(unavailable) <= 2
  assert not unavailable & (folders[3] | folders[6])
  # Folder numbers have gaps, as in the real data.
  assert max(all_ids) > len(all_ids)


def test_sysu_images(sysu):
  sizes = {}
  for c in range(1, 7):
    for path in sorted((sysu / f"cam{c}").glob("*/*.jpg")):
      img = np.asarray(Image.open(path).convert("RGB"))
      assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
      sizes.setdefault(c, set()).add(img.shape[:2])
      spread = np.abs(img.astype(int) - img.astype(int)[..., :1]).max()
      if c in _IR:
        assert spread <= 3, path
      else:
        assert spread > 30, path
  assert all(len(s) == 1 for s in sizes.values())
  shapes = {next(iter(s)) for s in sizes.values()}
  assert len(shapes) >= 4, "cameras should differ in image size"
  for h, w in shapes:
    assert 0.75 * 32 <= h <= 1.3 * 32 and 0.75 * 16 <= w <= 1.3 * 16


def test_sysu_validation(tmp_path):
  with pytest.raises(ValueError, match="num_identities=5"):
    synthetic.write_sysu_mm01(tmp_path / "x", num_identities=5)
  assert not (tmp_path / "x").exists()


def _person_and_pose(seed: int) -> tuple[render_lib.Person, render_lib.Pose]:
  person = render_lib.sample_person(np.random.default_rng(seed))
  # Plain garments would hide pattern contrast, and every accessory should be on screen.
  person = dataclasses.replace(person, upper_pattern=1, lower_pattern=3, hat=True, backpack=True,
                               bag_side=1)
  return person, render_lib.sample_pose(np.random.default_rng(seed + 100))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thermal_ignores_colour_but_not_material(seed):
  person, pose = _person_and_pose(seed)
  cam = render_lib.Camera("ir", 64, 32, blur=0.8)
  recoloured = dataclasses.replace(
    person, upper_rgb=(0.9, 0.1, 0.1), upper_rgb2=(0.1, 0.9, 0.1), lower_rgb=(0.1, 0.1, 0.9),
    lower_rgb2=(0.5, 0.5, 0.0), shoes_rgb=(1.0, 1.0, 1.0), hat_rgb=(0.0, 0.0, 0.0),
    bag_rgb=(0.2, 0.7, 0.2), backpack_rgb=(0.7, 0.2, 0.7), hair_rgb=(0.9, 0.9, 0.0),
    skin_rgb=(0.3, 0.2, 0.1))
  base = render_lib.render(person, pose, cam, np.random.default_rng(7))
  assert np.array_equal(base, render_lib.render(recoloured, pose, cam, np.random.default_rng(7)))
  emissivity = tuple(1.0 - e for e in person.emissivity)
  for changed in (dataclasses.replace(person, emissivity=emissivity),
                  dataclasses.replace(person, heat=tuple(1.0 - t for t in person.heat)),
                  dataclasses.replace(person, pattern_contrast=(0.0, 0.0))):
    other = render_lib.render(changed, pose, cam, np.random.default_rng(7))
    assert np.abs(other.astype(int) - base.astype(int)).max() > 20
  assert np.array_equal(base[..., 0], base[..., 1]) and np.array_equal(base[..., 0], base[..., 2])


def _ir(person, pose, nir, **camera):
  cam = render_lib.Camera("ir", 64, 32, nir=nir, **camera)
  return render_lib.render(person, pose, cam, np.random.default_rng(7)).astype(np.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_near_infrared_is_a_mix_of_heat_and_visible_lightness(seed):
  """On the body, the nir = w image is (1 - w) x the thermal one + w x the all-reflected one
  (no blur, no noise: the mix is linear before shading and gain); the background does not move;
  at nir = 1 a garment's lightness shows and its hue does not."""
  person, pose = _person_and_pose(seed)
  exact = dict(blur=0.0, noise=0.0, gain=1.1)
  thermal, half, reflected = (_ir(person, pose, w, **exact) for w in (0.0, 0.5, 1.0))
  body = render_lib.layout(person, pose, render_lib.Camera("ir", 64, 32))[0] > 0
  assert np.abs(half - (0.5 * thermal + 0.5 * reflected))[body].max() <= 1.0  # uint8 rounding
  assert np.array_equal(thermal[~body], reflected[~body])
  assert np.abs(reflected - thermal)[body].max() > 20
  # Each part's reflected light is the luma of its visible colour: a grey of the same luma
  # leaves the image as it is (to one level), a lighter garment brightens only its own pixels.
  luma = lambda rgb: float(np.dot(rgb, [0.299, 0.587, 0.114]))
  grey = dataclasses.replace(person, upper_rgb=(luma(person.upper_rgb),) * 3,
                             upper_rgb2=(luma(person.upper_rgb2),) * 3)
  assert np.abs(_ir(grey, pose, 1.0, **exact) - reflected).max() <= 1.0
  lab, pattern, _ = render_lib.layout(person, pose, render_lib.Camera("ir", 64, 32))
  lighter = dataclasses.replace(person, lower_rgb=(1.0, 1.0, 1.0), lower_rgb2=(1.0, 1.0, 1.0))
  moved = np.abs(_ir(lighter, pose, 1.0, **exact) - reflected)[..., 0] > 1.0
  assert moved.sum() > 20 and np.all(lab[moved] == render_lib.LOWER)
  # The pattern's second colour shows where the pattern is on, and only there.
  stripes = dataclasses.replace(person, upper_rgb2=(1.0, 1.0, 1.0))
  moved = np.abs(_ir(stripes, pose, 1.0, **exact) - reflected)[..., 0] > 1.0
  assert moved.sum() > 10 and np.all((lab == render_lib.UPPER)[moved] & pattern[moved])


def test_near_infrared_weight_is_checked():
  person, pose = _person_and_pose(0)
  with pytest.raises(ValueError, match=r"nir=1\.5 must be in \[0, 1\]"):
    _ir(person, pose, 1.5)
  with pytest.raises(ValueError, match="nir=-0.1 must be in"):
    synthetic.write_sysu_mm01(pathlib.Path("/nonexistent/never"), nir=-0.1)


def test_sysu_near_infrared_changes_only_the_infrared_cameras(sysu, tmp_path):
  nir = synthetic.write_sysu_mm01(tmp_path / "nir", **_SMALL, seed=3, nir=0.5)
  a, b = _tree_hashes(sysu), _tree_hashes(nir)
  assert a.keys() == b.keys()
  for name in a:
    cam = re.match(r"cam(\d)/", name)
    same = a[name] == b[name]
    assert same == (cam is None or int(cam.group(1)) in _RGB), name


def test_near_infrared_carries_identity_across_modalities(tmp_path):
  """Grey-pixel distances between an infrared and a visible image are smaller for the same
  person than for different people with nir = 0.7; thermal-only images give no such gap."""
  gaps = {}
  for nir in (0.0, 0.7):
    root = synthetic.write_sysu_mm01(tmp_path / f"s{nir}", num_identities=12,
                                     images_per_camera=3, height=64, width=32, seed=5, nir=nir)
    feats = {}
    for modality, cams in (("rgb", _RGB), ("ir", _IR)):
      x, ids = [], []
      for c in cams:
        for path in sorted((root / f"cam{c}").glob("*/*.jpg")):
          img = Image.open(path).convert("L").resize((8, 16), Image.BILINEAR)
          x.append(np.asarray(img, np.float32).ravel())
          ids.append(int(path.parent.name))
      x = np.stack(x)
      x = x - x.mean(0)  # each modality's mean image (its background, its gain) removed
      feats[modality] = (x / np.linalg.norm(x, axis=1, keepdims=True), np.array(ids))
    (xi, yi), (xv, yv) = feats["ir"], feats["rgb"]
    dist = np.linalg.norm(xi[:, None] - xv[None], axis=-1)
    same = yi[:, None] == yv[None]
    gaps[nir] = dist[~same].mean() - dist[same].mean()
  assert gaps[0.7] > 0.05 and gaps[0.7] > 3 * abs(gaps[0.0]), gaps


def test_visible_depends_on_colour():
  person, pose = _person_and_pose(0)
  cam = render_lib.Camera("rgb", 64, 32, blur=0.0)  # no blur: changes stay on the garment
  base = render_lib.render(person, pose, cam, np.random.default_rng(7))
  recoloured = dataclasses.replace(person, upper_rgb=tuple(1.0 - c for c in person.upper_rgb))
  other = render_lib.render(recoloured, pose, cam, np.random.default_rng(7))
  changed = np.abs(other.astype(int) - base.astype(int)).max(-1) > 20
  assert changed.sum() > 20
  # Only the upper garment's pixels may change.
  lab = render_lib.layout(person, pose, cam)[0]
  assert np.all(lab[changed] == render_lib.UPPER)


def test_identity_signal_within_modality(tmp_path):
  root = synthetic.write_sysu_mm01(tmp_path / "s", num_identities=10, images_per_camera=4,
                                   height=64, width=32, seed=5)
  for cams in (_RGB, _IR):
    feats, ids = [], []
    for c in cams:
      for path in sorted((root / f"cam{c}").glob("*/*.jpg")):
        img = Image.open(path).convert("RGB").resize((8, 16), Image.BILINEAR)
        feats.append(np.asarray(img, np.float32).ravel() / 255.0)
        ids.append(int(path.parent.name))
    x, y = np.stack(feats), np.array(ids)
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    same = (y[:, None] == y[None]) & ~np.eye(len(y), dtype=bool)
    diff = y[:, None] != y[None]
    assert dist[same].mean() < 0.9 * dist[diff].mean(), cams


def test_regdb_layout(regdb):
  assert sorted(p.name for p in regdb.iterdir()) == ["Thermal", "Visible", "idx"]
  gender = {}
  for modality, code, mode in (("Visible", "v", "RGB"), ("Thermal", "t", "L")):
    pids = sorted(p.name for p in (regdb / modality).iterdir())
    assert pids == sorted(str(i) for i in range(1, 13))  # unpadded
    for pid in pids:
      files = sorted((regdb / modality / pid).iterdir())
      assert len(files) == 4
      for f in files:
        m = re.fullmatch(rf"(male|female)_(front|back)_{code}_(\d{{5}})_{pid}\.bmp", f.name)
        assert m, f.name
        assert gender.setdefault(pid, m[1]) == m[1]
        with Image.open(f) as img:
          assert img.mode == mode and img.size == (16, 32)
    # Pairs share view and frame number, so the i-th files of both modalities correspond.
  for pid in gender:
    vis = sorted(p.name.replace("_v_", "_") for p in (regdb / "Visible" / pid).iterdir())
    the = sorted(p.name.replace("_t_", "_") for p in (regdb / "Thermal" / pid).iterdir())
    assert vis == the


def test_regdb_idx(regdb):
  names = sorted(p.name for p in (regdb / "idx").iterdir())
  assert names == sorted(f"{s}_{m}_{t}.txt" for s in ("train", "test")
                         for m in ("visible", "thermal") for t in (1, 2, 3))
  splits = {}
  for t in (1, 2, 3):
    for split in ("train", "test"):
      for modality in ("Visible", "Thermal"):
        text = (regdb / "idx" / f"{split}_{modality.lower()}_{t}.txt").read_text()
        assert text.endswith("\n")
        rows = []
        for line in text.splitlines():
          m = re.fullmatch(rf"{modality}/(\d+)/(\S+\.bmp) (\d+)", line)
          assert m, line
          assert (regdb / line.split(" ")[0]).is_file()
          rows.append((int(m[3]), m[2], int(m[1])))
        assert len(rows) == 6 * 4
        assert rows == sorted(rows)  # by label, then file name
        label_of = {pid: label for label, _, pid in rows}
        assert sorted(label_of.values()) == list(range(6))
        # Labels follow numeric (not lexical) pid order.
        assert [label_of[p] for p in sorted(label_of)] == list(range(6))
        splits.setdefault(t, {}).setdefault(split, []).append(set(label_of))
  for t, s in splits.items():
    train, test = s["train"], s["test"]
    assert train[0] == train[1] and test[0] == test[1]
    assert not train[0] & test[0] and train[0] | test[0] == set(range(1, 13))
  assert len({frozenset(s["train"][0]) for s in splits.values()}) > 1, "trials should differ"


def test_regdb_rejects_odd(tmp_path):
  with pytest.raises(ValueError, match="num_identities=7"):
    synthetic.write_regdb(tmp_path / "r", num_identities=7)


def test_determinism(tmp_path):
  kw = dict(num_identities=6, images_per_camera=2, height=32, width=16)
  a = _tree_hashes(synthetic.write_sysu_mm01(tmp_path / "a", **kw, seed=4))
  time.sleep(1.1)  # a file stamped with the time of day (as savemat does) would now differ
  b = _tree_hashes(synthetic.write_sysu_mm01(tmp_path / "b", **kw, seed=4))
  c = _tree_hashes(synthetic.write_sysu_mm01(tmp_path / "c", **kw, seed=5))
  assert a == b and a != c
  rkw = dict(num_identities=4, images_per_modality=2, height=32, width=16, num_trials=2)
  a = _tree_hashes(synthetic.write_regdb(tmp_path / "ra", **rkw, seed=4))
  b = _tree_hashes(synthetic.write_regdb(tmp_path / "rb", **rkw, seed=4))
  c = _tree_hashes(synthetic.write_regdb(tmp_path / "rc", **rkw, seed=5))
  assert a == b and a != c


def test_cli(tmp_path, capsys):
  out = tmp_path / "cli"
  argv = ["--layout", "regdb", "--out", str(out), "--num_identities", "4",
          "--images_per_modality", "2", "--height", "32", "--width", "16"]
  assert synthetic.main(argv) == 0
  assert "4 identities" in capsys.readouterr().out
  assert len(list(out.glob("Thermal/*/*.bmp"))) == 8
  assert synthetic.main(argv) != 0
  err = capsys.readouterr().err
  assert str(out) in err and "empty" in err
  sysu_out = tmp_path / "cli_sysu"
  assert synthetic.main(["--layout", "sysu_mm01", "--out", str(sysu_out), "--num_identities",
                         "6", "--images_per_camera", "1", "--height", "32", "--width", "16"]) == 0
  assert len(_read_ids(sysu_out, "available")) == 6
  with pytest.raises(SystemExit):
    synthetic.main(["--layout", "sysu_mm01", "--out", str(tmp_path / "x"),
                    "--images_per_modality", "3"])


def test_failure_leaves_nothing(tmp_path, monkeypatch):
  calls = []

  def failing_render(*args, **kwargs):
    calls.append(1)
    if len(calls) > 5:
      raise RuntimeError("disk full")
    return np.zeros((32, 16, 3), np.uint8)

  monkeypatch.setattr(render_lib, "render", failing_render)
  with pytest.raises(RuntimeError, match="disk full"):
    synthetic.write_sysu_mm01(tmp_path / "out", **_SMALL)
  assert list(tmp_path.iterdir()) == []


def test_progress_counts_every_image(tmp_path):
  kw = dict(num_identities=6, images_per_camera=2, height=32, width=16, seed=2)
  counts = []
  root = synthetic.write_sysu_mm01(tmp_path / "s", **kw, progress=counts.append)
  assert len(counts) == synthetic.sysu_image_count(6, 2, 2) == len(list(root.glob("cam*/*/*.jpg")))
  counts.clear()
  root = synthetic.write_regdb(tmp_path / "r", num_identities=4, images_per_modality=2, height=32,
                               width=16, num_trials=1, progress=counts.append)
  assert len(counts) == 2 * 4 * 2 == len(list(root.glob("*/*/*.bmp")))
