"""The protocol runner against an independent recomputation on synthetic datasets."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from maumjax.data import augment
from maumjax.data import prepare as prepare_lib
from maumjax.eval import gallery as gallery_lib
from maumjax.eval import plots
from maumjax.eval import runner
from tests.eval.test_metrics import _brute

H, W, D = 16, 8, 12
_PROJ = np.random.default_rng(0).standard_normal((H * W * 3, D)).astype(np.float32)
# Added to infrared images' features, so a runner that passes the wrong modality fails.
_SHIFT = np.random.default_rng(1).standard_normal(D).astype(np.float32) * 20


@jax.jit
def _extract(x, modality):
  return x.reshape(x.shape[0], -1) @ _PROJ + modality[:, None].astype(jnp.float32) * _SHIFT


def _numpy_features(images_u8, modality: int):
  """The same extractor in NumPy, from the stored uint8 images of one modality."""
  mean = np.asarray(augment.IMAGENET_MEAN, np.float32)
  std = np.asarray(augment.IMAGENET_STD, np.float32)
  x = (images_u8.astype(np.float32) / 255.0 - mean) / std
  return x.reshape(len(x), -1) @ _PROJ + modality * _SHIFT


def _decoded(builder, split):
  src = tfds.data_source(f"{builder.name}/{builder.builder_config.name}", split=split,
                         data_dir=str(builder.data_dir).split(f"/{builder.name}/")[0])
  rows = [src[i] for i in range(len(src))]
  paths = [r["path"].decode() for r in rows]
  return (np.stack([r["image"] for r in rows]), np.array([r["identity"] for r in rows]),
          np.array([r["camera"] for r in rows]), paths)


@pytest.fixture(scope="module")
def sysu(tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  spec = prepare_lib.SyntheticSpec(num_identities=10, images_per_camera=11, height=32, width=16,
                                   seed=5)
  manual = prepare_lib.write_synthetic("sysu_mm01", spec, cache / "synthetic")
  from maumjax.data import build
  builder = build.build("sysu_mm01", manual_dir=manual, data_dir=cache / "tfds",
                        config=build.make_config("sysu_mm01", height=H, width=W))
  return manual, builder


def _capture_sheets(monkeypatch) -> list[dict]:
  """Records the arguments of every ranked-list sheet the runner draws (and still draws it)."""
  calls = []
  draw = plots.ranked_list_sheet

  def spy(*args, **kwargs):
    calls.append(dict(kwargs, args=args))
    return draw(*args, **kwargs)

  monkeypatch.setattr(plots, "ranked_list_sheet", spy)
  return calls


def _check_sheet_distances(sheet, qf, q_ids, gf, g_ids):
  """Each gallery label's d is 1 - cos to its query (features normalised), in [0, 2]."""
  for q_label, row in zip(sheet["query_labels"], sheet["gallery_labels"]):
    query = int(q_label.split()[1])
    for label in row:
      gallery, d = int(label.split()[1]), float(label.split("d=")[1])
      assert 0 <= d <= 2, label
      # Identities are not unique; some image of each identity must be at that distance.
      cos = qf[q_ids == query] @ gf[g_ids == gallery].T
      assert np.abs(1 - cos - d).min() < 6e-4, (q_label, label)


def test_run_sysu_equals_independent_recomputation(sysu, tmp_path, monkeypatch):
  manual, builder = sysu
  sheets = _capture_sheets(monkeypatch)
  report = runner.run_sysu(_extract, builder, root=manual, trials=(3, 0), batch_size=16,
                           out_dir=tmp_path, num_ranked=3)
  q_img, q_ids, q_cams, _ = _decoded(builder, "query")
  g_img, g_ids, g_cams, g_paths = _decoded(builder, "gallery")
  qf, gf = _numpy_features(q_img, 1), _numpy_features(g_img, 0)
  qf /= np.linalg.norm(qf, axis=1, keepdims=True)
  gf /= np.linalg.norm(gf, axis=1, keepdims=True)
  where = {p: i for i, p in enumerate(g_paths)}
  by_setting = {r.setting: r for r in report.results}
  assert set(by_setting) == {"all/single", "all/multi", "indoor/single", "indoor/multi"}
  for mode in ("all", "indoor"):
    for shot, name in ((1, "single"), (10, "multi")):
      res = by_setting[f"{mode}/{name}"]
      for t, trial in enumerate((3, 0)):
        idx = [where[p] for p in gallery_lib.sysu_gallery(manual, mode=mode, shot=shot,
                                                          trial=trial)]
        cmc, m_ap, m_inp, n = _brute(-(qf @ gf[idx].T), q_ids, g_ids[idx], q_cams, g_cams[idx],
                                     dedup=True)
        got = res.trials[t]
        np.testing.assert_allclose(got.cmc, cmc, atol=1e-5)
        np.testing.assert_allclose([got.mAP, got.mINP], [m_ap, m_inp], atol=1e-5)
        assert got.num_valid == n
      assert res.mean("mAP") == pytest.approx(np.mean([m.mAP for m in res.trials]))
  # Outputs: JSON with the protocol record, the CMC plot and the ranked-list sheet.
  record = json.loads((tmp_path / "eval_sysu_mm01.json").read_text())
  assert record["sampler"] == "agw" and record["trials"] == [3, 0] and not record["flip_tta"]
  assert len(record["settings"]) == 4 and "mean" in record["settings"][0]
  # The record holds fractions, and says so.
  assert record["units"] == "fraction" == report.record["units"]
  first = record["settings"][0]
  assert first["mean"]["r1"] == pytest.approx(by_setting[first["setting"]].mean("r1"))
  assert all(0 <= v <= 1 for s in record["settings"] for v in s["mean"].values())
  # The sheet: the first setting's first trial, titled, labelled with d = 1 - cos.
  (sheet,) = sheets
  assert sheet["title"].startswith("SYSU-MM01 all-search single-shot, trial 3 (agw gallery")
  assert "cosine distance d = 1 - cos" in sheet["title"]
  _check_sheet_distances(sheet, qf, q_ids, gf, g_ids)
  assert Image.open(tmp_path / "cmc_sysu_mm01.png").size[0] > 100
  sheet = Image.open(tmp_path / "ranked_sysu_mm01.png")
  assert sheet.size[1] > sheet.size[0] / 10  # three rows of tiles
  for setting in by_setting:
    assert setting in report.table


def test_flip_tta_is_recorded_and_flip_invariant_features_agree(sysu):
  manual, builder = sysu

  @jax.jit
  def colour_means(x, modality):  # invariant to horizontal flips
    del modality
    return x.mean(axis=(1, 2))

  plain = runner.run_sysu(colour_means, builder, root=manual, modes=("all",), shots=(1,),
                          trials=(1,), batch_size=32)
  flipped = runner.run_sysu(colour_means, builder, root=manual, modes=("all",), shots=(1,),
                            trials=(1,), batch_size=32, flip=True)
  assert flipped.record["flip_tta"] and not plain.record["flip_tta"]
  np.testing.assert_allclose(flipped.results[0].trials[0].mAP, plain.results[0].trials[0].mAP,
                             atol=1e-6)


def test_run_regdb_both_directions(tmp_path, monkeypatch):
  sheets = _capture_sheets(monkeypatch)
  spec = prepare_lib.SyntheticSpec(num_identities=8, images_per_modality=3, height=32, width=16,
                                   seed=2)
  manual = prepare_lib.write_synthetic("regdb", spec, tmp_path / "synthetic")
  from maumjax.data import build
  builder = build.build("regdb", manual_dir=manual, data_dir=tmp_path / "tfds",
                        config=build.make_config("regdb", "trial_2", height=H, width=W))
  report = runner.run_regdb(_extract, builder, out_dir=tmp_path / "out", num_ranked=2)
  # MPANet's variant: squared Euclidean of the unnormalised features, deduplicated CMC.
  code = runner.run_regdb(_extract, builder, distance="euclidean", cmc="dedup")
  v_img, v_ids, _, _ = _decoded(builder, "test_visible")
  t_img, t_ids, _, _ = _decoded(builder, "test_thermal")
  vf, tf = _numpy_features(v_img, 0), _numpy_features(t_img, 1)
  res = {r.setting: r.trials[0] for r in report.results}
  res_code = {r.setting: r.trials[0] for r in code.results}
  differ = False
  for name, (qf, qi, gf, gi) in {"visible->thermal": (vf, v_ids, tf, t_ids),
                                 "thermal->visible": (tf, t_ids, vf, v_ids)}.items():
    sq = ((qf[:, None, :].astype(np.float64) - gf[None]) ** 2).sum(-1)
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    for got, (cmc, m_ap, m_inp, n) in ((res[name], _brute(-(qn @ gn.T), qi, gi, dedup=False)),
                                       (res_code[name], _brute(sq, qi, gi, dedup=True))):
      np.testing.assert_allclose(got.cmc, cmc, atol=1e-5)
      np.testing.assert_allclose([got.mAP, got.mINP], [m_ap, m_inp], atol=1e-5)
    differ |= abs(res[name].mAP - res_code[name].mAP) > 1e-4
  assert differ, "the two distances ranked alike: the test features cannot tell them apart"
  assert report.record["trial"] == 2 and report.record["units"] == "fraction"
  assert (report.record["distance"], report.record["cmc"]) == ("cosine", "plain")
  assert (code.record["distance"], code.record["cmc"]) == ("euclidean", "identity-deduplicated")
  assert json.loads((tmp_path / "out" / "eval_regdb.json").read_text())["units"] == "fraction"
  assert (tmp_path / "out" / "ranked_regdb.png").is_file()
  (sheet,) = sheets
  assert sheet["title"].startswith("RegDB visible->thermal, trial 2:")
  vf /= np.linalg.norm(vf, axis=1, keepdims=True)
  tf /= np.linalg.norm(tf, axis=1, keepdims=True)
  _check_sheet_distances(sheet, vf, v_ids, tf, t_ids)
  with pytest.raises(ValueError, match="cmc 'dedupe'"):
    runner.run_regdb(_extract, builder, cmc="dedupe")


def test_sheet_title_names_dataset_setting_and_trial():
  assert runner.sheet_title("SYSU-MM01", "indoor/multi", 4, "official gallery sampler") == (
      "SYSU-MM01 indoor-search multi-shot, trial 4 (official gallery sampler): ranked by cosine "
      "distance d = 1 - cos")
  assert runner.sheet_title("RegDB", "visible->thermal", None).startswith(
      "RegDB visible->thermal: ")
  assert runner.sheet_title("RegDB", "visible->thermal", 1, distance="euclidean").endswith(
      "ranked by squared Euclidean distance d = |q - g|^2 (unnormalised features)")
