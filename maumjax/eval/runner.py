"""Protocol runner: a feature extractor and a prepared dataset in, every setting's numbers out.

    report = runner.run_sysu(extract, builder, root=manual_dir, out_dir=workdir)
    print(report.table)

`extract(images, modality)` is a jitted function from a float32 image batch [B, H, W, 3]
(normalised with the ImageNet mean and std, the test transform of every reference) and the
int32 modality of each image [B] (0 visible, 1 infrared; two-stream models route each image
through its own stem) to features [B, D]. Batches have
a fixed size (the last one is padded), so it compiles once. Query and gallery-pool features
are extracted once; every trial only re-ranks (`maumjax.eval.protocol`).

Reported settings:
* SYSU-MM01: all-search and indoor-search, single- and multi-shot, 10 trials each, gallery
  drawn with AGW's sampler (default) or the official permutation file.
* RegDB: visible->thermal and thermal->visible of the builder's trial.
Every result records the protocol choices that make it comparable (protocol.md README):
dataset, sampler, trials, flip TTA, re-ranking (never), CMC convention.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maumjax.data import augment, images
from maumjax.data import pipeline as pipeline_lib
from maumjax.eval import gallery as gallery_lib
from maumjax.eval import metrics as metrics_lib
from maumjax.eval import plots
from maumjax.eval import protocol

Extractor = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Split:
  """Features and metadata of one evaluated split, in source order."""

  feats: np.ndarray
  ids: np.ndarray
  cams: np.ndarray
  paths: tuple[str, ...]
  source: Any  # the record source, to load images for the ranked-list sheet


@dataclasses.dataclass(frozen=True)
class Report:
  """A protocol run: per-setting results, the printed table and the JSON record."""

  results: tuple[protocol.SettingResult, ...]
  table: str
  record: dict[str, Any]
  files: tuple[Path, ...] = ()


def extract_split(extract: Extractor, source, *, batch_size: int = 64,
                  flip: bool = False) -> Split:
  """Runs `extract` over every record of `source` in order.

  Args:
    extract: jitted (image batch, modality) -> features function (module docstring).
    source: random-access records with 'image' (encoded bytes or uint8 array), 'identity',
      'camera', 'modality' and 'path' (e.g. `pipeline.PreparedSource(builder.data_dir, 'query')`).
    batch_size: fixed batch size; the last batch is padded by repeating its last image.
    flip: test-time augmentation: average the features of each image and its mirror
      (CAJ/DEEN practice; off by default and recorded, protocol.md §3.8).

  Returns:
    Split with float32 features [N, D].
  """
  normalise = jax.jit(augment.normalize_jax)
  feats, ids, cams, paths = [], [], [], []
  for start in range(0, len(source), batch_size):
    keys = list(range(start, min(start + batch_size, len(source))))
    rows = source.__getitems__(keys) if hasattr(source, "__getitems__") else \
        [source[i] for i in keys]
    batch = np.stack([r["image"] if isinstance(r["image"], np.ndarray)
                      else images.decode_image(r["image"]) for r in rows])
    modality = np.array([int(r["modality"]) for r in rows], np.int32)
    n = len(rows)
    if n < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
      modality = np.concatenate([modality, np.repeat(modality[-1:], batch_size - n)])
    x = normalise(jnp.asarray(batch))
    m = jnp.asarray(modality)
    out = extract(x, m)
    if flip:
      out = (out + extract(x[:, :, ::-1], m)) / 2
    feats.append(np.asarray(out)[:n])
    for r in rows:
      ids.append(int(r["identity"]))
      cams.append(int(r["camera"]))
      path = r["path"]
      paths.append(path.decode() if isinstance(path, bytes) else str(path))
  return Split(np.concatenate(feats).astype(np.float32), np.asarray(ids), np.asarray(cams),
               tuple(paths), source)


DISTANCE_TEXT = {
    "cosine": "cosine distance d = 1 - cos",
    "euclidean": "squared Euclidean distance d = |q - g|^2 (unnormalised features)",
}


def _check_distance(distance: str) -> None:
  if distance not in metrics_lib.DISTANCES:
    raise ValueError(f"distance {distance!r} is not one of {metrics_lib.DISTANCES}")


def sheet_title(dataset: str, setting: str, trial: int | None, detail: str = "", *,
                distance: str = "cosine") -> str:
  """The ranked-list sheet's title: which ranking it shows and what its numbers are.

  E.g. 'SYSU-MM01 all-search single-shot, trial 0 (agw gallery sampler): ranked by cosine
  distance d = 1 - cos'; `distance` ('cosine' or 'euclidean') names the ranking distance.
  """
  mode, _, shot = setting.partition("/")
  words = f"{mode}-search {shot}-shot" if shot in ("single", "multi") else setting
  trial_text = "" if trial is None else f", trial {trial}"
  detail = f" ({detail})" if detail else ""
  return f"{dataset} {words}{trial_text}{detail}: ranked by {DISTANCE_TEXT[distance]}"


def _write_outputs(out_dir, name: str, results, record, query: Split, pool: Split,
                   rows: np.ndarray, exclude_rule: bool, num_ranked: int,
                   title: str, distance: str) -> tuple[Path, ...]:
  """JSON record, CMC curves and a ranked-list sheet (titled `title`) of one trial's gallery."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files = [out / f"eval_{name}.json"]
  files[0].write_text(json.dumps(record, indent=1))
  curves = {r.setting: np.stack([m.cmc for m in r.trials]) for r in results}
  files.append(plots.plot_cmc(curves, out / f"cmc_{name}.png", title=f"{name} CMC"))
  if num_ranked:
    # The distances the metrics ranked by, as [query, gallery] (for cosine: -cos; the labels
    # print the cosine distance 1 - cos, which ranks the same).
    dist = np.asarray(metrics_lib.distance_rows(pool.feats[rows], query.feats, distance)).T
    g_ids, g_cams = pool.ids[rows], pool.cams[rows]
    exclude = ((query.cams[:, None] == metrics_lib.SYSU_EXCLUDED[0])
               & (g_cams[None, :] == metrics_lib.SYSU_EXCLUDED[1])) if exclude_rule else None
    chosen = np.linspace(0, len(query.ids) - 1, min(num_ranked, len(query.ids))).astype(int)
    order, correct = plots.ranked_list_from_distances(
        dist, query.ids, g_ids, query_indices=chosen, top_k=10, exclude=exclude)

    def load(split, index):
      image = split.source[int(index)]["image"]
      return image if isinstance(image, np.ndarray) else images.decode_image(image)

    q_imgs = [load(query, i) for i in chosen]
    g_imgs = [[load(pool, rows[j]) for j in row] for row in order]
    q_labels, g_labels = plots.ranked_list_labels(
        query.feats[chosen], query.ids[chosen], query.cams[chosen], pool.feats[rows], g_ids,
        g_cams, order, distance=distance)
    files.append(plots.ranked_list_sheet(q_imgs, g_imgs, correct, out / f"ranked_{name}.png",
                                         query_labels=q_labels, gallery_labels=g_labels,
                                         title=title))
  return tuple(files)


def run_sysu(extract: Extractor, builder, *, root: str | os.PathLike,
             modes: Sequence[str] = protocol.SYSU_MODES,
             shots: Sequence[int] = protocol.SYSU_SHOTS,
             trials: Sequence[int] = gallery_lib.TRIALS, sampling: str = "agw",
             perm_file: str | os.PathLike | None = None, batch_size: int = 64,
             flip: bool = False, out_dir: str | os.PathLike | None = None,
             num_ranked: int = 8, distance: str = "cosine") -> Report:
  """The SYSU-MM01 protocol for a prepared `sysu_mm01` builder.

  Args:
    extract: jitted (image batch, modality) -> features function.
    builder: prepared SYSU-MM01 builder (its `query` and `gallery` splits are used).
    root: the extracted SYSU-MM01 folder (or the manual dir holding it) the builder read;
      the per-trial galleries are drawn from its folder listings, exactly as the references.
    modes, shots, trials: the settings to run (default: all four settings x 10 trials).
    sampling: 'agw' (AGW python-random draw) or 'official' (rand_perm_cam.mat).
    perm_file: the official permutation file (default `<root>/exp/rand_perm_cam.mat`).
    batch_size: extraction batch size.
    flip: flip test-time augmentation (off by default; recorded).
    out_dir: if set, writes eval_sysu_mm01.json (the record: metrics as fractions,
      `"units": "fraction"`), cmc_sysu_mm01.png and ranked_sysu_mm01.png (the first setting's
      first trial).
    num_ranked: queries on the ranked-list sheet (0: none).
    distance: 'cosine' (L2-normalised features; every reference's SYSU ranking, MPANet's
      included) or 'euclidean' (squared, unnormalised); recorded.

  Raises:
    ValueError: a drawn gallery image is missing from the prepared gallery split (the
      builder was made from a different copy of the dataset), or `distance` is unknown.
  """
  _check_distance(distance)
  query = extract_split(extract, pipeline_lib.PreparedSource(builder.data_dir, "query"),
                        batch_size=batch_size, flip=flip)
  pool = extract_split(extract, pipeline_lib.PreparedSource(builder.data_dir, "gallery"),
                       batch_size=batch_size, flip=flip)
  index = {p: i for i, p in enumerate(pool.paths)}
  galleries = {}
  for mode in modes:
    for shot in shots:
      per_trial = []
      for trial in trials:
        paths = gallery_lib.sysu_gallery(root, mode=mode, shot=shot, trial=trial,
                                         sampling=sampling, perm_file=perm_file)
        missing = [p for p in paths if p not in index]
        if missing:
          raise ValueError(
              f"{len(missing)} drawn gallery images, e.g. {missing[0]!r}, are not in the "
              f"prepared gallery split at {builder.data_dir}; rebuild it from {root}")
        per_trial.append(np.array([index[p] for p in paths], np.int64))
      galleries[protocol.setting_name(mode, shot)] = per_trial
  raw = protocol.sysu_protocol_from_features(query.feats, query.ids, query.cams, pool.feats,
                                             pool.ids, pool.cams, galleries, distance=distance)
  results = tuple(protocol.SettingResult(k, tuple(v)) for k, v in raw.items())
  record = protocol.results_to_json(
      results, dataset="sysu_mm01", direction="infrared->visible", sampler=sampling,
      trials=list(trials), queries=len(query.ids), gallery_pool=len(pool.ids),
      flip_tta=flip, reranking=False, cmc="identity-deduplicated", distance=distance,
      feature_dim=int(query.feats.shape[1]))
  table = protocol.format_table(results, title=f"SYSU-MM01 ({sampling} gallery sampler, "
                                f"{len(trials)} trials, flip TTA {'on' if flip else 'off'})")
  files = ()
  if out_dir is not None:
    setting, per_trial = next(iter(galleries.items()))
    title = sheet_title("SYSU-MM01", setting, trials[0], f"{sampling} gallery sampler",
                        distance=distance)
    files = _write_outputs(out_dir, "sysu_mm01", results, record, query, pool, per_trial[0],
                           True, num_ranked, title, distance)
  return Report(results, table, record, files)


def run_regdb(extract: Extractor, builder, *, batch_size: int = 64, flip: bool = False,
              out_dir: str | os.PathLike | None = None, num_ranked: int = 8,
              distance: str = "cosine", cmc: str = "plain") -> Report:
  """Both RegDB directions for a prepared `regdb/trial_t` builder (one model, one trial).

  With `out_dir`, writes eval_regdb.json (metrics as fractions, `"units": "fraction"`),
  cmc_regdb.png and ranked_regdb.png (visible queries against the thermal gallery).
  `distance`: 'cosine' (L2-normalised features, AGW) or 'euclidean' (squared Euclidean of
  unnormalised features, MPANet's code). `cmc`: 'plain' (AGW) or 'dedup' (identity-deduplicated,
  MPANet's code). Both are recorded.
  """
  _check_distance(distance)
  if cmc not in ("plain", "dedup"):
    raise ValueError(f"cmc {cmc!r} is neither 'plain' nor 'dedup'")
  visible = extract_split(extract, pipeline_lib.PreparedSource(builder.data_dir, "test_visible"),
                          batch_size=batch_size, flip=flip)
  thermal = extract_split(extract, pipeline_lib.PreparedSource(builder.data_dir, "test_thermal"),
                          batch_size=batch_size, flip=flip)
  raw = protocol.regdb_protocol_from_features(visible.feats, visible.ids, thermal.feats,
                                              thermal.ids, distance=distance,
                                              dedup=cmc == "dedup")
  results = tuple(protocol.SettingResult(k, (v,)) for k, v in raw.items())
  trial = getattr(builder.builder_config, "trial", None)
  record = protocol.results_to_json(
      results, dataset="regdb", trial=trial, queries_visible=len(visible.ids),
      queries_thermal=len(thermal.ids), flip_tta=flip, reranking=False,
      cmc="identity-deduplicated" if cmc == "dedup" else "plain", distance=distance)
  table = protocol.format_table(results, title=f"RegDB trial {trial} (flip TTA "
                                f"{'on' if flip else 'off'})")
  files = ()
  if out_dir is not None:
    title = sheet_title("RegDB", "visible->thermal", trial, distance=distance)
    files = _write_outputs(out_dir, "regdb", results, record, visible, thermal,
                           np.arange(len(thermal.ids)), False, num_ranked, title, distance)
  return Report(results, table, record, files)
