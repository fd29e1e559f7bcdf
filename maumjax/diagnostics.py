"""Pseudo-label diagnostics for unsupervised VI-ReID (MMM, mmm.md §1 and §6.1 step 5).

MMM claims that its pseudo-labels are *reliable*, i.e. that the clusters found by DBSCAN within
each modality, and the visible-to-infrared correspondence found by multi-memory matching, agree
with the true identities; the released `mmlm.py` prints the adjusted Rand index (ARI) of the
relabelled pseudo-labels as that reliability number. This module makes the claim watchable over
a whole run: after every clustering and after the cross-modality matching the trainer computes
`report(...)`, logs it (kind `pseudo_labels`, through `maumjax.train.writers.MetricWriter`), and
at the end `plot_history(read_history(log), path)` draws one PNG.

The ground-truth identities are used **only for reporting**: nothing here feeds back into
training, and the functions take plain NumPy arrays so that no caller is tempted to do so.

Conventions:

* Pseudo-labels are integers, -1 marks a DBSCAN outlier; ground truth holds identity numbers
  (the same numbers in both modalities, as SYSU-MM01 and RegDB have them).
* ARI and NMI count all outliers as ONE cluster (label -1 is just another label), exactly as
  MMM's `mmlm.py` passes its arrays to sklearn. Purity and correspondence ignore outliers and
  report the outlier fraction separately.
* Undefined quantities (no samples, no non-outliers) are `float('nan')`, never a silent 0.
  `MetricWriter` writes non-finite values as JSON `null` and `read_history` turns them back
  into nan; `jsonable` does the same conversion for other JSON writers.

Public API: `label_metrics`, `correspondence_accuracy`, `report`, `jsonable`, `read_history`,
`plot_history`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = ["label_metrics", "correspondence_accuracy", "report", "jsonable", "read_history",
           "plot_history"]

_NAN = float("nan")


def _as_labels(pred, truth, what: str = "") -> tuple[np.ndarray, np.ndarray]:
  pred = np.asarray(pred)
  truth = np.asarray(truth)
  if pred.ndim != 1 or truth.shape != pred.shape:
    raise ValueError(f"{what}pred and truth must be 1-D arrays of one length, got shapes "
                     f"{pred.shape} and {truth.shape}")
  for name, a in (("pred", pred), ("truth", truth)):
    if a.size and not np.issubdtype(a.dtype, np.integer):
      if not np.array_equal(a, np.round(a)):
        raise ValueError(f"{what}{name} must hold integer labels")
  return pred.astype(np.int64), truth.astype(np.int64)


def _purity(pred: np.ndarray, truth: np.ndarray) -> float:
  """Sum over clusters (label >= 0) of the majority true identity's count / #non-outliers."""
  keep = pred >= 0
  n = int(keep.sum())
  if n == 0:
    return _NAN
  _, c = np.unique(pred[keep], return_inverse=True)
  _, t = np.unique(truth[keep], return_inverse=True)
  pairs, counts = np.unique(c * (t.max() + 1) + t, return_counts=True)
  best = np.zeros(c.max() + 1, np.int64)
  np.maximum.at(best, pairs // (t.max() + 1), counts)
  return float(best.sum() / n)


def label_metrics(pred, truth) -> dict:
  """Quality of one set of pseudo-labels against the ground truth.

  Args:
    pred: int [N] pseudo-labels, -1 = outlier.
    truth: int [N] ground-truth identities.

  Returns:
    A dict of plain Python numbers:
    * 'ari': sklearn `adjusted_rand_score(truth, pred)` with all outliers as one cluster.
    * 'nmi': sklearn `normalized_mutual_info_score(truth, pred)` (arithmetic mean, sklearn's
      default), outliers again one cluster.
    * 'clusters': number of distinct labels >= 0.
    * 'outlier_fraction': fraction of samples labelled -1.
    * 'purity': over the non-outliers, the sum over clusters of the count of the cluster's most
      frequent true identity, divided by the number of non-outliers.
    * 'num': N.
    With N = 0, 'ari', 'nmi', 'outlier_fraction' and 'purity' are nan; with no non-outlier,
    'purity' is nan.
  """
  pred, truth = _as_labels(pred, truth)
  n = int(pred.size)
  if n == 0:
    return {"ari": _NAN, "nmi": _NAN, "clusters": 0, "outlier_fraction": _NAN,
            "purity": _NAN, "num": 0}
  return {
      "ari": float(adjusted_rand_score(truth, pred)),
      "nmi": float(normalized_mutual_info_score(truth, pred)),
      "clusters": int(np.unique(pred[pred >= 0]).size),
      "outlier_fraction": float(np.mean(pred < 0)),
      "purity": _purity(pred, truth),
      "num": n,
  }


def correspondence_accuracy(rgb_pred, rgb_truth, ir_pred, ir_truth) -> float:
  """How often a visible sample's pseudo-label leads to infrared images of its own identity.

  The two modalities' pseudo-labels must live in ONE label space: MMM after matching (visible
  labels replaced by the label of the matched infrared cluster), or joint clusters over both
  modalities. Definition:

  * For a label L >= 0, its infrared members are the infrared samples with `ir_pred == L`
    (infrared outliers belong to no label), and its majority identities are the true identities
    that occur most often among them (several when tied).
  * A visible sample with `rgb_pred >= 0` is correct when its label has at least one infrared
    member and its own true identity is one of that label's majority identities (a tie counts
    as correct for every tied identity). A visible sample whose label has no infrared member is
    wrong.
  * The accuracy is (#correct visible samples) / (#visible samples with label >= 0); visible
    outliers (-1) are left out of both counts. nan when every visible sample is an outlier.

  Args:
    rgb_pred, rgb_truth: int [Nv] visible pseudo-labels (-1 = outlier) and identities.
    ir_pred, ir_truth: int [Nr] infrared pseudo-labels (-1 = outlier) and identities.
  """
  rgb_pred, rgb_truth = _as_labels(rgb_pred, rgb_truth, "rgb_")
  ir_pred, ir_truth = _as_labels(ir_pred, ir_truth, "ir_")
  vis = rgb_pred >= 0
  if not vis.any():
    return _NAN
  inf = ir_pred >= 0
  rp, rt = rgb_pred[vis], rgb_truth[vis]
  ip, it = ir_pred[inf], ir_truth[inf]
  if ip.size == 0:
    return 0.0
  # Dense indices over both modalities, so a (label, identity) pair encodes as one integer.
  labels, lab = np.unique(np.concatenate([rp, ip]), return_inverse=True)
  ids, idx = np.unique(np.concatenate([rt, it]), return_inverse=True)
  n_ids = ids.size
  rl, rid = lab[:rp.size], idx[:rp.size]
  il, iid = lab[rp.size:], idx[rp.size:]
  pairs, counts = np.unique(il * n_ids + iid, return_counts=True)
  most = np.zeros(labels.size, np.int64)  # count of the majority identity per label (0: none)
  np.maximum.at(most, pairs // n_ids, counts)
  query = rl * n_ids + rid
  pos = np.clip(np.searchsorted(pairs, query), 0, pairs.size - 1)
  own = np.where(pairs[pos] == query, counts[pos], 0)  # IR members sharing the sample's id
  correct = (own > 0) & (own == most[rl])
  return float(correct.mean())


def report(rgb_pred, rgb_truth, ir_pred, ir_truth, *, joint: bool = True) -> dict:
  """All diagnostics of one visible/infrared pseudo-labelling as a flat dict of numbers.

  Keys: `label_metrics` of each modality prefixed 'rgb_' and 'ir_' (e.g. 'rgb_ari',
  'ir_purity'); with `joint` (both modalities' labels in one space) also 'joint_ari' and
  'joint_nmi' (ARI/NMI of the concatenated labels against the concatenated identities,
  outliers as one cluster: MMM's cross-modality reliability number) and 'correspondence'
  (`correspondence_accuracy`). Every value is a Python int or float, so the dict goes through
  `MetricWriter.write` as it is (nan becomes null in log.jsonl; see `jsonable` for json.dumps).
  """
  out = {}
  for prefix, pred, truth in (("rgb_", rgb_pred, rgb_truth), ("ir_", ir_pred, ir_truth)):
    out.update({prefix + k: v for k, v in label_metrics(pred, truth).items()})
  if joint:
    rp, rt = _as_labels(rgb_pred, rgb_truth, "rgb_")
    ip, it = _as_labels(ir_pred, ir_truth, "ir_")
    both = label_metrics(np.concatenate([rp, ip]), np.concatenate([rt, it]))
    out["joint_ari"] = both["ari"]
    out["joint_nmi"] = both["nmi"]
    out["correspondence"] = correspondence_accuracy(rp, rt, ip, it)
  return out


def jsonable(record: Mapping) -> dict:
  """A copy of `record` with non-finite floats replaced by None (strict JSON has no NaN)."""
  out = {}
  for k, v in record.items():
    if isinstance(v, (float, np.floating)):
      v = float(v)
      out[k] = v if math.isfinite(v) else None
    elif isinstance(v, np.integer):
      out[k] = int(v)
    else:
      out[k] = v
  return out


def read_history(jsonl_path: str | os.PathLike, kind: str = "pseudo_labels") -> list[dict]:
  """The records of a JSONL log (one JSON object per line) whose 'kind' is `kind`, in order.

  Reads what `MetricWriter` writes (`<workdir>/log.jsonl`; a directory means its log.jsonl):
  `{"step": S, "kind": K, "epoch": E, <name>: <float or null>, ...}`. Blank lines and lines cut
  short (a killed process) are skipped, and nulls become nan.

  `MetricWriter` only takes numbers, so a record cannot carry a string 'stage' through it. A
  trainer may therefore log under the kind `f"{kind}/{stage}"` (e.g. 'pseudo_labels/mmlm', which
  also groups the TensorBoard tags by stage): such lines are kept too, with 'stage' set from
  the suffix unless the record has one.
  """
  path = Path(jsonl_path)
  if path.is_dir():
    path = path / "log.jsonl"
  rows = []
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if not isinstance(record, dict):
      continue
    k = record.get("kind")
    if not isinstance(k, str):
      continue
    if k == kind:
      pass
    elif k.startswith(kind + "/"):
      record.setdefault("stage", k[len(kind) + 1:])
    else:
      continue
    rows.append({name: (_NAN if value is None else value) for name, value in record.items()})
  return rows


# Panels of `plot_history`: (title, [(key, legend label)]).
_PANELS = (
    ("ARI (outliers = one cluster)", [("rgb_ari", "rgb"), ("ir_ari", "ir"),
                                      ("joint_ari", "joint")]),
    ("NMI", [("rgb_nmi", "rgb"), ("ir_nmi", "ir"), ("joint_nmi", "joint")]),
    ("clusters", [("rgb_clusters", "rgb"), ("ir_clusters", "ir")]),
    ("outlier fraction", [("rgb_outlier_fraction", "rgb"), ("ir_outlier_fraction", "ir")]),
    ("purity (non-outliers)", [("rgb_purity", "rgb"), ("ir_purity", "ir")]),
    ("correspondence (rgb label -> ir majority id)", [("correspondence", "rgb->ir")]),
)


def _value(record: Mapping, key: str) -> float:
  v = record.get(key)
  try:
    return _NAN if v is None else float(v)
  except (TypeError, ValueError):
    return _NAN


def _tick(record: Mapping, i: int) -> str:
  stage, epoch = record.get("stage"), record.get("epoch")
  has_epoch = epoch is not None and not (isinstance(epoch, float) and math.isnan(epoch))
  epoch = int(epoch) if has_epoch else None
  if stage is not None and epoch is not None:
    return f"{stage}/{epoch}"
  if stage is not None:
    return str(stage)
  return f"e{epoch}" if epoch is not None else str(i)


def plot_history(records: Sequence[Mapping], path: str | os.PathLike, *,
                 title: str = "") -> str:
  """Draws the pseudo-label history of a run into one PNG and returns its path.

  Args:
    records: dicts in run order, each with 'epoch' (int), 'stage' (str: 'stage1', 'stage2',
      'mmlm', 'final', ...) and some of the keys of `report` (e.g. from `read_history`).
    path: the PNG to write. Written atomically: to a temporary file in the same folder, then
      `os.replace`d, so a failure leaves neither a half-written PNG nor the temporary file.
    title: figure title.

  Panels (each only when at least one record has one of its keys; missing or nan values leave
  gaps): ARI (rgb, ir, joint), NMI (rgb, ir, joint), clusters (rgb, ir), outlier fraction,
  purity and correspondence. The x axis is the record index, labelled 'stage/epoch', with a
  dotted line where the stage changes. No record with a known key gives a PNG saying so.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure  # Figure + Agg canvas: no pyplot, no display, no state.
  from matplotlib.ticker import MaxNLocator

  records = list(records)
  path = Path(path)
  panels = [(name, [(k, lab) for k, lab in series if any(k in r for r in records)])
            for name, series in _PANELS]
  panels = [(name, series) for name, series in panels if series]
  ncols = min(3, max(1, len(panels)))
  nrows = max(1, math.ceil(len(panels) / ncols))
  fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  if title:
    fig.suptitle(title)
  x = np.arange(len(records))
  ticks = [_tick(r, i) for i, r in enumerate(records)]
  every = max(1, math.ceil(len(records) / 20))  # at most about 20 tick labels
  changes = [i for i in range(1, len(records))
             if records[i].get("stage") != records[i - 1].get("stage")]
  if not panels:
    ax = fig.add_subplot(1, 1, 1)
    ax.text(0.5, 0.5, "no pseudo-label records", ha="center", va="center")
    ax.set_axis_off()
  for j, (name, series) in enumerate(panels):
    ax = fig.add_subplot(nrows, ncols, j + 1)
    for key, label in series:
      y = np.array([_value(r, key) for r in records], np.float64)
      ax.plot(x, y, marker="o", markersize=3, label=label)
    for i in changes:
      ax.axvline(i - 0.5, color="grey", linestyle=":", linewidth=0.8)
    ax.set_title(name)
    if name == "clusters":
      ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(x[::every], ticks[::every], rotation=45, ha="right", fontsize=7)
    ax.grid(alpha=0.3)
    if len(series) > 1:
      ax.legend(fontsize=8)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Not tempfile.mkstemp: its 0600 mode would survive os.replace; "xb" honours the umask.
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "xb") as f:
      fig.savefig(f, format="png", dpi=100)
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  return str(path)
