"""Tests of the CMC plot, the ranked-list sheet and the ranking helper behind it."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from PIL import Image

from maumjax.eval import plots

GREY = 128


def _grey(h: int, w: int) -> np.ndarray:
  return np.full((h, w, 3), GREY, np.uint8)


# ---------------------------------------------------------------------------------------------
# plot_cmc


def test_plot_cmc_writes_png_and_draws_percent(tmp_path):
  cmc = np.linspace(0.475, 1.0, 30)
  path = plots.plot_cmc({"all / single-shot": cmc}, tmp_path / "a" / "b" / "cmc.png")
  assert path == tmp_path / "a" / "b" / "cmc.png"
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size == (640, 480)
    pixels = np.asarray(image.convert("RGB"))
  # Not blank: axes, line and text put plenty of non-white pixels on the canvas.
  assert (pixels.min(axis=-1) < 200).mean() > 0.01

  fig = plots._cmc_figure({"all / single-shot": cmc}, title="CMC", max_rank=20)
  ax = fig.axes[0]
  (line,) = ax.get_lines()
  np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 21))
  np.testing.assert_allclose(line.get_ydata(), 100 * cmc[:20])
  assert ax.get_ylim() == (0, 100)
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["all / single-shot (R1 47.5%)"]


def test_plot_cmc_short_curve_and_per_trial_band(tmp_path):
  trials = np.array([[0.4, 0.6, 0.8], [0.6, 0.8, 1.0]])  # mean 50/70/90 %, std 10 %
  curves = {"indoor / multi-shot": trials, "short": np.array([0.2, 0.3])}
  fig = plots._cmc_figure(curves, title="t", max_rank=20)
  ax = fig.axes[0]
  mean_line, short_line = ax.get_lines()
  np.testing.assert_allclose(mean_line.get_ydata(), [50, 70, 90])
  np.testing.assert_array_equal(short_line.get_xdata(), [1, 2])
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels == ["indoor / multi-shot (R1 50.0 ± 10.0%)", "short (R1 20.0%)"]
  # One band, only for the per-trial curve, spanning mean -+ std clipped to [0, 100].
  (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
  vertices = band.get_paths()[0].vertices
  np.testing.assert_allclose(vertices[:, 1].min(), 40)
  np.testing.assert_allclose(vertices[:, 1].max(), 100)

  single = plots.plot_cmc({"k": trials.mean(axis=0)}, tmp_path / "single.png", max_rank=3)
  banded = plots.plot_cmc({"k": trials}, tmp_path / "banded.png", max_rank=3)
  ink = [(np.asarray(Image.open(p).convert("RGB")) < 250).any(axis=-1).sum()
         for p in (single, banded)]
  assert ink[1] > ink[0] + 1000  # the shaded band covers a visible area


@pytest.mark.parametrize("value, match", [
    (np.array([0.5, 47.5]), "'bad key'.*outside \\[0, 1\\]"),
    (np.array([-0.1, 0.5]), "'bad key'.*outside"),
    (np.array([0.5, np.nan]), "'bad key'.*outside"),
    (np.zeros((2, 2, 2)), "'bad key'.*shape"),
    (np.zeros((0,)), "'bad key'.*shape"),
])
def test_plot_cmc_rejects_bad_curves_naming_the_key(tmp_path, value, match):
  with pytest.raises(ValueError, match=match):
    plots.plot_cmc({"ok": np.array([0.5, 1.0]), "bad key": value}, tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()


def test_plot_cmc_rejects_empty_mapping_and_bad_max_rank(tmp_path):
  with pytest.raises(ValueError, match="no curves"):
    plots.plot_cmc({}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="max_rank"):
    plots.plot_cmc({"a": np.ones(3)}, tmp_path / "x.png", max_rank=0)


# ---------------------------------------------------------------------------------------------
# ranked_list_sheet


def _box(row: int, col: int, *, tile_hw, border, label_h) -> tuple[int, int]:
  """Top-left corner of a bordered tile, from the layout constants (not from SheetLayout)."""
  box_w = tile_hw[1] + 2 * border
  cell_h = tile_hw[0] + 2 * border + label_h
  x0 = plots.SHEET_MARGIN
  if col > 0:
    x0 += box_w + plots.QUERY_GAP + (col - 1) * (box_w + plots.TILE_GAP)
  return x0, plots.SHEET_MARGIN + row * (cell_h + plots.ROW_GAP)


def test_ranked_list_sheet_borders_follow_correct_mask(tmp_path):
  tile_hw, border = (20, 10), 3
  correct = np.array([[True, False, True, False], [False, False, True, True]])
  # Images of different sizes and a grey [H, W] one: all become grey tiles of tile_hw.
  queries = [_grey(64, 32), np.full((50, 20), GREY, np.uint8)]
  gallery = [[_grey(30 + 5 * j, 15) for j in range(5)] for _ in range(2)]
  path = plots.ranked_list_sheet(queries, gallery, correct, tmp_path / "s" / "sheet.png",
                                 top_k=10, tile_hw=tile_hw, border=border, legend=False)
  sheet = np.asarray(Image.open(path).convert("RGB")).astype(int)

  n, k = correct.shape
  box_w, box_h = tile_hw[1] + 2 * border, tile_hw[0] + 2 * border
  width = 2 * plots.SHEET_MARGIN + box_w + plots.QUERY_GAP + k * box_w + (k - 1) * plots.TILE_GAP
  height = 2 * plots.SHEET_MARGIN + n * box_h + (n - 1) * plots.ROW_GAP
  assert sheet.shape == (height, width, 3)
  layout = plots.sheet_layout(n, k, tile_hw=tile_hw, border=border)
  assert (layout.width, layout.height) == (width, height)

  for i in range(n):
    for col in range(k + 1):
      x0, y0 = _box(i, col, tile_hw=tile_hw, border=border, label_h=0)
      assert layout.box(i, col) == (x0, y0, x0 + box_w, y0 + box_h)
      ring = [sheet[y0 + 1, x0 + 1], sheet[y0 + box_h - 2, x0 + box_w - 2],
              sheet[y0 + box_h // 2, x0 + 1], sheet[y0 + 1, x0 + box_w // 2]]
      if col == 0:
        expected = plots.QUERY_RGB
      else:
        expected = plots.CORRECT_RGB if correct[i, col - 1] else plots.WRONG_RGB
      for pixel in ring:
        np.testing.assert_array_equal(pixel, expected, err_msg=f"row {i} col {col}")
      if col > 0 and correct[i, col - 1]:
        assert ring[0][1] > 150 and ring[0][0] < 50 and ring[0][2] < 50  # green dominates
      elif col > 0:
        assert ring[0][0] > 150 and ring[0][1] < 50  # red dominates
      inner = sheet[y0 + border:y0 + box_h - border, x0 + border:x0 + box_w - border]
      assert inner.shape == (*tile_hw, 3) and (inner == GREY).all()
  # The query gap and the margin stay background.
  x_gap = plots.SHEET_MARGIN + box_w + plots.QUERY_GAP // 2
  assert (sheet[:, x_gap] == 255).all() and (sheet[:, 0] == 255).all()


def test_ranked_list_sheet_labels_and_top_k(tmp_path):
  tile_hw, border = (16, 8), 2
  correct = np.array([[True, False, True]])
  gallery_labels = [["id 3 cam2\nd=0.12", "id 7 cam1 a very long label\nd=0.20", "id 3\nd=0.3"]]
  path = plots.ranked_list_sheet([_grey(32, 16)], [[_grey(32, 16)] * 3], correct,
                                 tmp_path / "sheet.png", query_labels=["id 3 cam3"],
                                 gallery_labels=gallery_labels, top_k=2, tile_hw=tile_hw,
                                 border=border, legend=False)
  sheet = np.asarray(Image.open(path).convert("RGB"))
  label_h = 2 * plots.LABEL_LINE_H + 2 * plots.LABEL_PAD  # two lines in the longest label
  box_w, box_h = tile_hw[1] + 2 * border, tile_hw[0] + 2 * border
  k = 2  # top_k cuts the third rank
  width = 2 * plots.SHEET_MARGIN + box_w + plots.QUERY_GAP + k * box_w + (k - 1) * plots.TILE_GAP
  assert sheet.shape == (2 * plots.SHEET_MARGIN + box_h + label_h, width, 3)

  strip_y = slice(plots.SHEET_MARGIN + box_h, plots.SHEET_MARGIN + box_h + label_h)
  for col in range(k + 1):
    x0, _ = _box(0, col, tile_hw=tile_hw, border=border, label_h=label_h)
    text = sheet[strip_y, x0:x0 + box_w]
    assert (text < 100).all(axis=-1).sum() > 5, f"no label text under column {col}"
  # The long label is cut at its tile: the gap to the next tile stays background.
  x1 = _box(0, 1, tile_hw=tile_hw, border=border, label_h=label_h)[0] + box_w
  assert (sheet[strip_y, x1:x1 + plots.TILE_GAP] == 255).all()


def _colour_mask(pixels: np.ndarray, rgb) -> np.ndarray:
  return (pixels == np.asarray(rgb)).all(axis=-1)


def test_ranked_list_sheet_title_and_legend(tmp_path):
  """The header: a title line with text, a legend line with a swatch of each border colour."""
  tile_hw, border = (20, 10), 3
  correct = np.array([[True, False], [False, True]])
  queries = [_grey(40, 20)] * 2
  gallery = [[_grey(40, 20)] * 2] * 2
  path = plots.ranked_list_sheet(queries, gallery, correct, tmp_path / "sheet.png",
                                 tile_hw=tile_hw, border=border,
                                 title="SYSU-MM01 all-search single-shot, trial 0")
  sheet = np.asarray(Image.open(path).convert("RGB")).astype(int)
  header_h = 2 * plots.HEADER_LINE_H + plots.ROW_GAP
  box_w, box_h = tile_hw[1] + 2 * border, tile_hw[0] + 2 * border
  grid_w = box_w + plots.QUERY_GAP + 2 * box_w + plots.TILE_GAP
  assert sheet.shape[0] == 2 * plots.SHEET_MARGIN + header_h + 2 * box_h + plots.ROW_GAP
  # The legend is wider than two small tiles: the sheet widens so that no text is cut.
  assert sheet.shape[1] > 2 * plots.SHEET_MARGIN + grid_w
  assert (sheet[:, -plots.SHEET_MARGIN:] == 255).all()

  top = plots.SHEET_MARGIN
  title = sheet[top:top + plots.HEADER_LINE_H]
  legend = sheet[top + plots.HEADER_LINE_H:top + 2 * plots.HEADER_LINE_H]
  assert (title.max(axis=-1) < 100).sum() > 100, "the title line is blank"
  assert (legend.max(axis=-1) < 100).sum() > 100, "the legend has no text"
  # One solid swatch per colour, left to right: query, same identity, different identity.
  lefts = []
  for rgb in (plots.QUERY_RGB, plots.CORRECT_RGB, plots.WRONG_RGB):
    mask = _colour_mask(legend, rgb)
    assert mask.sum() == plots.SWATCH ** 2, f"swatch of {rgb}"
    assert not _colour_mask(title, rgb).any()
    lefts.append(np.nonzero(mask.any(axis=0))[0][0])
  assert lefts == sorted(lefts)
  assert [text for text, _ in plots.LEGEND] == ["query", "same identity as the query",
                                                "different identity"]
  # The tiles start under the header, with their borders where the layout says.
  layout = plots.sheet_layout(2, 2, tile_hw=tile_hw, border=border, header_lines=2)
  for i in range(2):
    for col in range(3):
      x0, y0, _, _ = layout.box(i, col)
      assert y0 >= plots.SHEET_MARGIN + header_h
      expected = plots.QUERY_RGB if col == 0 else (
          plots.CORRECT_RGB if correct[i, col - 1] else plots.WRONG_RGB)
      np.testing.assert_array_equal(sheet[y0 + 1, x0 + 1], expected, err_msg=f"{i} {col}")
  # Between the header and the first row of tiles: background.
  gap = sheet[top + 2 * plots.HEADER_LINE_H:layout.box(0, 0)[1]]
  assert gap.size and (gap == 255).all()

  # Without a title the legend is the only header line.
  plain = plots.ranked_list_sheet(queries, gallery, correct, tmp_path / "plain.png",
                                  tile_hw=tile_hw, border=border)
  plain_px = np.asarray(Image.open(plain).convert("RGB")).astype(int)
  assert plain_px.shape[0] == sheet.shape[0] - plots.HEADER_LINE_H
  first = plain_px[top:top + plots.HEADER_LINE_H]
  assert _colour_mask(first, plots.CORRECT_RGB).sum() == plots.SWATCH ** 2


def test_ranked_list_labels_print_one_minus_cosine():
  """d under a gallery tile is the cosine distance 1 - cos in [0, 2], whatever the norms."""
  q = np.array([[2.0, 0.0], [0.0, 0.5]])
  g = np.array([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8], [1.0, 1.0]])
  order = np.array([[0, 3, 4, 1, 2], [1, 4, 3, 0, 2]])
  q_labels, g_labels = plots.ranked_list_labels(q, [7, 8], [3, 6], g, [7, 8, 9, 7, 8],
                                                [1, 2, 4, 5, 1], order)
  assert q_labels == ["id 7 cam3", "id 8 cam6"]
  assert g_labels[0] == ["id 7 cam1\nd=0.000", "id 7 cam5\nd=0.400", "id 8 cam1\nd=0.293",
                         "id 8 cam2\nd=1.000", "id 9 cam4\nd=2.000"]
  assert g_labels[1] == ["id 8 cam2\nd=0.000", "id 8 cam1\nd=0.293", "id 7 cam5\nd=0.200",
                         "id 7 cam1\nd=1.000", "id 9 cam4\nd=1.000"]
  # Squared Euclidean of the features as they are: |[2,0]-[3,0]|^2 = 1,
  # |[2,0]-[0.6,0.8]|^2 = 1.96 + 0.64, |[2,0]-[1,1]|^2 = 2, |[2,0]-[0,1]|^2 = 5, to [-1,0]: 9.
  _, g_euclid = plots.ranked_list_labels(q, [7, 8], [3, 6], g, [7, 8, 9, 7, 8],
                                         [1, 2, 4, 5, 1], order, distance="euclidean")
  assert [label.split("d=")[1] for label in g_euclid[0]] == ["1.000", "2.600", "2.000",
                                                              "5.000", "9.000"]
  # Random features: every printed d is 1 - cos to three decimals, never negative.
  rng = np.random.default_rng(0)
  q, g = rng.standard_normal((4, 16)), rng.standard_normal((30, 16)) * 5
  order = np.stack([rng.permutation(30)[:10] for _ in range(4)])
  _, g_labels = plots.ranked_list_labels(q, np.zeros(4, int), np.zeros(4, int), g,
                                         np.zeros(30, int), np.zeros(30, int), order)
  cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
      g / np.linalg.norm(g, axis=1, keepdims=True)).T
  for i in range(4):
    printed = [float(label.split("d=")[1]) for label in g_labels[i]]
    np.testing.assert_allclose(printed, 1 - cos[i, order[i]], atol=5e-4)
    assert min(printed) >= 0 and max(printed) <= 2


def test_ranked_list_labels_reject_mismatches():
  q, g, order = np.ones((2, 3)), np.ones((4, 3)), np.zeros((2, 2), int)
  ids2, ids4 = np.zeros(2, int), np.zeros(4, int)
  with pytest.raises(ValueError, match="disagree"):
    plots.ranked_list_labels(q, ids2, ids2, np.ones((4, 2)), ids4, ids4, order)
  with pytest.raises(ValueError, match="disagree"):
    plots.ranked_list_labels(q, ids2[:1], ids2, g, ids4, ids4, order)
  with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
    plots.ranked_list_labels(q, ids2, ids2, g, ids4, ids4, order + 4)


def test_ranked_list_sheet_rejects_mismatches(tmp_path):
  out = tmp_path / "x.png"
  q = [_grey(8, 4)] * 2
  g = [[_grey(8, 4)] * 3] * 2
  ok = np.ones((2, 3), bool)
  with pytest.raises(ValueError, match=r"N = 2 queries.*\(3, 3\)"):
    plots.ranked_list_sheet(q, g, np.ones((3, 3), bool), out)
  with pytest.raises(ValueError, match="bool"):
    plots.ranked_list_sheet(q, g, ok.astype(int), out)
  with pytest.raises(ValueError, match=r"gallery_images\[1\] has 2 entries.*k = 3"):
    plots.ranked_list_sheet(q, [g[0], g[1][:2]], ok, out)
  with pytest.raises(ValueError, match="gallery_images has 1 rows for 2 queries"):
    plots.ranked_list_sheet(q, g[:1], ok, out)
  with pytest.raises(ValueError, match="query_labels has 1 entries"):
    plots.ranked_list_sheet(q, g, ok, out, query_labels=["a"])
  with pytest.raises(ValueError, match=r"gallery_labels\[0\] has 1 entries"):
    plots.ranked_list_sheet(q, g, ok, out, gallery_labels=[["a"], ["a", "b", "c"]])
  bad = [[_grey(8, 4), _grey(8, 4).astype(np.float32), _grey(8, 4)]] * 2
  with pytest.raises(ValueError, match=r"gallery_images\[0\]\[1\] must be uint8"):
    plots.ranked_list_sheet(q, bad, ok, out)
  with pytest.raises(ValueError, match="top_k"):
    plots.ranked_list_sheet(q, g, ok, out, top_k=0)
  # Only k = top_k ranks are checked, so shorter gallery lists are fine then.
  plots.ranked_list_sheet(q, [g[0], g[1][:2]], ok, out, top_k=2)
  assert out.exists()


# ---------------------------------------------------------------------------------------------
# ranked_list_from_distances

# Gallery ids [1, 2, 1, 2]. Query 0 (id 1): distances sort to g1 .1, g3 .2, g0 .3, g2 .3 (the
# tie keeps g0 before g2). Query 1 (id 2): g3 .1, g1 .4, g2 .4 (tie: g1 first), g0 .5.
_DIST = np.array([[0.3, 0.1, 0.3, 0.2],
                  [0.5, 0.4, 0.4, 0.1]])
_QIDS = np.array([1, 2])
_GIDS = np.array([1, 2, 1, 2])


def test_ranked_list_from_distances_hand_example():
  order, correct = plots.ranked_list_from_distances(_DIST, _QIDS, _GIDS, query_indices=[0, 1],
                                                    top_k=10)
  np.testing.assert_array_equal(order, [[1, 3, 0, 2], [3, 1, 2, 0]])
  np.testing.assert_array_equal(correct, [[False, False, True, True], [True, True, False, False]])
  order, correct = plots.ranked_list_from_distances(_DIST, _QIDS, _GIDS, query_indices=[1],
                                                    top_k=2)
  np.testing.assert_array_equal(order, [[3, 1]])
  np.testing.assert_array_equal(correct, [[True, True]])


def test_ranked_list_from_distances_exclude_mask():
  # Query 0 drops g1, query 1 drops g3 (e.g. same-identity items from a forbidden camera).
  exclude = np.array([[False, True, False, False], [False, False, False, True]])
  order, correct = plots.ranked_list_from_distances(_DIST, _QIDS, _GIDS, query_indices=[1, 0],
                                                    top_k=3, exclude=exclude)
  np.testing.assert_array_equal(order, [[1, 2, 0], [3, 0, 2]])
  np.testing.assert_array_equal(correct, [[True, False, False], [False, True, True]])
  # Query 1 has two items left once g0 is dropped too, so k shrinks to 2 for both rows.
  exclude[1, 0] = True
  order, _ = plots.ranked_list_from_distances(_DIST, _QIDS, _GIDS, query_indices=[0, 1],
                                              top_k=3, exclude=exclude)
  np.testing.assert_array_equal(order, [[3, 0], [1, 2]])


def test_ranked_list_from_distances_matches_loop_reference():
  rng = np.random.default_rng(0)
  dist = rng.integers(0, 4, (6, 15)).astype(np.float32)  # many ties
  qids, gids = rng.integers(0, 3, 6), rng.integers(0, 3, 15)
  exclude = rng.random((6, 15)) < 0.3
  rows = [5, 0, 3]
  order, correct = plots.ranked_list_from_distances(dist, qids, gids, query_indices=rows,
                                                    top_k=5, exclude=exclude)
  for r, q in enumerate(rows):
    kept = [g for g in range(15) if not exclude[q, g]]
    expected = sorted(kept, key=lambda g: (dist[q, g], g))[:5]
    np.testing.assert_array_equal(order[r], expected)
    np.testing.assert_array_equal(correct[r], gids[expected] == qids[q])


def test_ranked_list_from_distances_rejects_bad_input():
  with pytest.raises(ValueError, match="query_ids"):
    plots.ranked_list_from_distances(_DIST, _QIDS[:1], _GIDS, query_indices=[0])
  with pytest.raises(ValueError, match=r"\[0, 2\).*\[2\]"):
    plots.ranked_list_from_distances(_DIST, _QIDS, _GIDS, query_indices=[2])
  with pytest.raises(ValueError, match="exclude must be bool"):
    plots.ranked_list_from_distances(_DIST, _QIDS, _GIDS, query_indices=[0],
                                     exclude=np.zeros((2, 3), bool))
  with pytest.raises(ValueError, match="every gallery item"):
    plots.ranked_list_from_distances(_DIST, _QIDS, _GIDS, query_indices=[0],
                                     exclude=np.array([[True] * 4, [False] * 4]))
