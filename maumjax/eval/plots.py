"""Pictures to look at first when a re-ID model misbehaves: CMC curves and ranked-list sheets.

* `plot_cmc` draws one CMC curve per setting (percent over rank), a +-std band where per-trial
  curves are given, and saves a PNG.
* `ranked_list_sheet` puts each query next to its top-k gallery images, green-bordered where the
  identity matches and red where it does not, under a title and a legend of the border colours.
  It is composed with PIL and numpy alone; `sheet_layout` gives the pixel geometry so callers
  and tests can find every tile. `ranked_list_labels` writes the text under each tile: identity,
  camera and the cosine distance 1 - cos of each gallery image to its query.
* `ranked_list_from_distances` turns a distance matrix into the ranking and correct mask the
  sheet wants, optionally dropping gallery items per query (SYSU-MM01's cam3/cam2 rule).

Both savers write through the Agg canvas or PIL, so no GUI backend is touched.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

# Sheet geometry in pixels. Gaps are background; QUERY_GAP is wider than TILE_GAP so the query
# column reads as separate from its ranked list.
SHEET_MARGIN = 6
QUERY_GAP = 12
TILE_GAP = 2
ROW_GAP = 6
# PIL's default font (FreeType, size 10, or the 11 px bitmap font without FreeType) fits a
# 13 px line; LABEL_PAD is space above and below the text in the label strip.
LABEL_LINE_H = 13
LABEL_PAD = 2
# The header above the tiles: the title (if any) and the legend, HEADER_LINE_H pixels a line;
# a legend swatch is a SWATCH-pixel square in a border colour, SWATCH_GAP from its text.
HEADER_LINE_H = 16
SWATCH = 10
SWATCH_GAP = 4
LEGEND_GAP = 14

BACKGROUND_RGB = (255, 255, 255)
QUERY_RGB = (40, 110, 220)
CORRECT_RGB = (0, 200, 0)
WRONG_RGB = (220, 0, 0)
LABEL_RGB = (0, 0, 0)
LEGEND = (("query", QUERY_RGB), ("same identity as the query", CORRECT_RGB),
          ("different identity", WRONG_RGB))

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_cmc(curves: Mapping[str, np.ndarray], path: str | os.PathLike[str], *,
             title: str = "CMC", max_rank: int = 20) -> pathlib.Path:
  """Plots CMC curves as matching rate (%) over rank and saves a PNG.

  Args:
    curves: setting name (e.g. 'all / single-shot') -> CMC as fractions in [0, 1], either
      [R] or [T, R] per-trial curves; [T, R] is drawn as the mean with a +-std band (population
      std over trials). Curves shorter than `max_rank` are drawn over their length.
    path: output PNG; parent directories are created.
    title: axes title.
    max_rank: last rank on the x axis.

  Returns:
    `path` as a `pathlib.Path`.

  Raises:
    ValueError: `curves` is empty, `max_rank` < 1, or a curve is not [R] / [T, R] with
      R, T >= 1 and finite values in [0, 1] (the message names the key).
  """
  fig = _cmc_figure(curves, title=title, max_rank=max_rank)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png")
  return path


def _cmc_figure(curves: Mapping[str, np.ndarray], *, title: str, max_rank: int) -> Figure:
  """Validates `curves` and draws them on a new Agg-backed figure (see `plot_cmc`)."""
  if not curves:
    raise ValueError("plot_cmc got no curves; pass a mapping of setting name -> CMC array")
  if max_rank < 1:
    raise ValueError(f"max_rank must be >= 1, got {max_rank}")
  series = {key: _check_curve(key, value) for key, value in curves.items()}

  fig = Figure(figsize=(6.4, 4.8), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for i, (key, trials) in enumerate(series.items()):
    ranks = min(trials.shape[1], max_rank)
    x = np.arange(1, ranks + 1)
    mean = 100.0 * trials[:, :ranks].mean(axis=0)
    std = 100.0 * trials[:, :ranks].std(axis=0)
    spread = trials.shape[0] > 1
    r1 = f"{mean[0]:.1f} ± {std[0]:.1f}" if spread else f"{mean[0]:.1f}"
    (line,) = ax.plot(x, mean, marker=_MARKERS[i % len(_MARKERS)], markersize=4,
                      label=f"{key} (R1 {r1}%)")
    if spread:
      ax.fill_between(x, np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100),
                      color=line.get_color(), alpha=0.2, linewidth=0)
  ax.set_xlim(0.5, max_rank + 0.5)
  ax.set_ylim(0, 100)
  ax.xaxis.set_major_locator(MaxNLocator(nbins=min(max_rank, 20), integer=True))
  ax.set_xlabel("Rank")
  ax.set_ylabel("Matching rate (%)")
  ax.set_title(title)
  ax.grid(True, alpha=0.4)
  ax.legend(loc="lower right", fontsize="small")
  fig.tight_layout()
  return fig


def _check_curve(key: str, value: np.ndarray) -> np.ndarray:
  """Validates one CMC curve; returns it as float [T, R] (T = 1 for a single curve)."""
  curve = np.asarray(value, dtype=np.float64)
  if curve.ndim not in (1, 2) or curve.size == 0:
    raise ValueError(f"CMC curve {key!r} has shape {curve.shape}; expected a non-empty [R] "
                     "curve or [T, R] per-trial curves")
  if not np.all(np.isfinite(curve)) or curve.min() < 0 or curve.max() > 1:
    raise ValueError(f"CMC curve {key!r} has values outside [0, 1] (min {np.nanmin(curve)}, "
                     f"max {np.nanmax(curve)}); pass fractions, not percent")
  return curve.reshape(-1, curve.shape[-1])


@dataclasses.dataclass(frozen=True)
class SheetLayout:
  """Pixel geometry of a ranked-list sheet.

  A header of `header_h` pixels (title and legend) comes first; below it, column 0 is the
  query and columns 1..k are gallery ranks 1..k. A cell is a bordered tile (`box_w` x `box_h`)
  with a label strip of `label_h` pixels under it. The sheet is at least `header_w` pixels
  wide between its margins, so the header text is never cut.
  """

  num_rows: int
  num_ranks: int
  box_w: int
  box_h: int
  label_h: int
  border: int
  header_h: int = 0
  header_w: int = 0

  @property
  def cell_h(self) -> int:
    return self.box_h + self.label_h

  @property
  def width(self) -> int:
    tiles = self.box_w + QUERY_GAP + self.num_ranks * self.box_w + (self.num_ranks - 1) * TILE_GAP
    return 2 * SHEET_MARGIN + max(tiles, self.header_w)

  @property
  def height(self) -> int:
    return (2 * SHEET_MARGIN + self.header_h + self.num_rows * self.cell_h
            + (self.num_rows - 1) * ROW_GAP)

  def header_line(self, line: int) -> int:
    """Top y of header line `line` (0: the first, the title when there is one)."""
    return SHEET_MARGIN + line * HEADER_LINE_H

  def box(self, row: int, col: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the bordered tile at `row`, `col`; x1 and y1 are exclusive."""
    x0 = SHEET_MARGIN
    if col > 0:
      x0 += self.box_w + QUERY_GAP + (col - 1) * (self.box_w + TILE_GAP)
    y0 = SHEET_MARGIN + self.header_h + row * (self.cell_h + ROW_GAP)
    return x0, y0, x0 + self.box_w, y0 + self.box_h


def sheet_layout(num_rows: int, num_ranks: int, *, tile_hw: tuple[int, int] = (128, 64),
                 border: int = 4, label_lines: int = 0, header_lines: int = 0,
                 header_w: int = 0) -> SheetLayout:
  """Geometry of a sheet with `num_rows` queries, `num_ranks` gallery tiles each.

  Args:
    num_rows: queries (rows), >= 1.
    num_ranks: gallery tiles per row, >= 1.
    tile_hw: image size inside the border.
    border: border width around each image.
    label_lines: text lines under each tile; 0 means no label strip.
    header_lines: lines above the tiles (title, legend); 0 means no header.
    header_w: width in pixels of the widest header line.
  """
  tile_h, tile_w = tile_hw
  label_h = label_lines * LABEL_LINE_H + 2 * LABEL_PAD if label_lines else 0
  header_h = header_lines * HEADER_LINE_H + ROW_GAP if header_lines else 0
  return SheetLayout(num_rows=num_rows, num_ranks=num_ranks, box_w=tile_w + 2 * border,
                     box_h=tile_h + 2 * border, label_h=label_h, border=border,
                     header_h=header_h, header_w=header_w)


def ranked_list_sheet(query_images: Sequence[np.ndarray],
                      gallery_images: Sequence[Sequence[np.ndarray]], correct: np.ndarray,
                      path: str | os.PathLike[str], *,
                      query_labels: Sequence[str] | None = None,
                      gallery_labels: Sequence[Sequence[str]] | None = None, top_k: int = 10,
                      tile_hw: tuple[int, int] = (128, 64), border: int = 4, title: str = "",
                      legend: bool = True) -> pathlib.Path:
  """Saves a PNG with one row per query: the query, then its top-k gallery images by rank.

  The query has a blue border (`QUERY_RGB`); gallery tiles are green (`CORRECT_RGB`) where
  `correct` is true and red (`WRONG_RGB`) where not. Images are resized to `tile_hw` without
  keeping the aspect ratio, as the networks see them. Labels (newlines allowed, e.g.
  'id 12 cam3\\nd=0.83', see `ranked_list_labels`) go in a strip under each tile, cut to the
  tile width. Above the tiles go the title (say which dataset, setting and trial the ranking is
  of, and what the labels' numbers are) and a legend line with a swatch of each border colour
  ('query', 'same identity as the query', 'different identity'); the sheet widens to fit them.

  Args:
    query_images: N uint8 [H, W, 3] (or grey [H, W]) images of any size.
    gallery_images: N lists of ranked gallery images, each at least k long.
    correct: bool [N, k], whether rank j of query i shares its identity.
    path: output PNG; parent directories are created.
    query_labels: N strings, or None.
    gallery_labels: N lists of at least k strings, or None.
    top_k: at most this many ranks are drawn (k = min(top_k, correct.shape[1])).
    tile_hw: (height, width) of each image inside its border.
    border: border width in pixels.
    title: first header line ('' for none; a newline in it is drawn as a space).
    legend: draw the legend line of the border colours.

  Returns:
    `path` as a `pathlib.Path`.

  Raises:
    ValueError: the inputs' lengths or shapes disagree (the message names which), an image is
      not uint8 [H, W, 3] / [H, W], or `top_k`, `tile_hw` or `border` is out of range.
  """
  n = len(query_images)
  correct = np.asarray(correct)
  if n == 0:
    raise ValueError("ranked_list_sheet got no query images")
  if correct.dtype != np.bool_ or correct.ndim != 2 or correct.shape[0] != n:
    raise ValueError(f"correct must be bool [N, k] with N = {n} queries; got {correct.dtype} "
                     f"{correct.shape}")
  if top_k < 1 or correct.shape[1] < 1:
    raise ValueError(f"need top_k >= 1 and correct.shape[1] >= 1; got top_k={top_k}, "
                     f"correct.shape={correct.shape}")
  if len(tile_hw) != 2 or min(tile_hw) < 1 or border < 0:
    raise ValueError(f"tile_hw must be two positive ints and border >= 0; got tile_hw={tile_hw}, "
                     f"border={border}")
  k = min(top_k, correct.shape[1])
  _check_lengths("gallery_images", gallery_images, n, k)
  if query_labels is not None and len(query_labels) != n:
    raise ValueError(f"query_labels has {len(query_labels)} entries for {n} queries")
  if gallery_labels is not None:
    _check_lengths("gallery_labels", gallery_labels, n, k)

  label_lines = 0
  if query_labels is not None:
    label_lines = max(label_lines, *(_num_lines(s) for s in query_labels))
  if gallery_labels is not None:
    label_lines = max(label_lines, *(_num_lines(s) for row in gallery_labels for s in row[:k]))
  font = ImageFont.load_default()
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  title = " ".join(title.split())
  header_w = 0
  if title:
    header_w = _text_width(measure, font, title)
  if legend:
    header_w = max(header_w, _legend_width(measure, font))
  header_lines = int(bool(title)) + int(legend)
  layout = sheet_layout(n, k, tile_hw=tuple(tile_hw), border=border, label_lines=label_lines,
                        header_lines=header_lines, header_w=header_w)

  sheet = Image.new("RGB", (layout.width, layout.height), BACKGROUND_RGB)
  draw = ImageDraw.Draw(sheet)
  if title:
    draw.text((SHEET_MARGIN, layout.header_line(0)), title, fill=LABEL_RGB, font=font)
  if legend:
    _draw_legend(draw, font, SHEET_MARGIN, layout.header_line(header_lines - 1))
  for i in range(n):
    tiles = [(query_images[i], QUERY_RGB, query_labels[i] if query_labels is not None else None,
              f"query_images[{i}]")]
    for j in range(k):
      tiles.append((gallery_images[i][j], CORRECT_RGB if correct[i, j] else WRONG_RGB,
                    gallery_labels[i][j] if gallery_labels is not None else None,
                    f"gallery_images[{i}][{j}]"))
    for col, (image, colour, label, name) in enumerate(tiles):
      x0, y0, x1, y1 = layout.box(i, col)
      draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
      sheet.paste(_tile(image, tile_hw, name), (x0 + border, y0 + border))
      if label:
        _draw_label(draw, font, label, x0, y1 + LABEL_PAD, layout.box_w)

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  sheet.save(path, format="PNG")
  return path


def _check_lengths(name: str, rows: Sequence[Sequence[object]], n: int, k: int) -> None:
  """Raises unless `rows` has n entries, each at least k long."""
  if len(rows) != n:
    raise ValueError(f"{name} has {len(rows)} rows for {n} queries")
  for i, row in enumerate(rows):
    if len(row) < k:
      raise ValueError(f"{name}[{i}] has {len(row)} entries but correct asks for k = {k}; "
                       "pass at least k ranked items per query or lower top_k")


def _text_width(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
                text: str) -> int:
  """Pixels from where `text` is drawn to its last inked column (anti-aliasing included)."""
  return int(np.ceil(draw.textbbox((0, 0), text, font=font)[2]))


def _legend_items(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont
                  ) -> list[tuple[int, str, tuple[int, int, int]]]:
  """(x offset, text, colour) of each legend entry: a swatch, then its text."""
  items, x = [], 0
  for text, colour in LEGEND:
    items.append((x, text, colour))
    x += SWATCH + SWATCH_GAP + _text_width(draw, font, text) + LEGEND_GAP
  return items


def _legend_width(draw: ImageDraw.ImageDraw,
                  font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
  """Width in pixels of the legend line."""
  x, text, _ = _legend_items(draw, font)[-1]
  return x + SWATCH + SWATCH_GAP + _text_width(draw, font, text)


def _draw_legend(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
                 x0: int, y0: int) -> None:
  """The legend line from (x0, y0): a swatch of each border colour and what it means."""
  top = y0 + (LABEL_LINE_H - SWATCH) // 2
  for x, text, colour in _legend_items(draw, font):
    draw.rectangle((x0 + x, top, x0 + x + SWATCH - 1, top + SWATCH - 1), fill=colour)
    draw.text((x0 + x + SWATCH + SWATCH_GAP, y0), text, fill=LABEL_RGB, font=font)


def ranked_list_labels(query_feats: np.ndarray, query_ids: Sequence[int] | np.ndarray,
                       query_cams: Sequence[int] | np.ndarray, gallery_feats: np.ndarray,
                       gallery_ids: Sequence[int] | np.ndarray,
                       gallery_cams: Sequence[int] | np.ndarray, order: np.ndarray, *,
                       distance: str = "cosine") -> tuple[list[str], list[list[str]]]:
  """The texts under the tiles of `ranked_list_sheet`, from the features that were ranked.

  A query's label is 'id 12 cam3'; a gallery image's is 'id 12 cam1\\nd=0.284', with d its
  cosine distance to the query, 1 - cos(q, g) in [0, 2] (0: same direction). Ranking by it is
  ranking by -cos (what the metrics use, `maumjax.eval.metrics.cosine_distance_rows`). With
  `distance='euclidean'`, d is the squared Euclidean distance |q - g|^2 of the unnormalised
  features (`maumjax.eval.metrics.euclidean_distance_rows`).

  Args:
    query_feats: [n, D] features of the queries on the sheet, one per row.
    query_ids, query_cams: [n] their identities and cameras.
    gallery_feats: [G, D] gallery features.
    gallery_ids, gallery_cams: [G] gallery identities and cameras.
    order: int [n, k] gallery indices by rank (`ranked_list_from_distances`).
    distance: 'cosine' or 'euclidean', the distance that ranked them.

  Returns:
    (query labels [n], gallery labels [n][k]).

  Raises:
    ValueError: the shapes disagree or `order` indexes outside the gallery.
  """
  q = np.asarray(query_feats, np.float64)
  g = np.asarray(gallery_feats, np.float64)
  order = np.asarray(order)
  q_ids, q_cams = np.asarray(query_ids), np.asarray(query_cams)
  g_ids, g_cams = np.asarray(gallery_ids), np.asarray(gallery_cams)
  if (q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1] or order.ndim != 2
      or order.shape[0] != len(q) or q_ids.shape != (len(q),) or q_cams.shape != (len(q),)
      or g_ids.shape != (len(g),) or g_cams.shape != (len(g),)):
    raise ValueError(f"ranked_list_labels: query features {q.shape}, ids {q_ids.shape}, cams "
                     f"{q_cams.shape}, gallery features {g.shape}, ids {g_ids.shape}, cams "
                     f"{g_cams.shape} and order {order.shape} disagree; expected [n, D], [n], "
                     "[n], [G, D], [G], [G] and [n, k]")
  if order.size and (order.min() < 0 or order.max() >= len(g)):
    raise ValueError(f"order holds gallery indices outside [0, {len(g)})")
  if distance == "euclidean":
    dist = np.sum((q[:, None, :] - g[order]) ** 2, axis=-1)
  elif distance == "cosine":
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    cos = np.einsum("nd,nkd->nk", q, g[order])
    # float rounding can put 1 - cos a hair outside [0, 2]; print the true range's end instead.
    dist = np.clip(1.0 - cos, 0.0, 2.0)
  else:
    raise ValueError(f"distance {distance!r} is neither 'cosine' nor 'euclidean'")
  query_labels = [f"id {i} cam{c}" for i, c in zip(q_ids.tolist(), q_cams.tolist())]
  gallery_labels = [[f"id {g_ids[j]} cam{g_cams[j]}\nd={d:.3f}" for j, d in zip(row, dists)]
                    for row, dists in zip(order.tolist(), dist.tolist())]
  return query_labels, gallery_labels


def _num_lines(label: str) -> int:
  return len(label.split("\n")) if label else 0


def _tile(image: np.ndarray, tile_hw: Sequence[int], name: str) -> Image.Image:
  """uint8 [H, W, 3] or [H, W] -> RGB PIL image of size tile_hw."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                         and image.shape[-1] == 3)):
    raise ValueError(f"{name} must be uint8 [H, W, 3] or [H, W]; got {image.dtype} "
                     f"{image.shape}")
  tile_h, tile_w = tile_hw
  return Image.fromarray(image).convert("RGB").resize((tile_w, tile_h), Image.BILINEAR)


def _draw_label(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
                label: str, x0: int, y0: int, max_w: int) -> None:
  """Draws `label` line by line from (x0, y0), cutting each line to `max_w` pixels."""
  for line_no, line in enumerate(label.split("\n")):
    # Cut rather than overflow: text spilling into the next tile reads as that tile's label.
    while line and draw.textlength(line, font=font) > max_w:
      line = line[:-1]
    draw.text((x0, y0 + line_no * LABEL_LINE_H), line, fill=LABEL_RGB, font=font)


def ranked_list_from_distances(distmat: np.ndarray, query_ids: Sequence[int] | np.ndarray,
                               gallery_ids: Sequence[int] | np.ndarray, *,
                               query_indices: Sequence[int], top_k: int = 10,
                               exclude: np.ndarray | None = None
                               ) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery ranking of chosen queries and whether each item shares the query identity.

  Ranking is ascending distance with ties kept in gallery order (stable sort). Excluded
  gallery items are dropped before ranking, as SYSU-MM01 drops same-identity cam2 gallery
  images for cam3 queries.

  Args:
    distmat: [Q, G] query-gallery distances.
    query_ids: [Q] identities of the queries.
    gallery_ids: [G] identities of the gallery.
    query_indices: n query rows to rank.
    top_k: ranks kept; k = min(top_k, fewest gallery items left to any chosen query).
    exclude: bool [Q, G], true where a gallery item must not be ranked for a query; or None.

  Returns:
    order: int [n, k] gallery indices by rank.
    correct: bool [n, k], gallery_ids[order] == query identity.

  Raises:
    ValueError: shapes disagree, a query index is out of range, top_k < 1, or a chosen query
      has every gallery item excluded.
  """
  distmat = np.asarray(distmat)
  query_ids = np.asarray(query_ids)
  gallery_ids = np.asarray(gallery_ids)
  rows = np.asarray(query_indices, dtype=np.int64).reshape(-1)
  if distmat.ndim != 2:
    raise ValueError(f"distmat must be [Q, G]; got shape {distmat.shape}")
  num_q, num_g = distmat.shape
  if query_ids.shape != (num_q,) or gallery_ids.shape != (num_g,):
    raise ValueError(f"query_ids {query_ids.shape} and gallery_ids {gallery_ids.shape} must "
                     f"match distmat {distmat.shape} as ({num_q},) and ({num_g},)")
  if rows.size == 0 or rows.min() < 0 or rows.max() >= num_q:
    raise ValueError(f"query_indices must be a non-empty list in [0, {num_q}); got "
                     f"{rows.tolist()}")
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")

  order = np.argsort(distmat[rows], axis=1, kind="stable")
  k = min(top_k, num_g)
  if exclude is not None:
    exclude = np.asarray(exclude)
    if exclude.dtype != np.bool_ or exclude.shape != distmat.shape:
      raise ValueError(f"exclude must be bool {distmat.shape} like distmat; got "
                       f"{exclude.dtype} {exclude.shape}")
    dropped = np.take_along_axis(exclude[rows], order, axis=1)
    # A second stable sort on the drop flag moves excluded items last and keeps the
    # distance order (ties included) among the rest.
    order = np.take_along_axis(order, np.argsort(dropped, axis=1, kind="stable"), axis=1)
    kept = num_g - int(dropped.sum(axis=1).max())
    if kept == 0:
      raise ValueError("exclude drops every gallery item for at least one chosen query")
    k = min(k, kept)
  order = order[:, :k]
  correct = gallery_ids[order] == query_ids[rows][:, None]
  return order, correct
