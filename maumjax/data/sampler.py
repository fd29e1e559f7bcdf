"""Cross-modality identity samplers (P identities x K visible + K infrared) and imbalance subsets.

Samplers with the same output (`EpochPlan`), chosen by `PipelineConfig.sampler` through
`SAMPLERS`:

* 'agw' (`IdentitySampler`, below): P random identities per step, K images of each modality
  drawn with replacement (AGW, MAUM; protocol.md §5.1).
* 'mpanet' (`MPANetSampler`): one pass over each identity's paired images (mpanet.md §2.3).
* 'cluster' (`ClusterSampler`): ClusterContrast's camera-aware `RandomMultipleGallerySampler`
  run independently per modality over pseudo-labels, with optional label columns sampled on
  alternate steps (MMM stages 1 and 2, mmm.md §5.3 and §5.5).
* 'all' (`AllSampler`): one shuffled pass over every record of each modality, RGB/IR pairs
  arbitrary (MMM's final-stage warm-up, mmm.md §7.2).
* 'pseudo' (`PseudoIdentitySampler`): the 'agw' draw over pseudo-identities that hold both
  modalities, with replacement when there are fewer than P (MMM's online stage).

`WarmupSampler` puts the 'all' sampler in front of any of them for the first epochs
(`PipelineConfig.warm_epochs`).

Every constructor takes the same arguments: labels, modality, and the keywords num_identities
(P), num_instances (K), seed, keep, steps_per_epoch and camera (per-record camera ids; only
'cluster' uses them). Labels are int [N]; 'cluster' and 'all' also take int [N, L] (label
columns, -1 = not sampled in that column), and 'agw' and 'mpanet' reject them.

The 'agw' sampler follows the AGW reference `IdentitySampler` (protocol.md §5.1):

1. N = max(number of visible training images, number of infrared training images);
2. an epoch has floor(N / (P*K)) + 1 steps;
3. each step draws P distinct identities uniformly, and for each identity, in order, K visible
   and K infrared images uniformly *with replacement*;
4. the result is two aligned index arrays (visible, infrared), identity-major: the K consecutive
   slots of one identity sit together, and slot i of both arrays belongs to the same identity.

Differences from the reference, all deliberate [I]:
* Randomness comes from an explicit `np.random.Generator` seeded with (seed, epoch), not
  NumPy's global generator, so an epoch can be rebuilt from its number alone (resumable runs).
* Identities are drawn from those with images in *either* modality. With the full SYSU-MM01 or
  RegDB training sets every identity has both, which is the reference's visible label set.
  Under the modality-imbalance setting (MAUM spec §10, variant B) some identities lose one
  modality; their slots of that modality are filled with a *substitute* identity that has it
  (drawn uniformly among those not already in the step), so the batch keeps its shape and
  every image carries its true label. The two arrays are then not label-aligned at those slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

VISIBLE, INFRARED = 0, 1


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """One epoch of sampled record indices.

  Attributes:
    visible: int64 [steps * P * K] record indices of the visible images.
    infrared: int64 [steps * P * K] record indices of the infrared images.
    steps: number of steps (batches) in the epoch.
    per_step: P * K, images of one modality per step.
  """

  visible: np.ndarray
  infrared: np.ndarray
  steps: int
  per_step: int


def _one_column(labels, name: str) -> np.ndarray:
  """int64 [N] labels, or a ValueError naming sampler `name` for label columns [N, L]."""
  labels = np.asarray(labels, np.int64)
  if labels.ndim == 2:
    raise ValueError(f"sampler {name!r} takes one label per record (int [N]); got label columns "
                     f"{labels.shape}. Use sampler='cluster' or 'all' for [N, L] labels")
  return labels


def _label_columns(labels, modality, keep, name: str):
  """Validated (labels int64 [N, L], modality int64 [N], kept bool [N]) of a column sampler.

  A record is kept when `keep` allows it and at least one of its columns is >= 0.
  """
  labels = np.asarray(labels, np.int64)
  modality = np.asarray(modality, np.int64)
  if labels.ndim == 1:
    labels = labels[:, None]
  if labels.ndim != 2 or labels.shape[1] < 1 or modality.shape != labels.shape[:1]:
    raise ValueError(f"sampler {name!r}: labels {labels.shape} must be int [N] or [N, L] and "
                     f"modality {modality.shape} int [N], one row per record")
  if labels.size and labels.min() < -1:
    raise ValueError(f"sampler {name!r}: label {int(labels.min())} below -1 (-1 leaves a record "
                     "out of a column)")
  kept = np.ones(modality.shape, bool) if keep is None else np.asarray(keep, bool)
  if kept.shape != modality.shape:
    raise ValueError(f"keep mask has shape {kept.shape}, expected {modality.shape}")
  return labels, modality, kept & np.any(labels >= 0, axis=1)


def _check_sizes(num_identities: int, num_instances: int, steps_per_epoch: int | None):
  if num_identities < 1 or num_instances < 1:
    raise ValueError(f"num_identities (P={num_identities}) and num_instances "
                     f"(K={num_instances}) must be >= 1")
  if steps_per_epoch is not None and steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")


def _index_lists(labels: np.ndarray, modality: np.ndarray, kept: np.ndarray):
  """Per-modality dict label -> sorted record indices, over the kept records."""
  lists = []
  for m in (VISIBLE, INFRARED):
    idx = np.flatnonzero(kept & (modality == m))
    order = np.argsort(labels[idx], kind="stable")
    idx = idx[order]
    uniq, starts = np.unique(labels[idx], return_index=True)
    lists.append(dict(zip(uniq.tolist(), np.split(idx, starts[1:]))))
  return lists


class IdentitySampler:
  """Builds the per-epoch index arrays of the P x K cross-modality sampler.

  Args:
    labels: int [N] contiguous training label of every record of the source.
    modality: int [N] 0 visible / 1 infrared for every record.
    num_identities: P, identities per step (reference default 8).
    num_instances: K, images per identity per modality (reference default 4).
    seed: run seed; epoch e uses `np.random.default_rng([seed, e])`.
    keep: optional bool [N] mask of usable records (modality-imbalance subsets, see
      `modality_subset`); all records when None.
    steps_per_epoch: a fixed epoch length (e.g. kept when a method relabels the data); None
      gives one pass over the larger modality, max(#visible, #infrared) // (P * K) + 1.
    camera: per-record camera ids; accepted for a common signature and ignored.

  Raises:
    ValueError: on 2-d labels, mismatched array lengths, P or K < 1, fewer than P identities,
      or a modality without any image.
  """

  def __init__(self, labels: Sequence[int] | np.ndarray, modality: Sequence[int] | np.ndarray,
               *, num_identities: int = 8, num_instances: int = 4, seed: int = 0,
               keep: np.ndarray | None = None, steps_per_epoch: int | None = None,
               camera: np.ndarray | None = None):
    del camera  # not camera-aware
    labels = _one_column(labels, "agw")
    modality = np.asarray(modality, np.int64)
    if labels.shape != modality.shape or labels.ndim != 1:
      raise ValueError(f"labels {labels.shape} and modality {modality.shape} must be equal-length "
                       "1-d arrays, one entry per record")
    if num_identities < 1 or num_instances < 1:
      raise ValueError(f"num_identities (P={num_identities}) and num_instances "
                       f"(K={num_instances}) must be >= 1")
    kept = np.ones(labels.shape, bool) if keep is None else np.asarray(keep, bool)
    if kept.shape != labels.shape:
      raise ValueError(f"keep mask has shape {kept.shape}, expected {labels.shape}")
    if np.any(labels[kept] < 0):
      raise ValueError("negative labels among the sampled records; the sampler needs the train "
                       "split (contiguous labels 0..C-1), not query/gallery records")
    self._lists = _index_lists(labels, modality, kept)
    for m, name in ((VISIBLE, "visible"), (INFRARED, "infrared")):
      if not self._lists[m]:
        raise ValueError(f"no {name} training images to sample from")
    self.identities = np.array(sorted(set(self._lists[0]) | set(self._lists[1])), np.int64)
    if len(self.identities) < num_identities:
      raise ValueError(f"num_identities P={num_identities} exceeds the {len(self.identities)} "
                       "training identities; lower --config.data.num_identities")
    self.num_identities = num_identities
    self.num_instances = num_instances
    self.seed = seed
    counts = [sum(len(v) for v in self._lists[m].values()) for m in (VISIBLE, INFRARED)]
    self.num_images = tuple(counts)
    self.per_step = num_identities * num_instances
    if steps_per_epoch is not None and steps_per_epoch < 1:
      raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
    self.steps_per_epoch = (max(counts) // self.per_step + 1 if steps_per_epoch is None
                            else int(steps_per_epoch))

  def epoch(self, epoch: int) -> EpochPlan:
    """Returns the index arrays of `epoch` (deterministic in (seed, epoch))."""
    rng = np.random.default_rng([self.seed, epoch])
    p, k = self.num_identities, self.num_instances
    out = np.empty((2, self.steps_per_epoch, p, k), np.int64)
    has = [np.array([int(c) in self._lists[m] for c in self.identities]) for m in (0, 1)]
    for s in range(self.steps_per_epoch):
      chosen = rng.choice(self.identities, size=p, replace=False)
      for j, label in enumerate(chosen.tolist()):
        for m in (VISIBLE, INFRARED):
          pool = self._lists[m].get(label)
          if pool is None:
            # Imbalance variant B: this identity has no image of modality m.
            free = self.identities[has[m] & ~np.isin(self.identities, chosen)]
            if free.size == 0:
              free = self.identities[has[m]]
            pool = self._lists[m][int(rng.choice(free))]
          out[m, s, j] = rng.choice(pool, size=k, replace=True)
    flat = out.reshape(2, -1)
    return EpochPlan(flat[0], flat[1], self.steps_per_epoch, self.per_step)


class MPANetSampler:
  """MPANet's identity sampler (mpanet.md §2.3): an epoch is one pass over paired chunks.

  Per pass, for every identity with images of both modalities:
  1. if both its lists are shorter than K, both are up-sampled with replacement to K;
     otherwise the longer one is sub-sampled without replacement to the shorter one's length,
     so the identity gives min(#visible, #infrared) images per modality;
  2. both lists are shuffled and cut into chunks of K (a shorter remainder is dropped), chunk i
     pairing K visible with K infrared images of the identity;
  3. P distinct identities with chunks left are drawn uniformly and give one chunk each, until
     fewer than P identities have chunks left.

  The released code's batch of K_code images per identity is K = K_code / 2 per modality here
  (SYSU: P = 16, K = 4). Every step holds P whole identities, K + K images each, in the
  identity-major `EpochPlan` layout of `IdentitySampler`.

  Epoch length [I]: how many steps a pass gives depends on the draws in step 3, but the trainer
  needs a fixed epoch length. `steps_per_epoch` is the length of the pass drawn for epoch 0
  (a deterministic function of the data and the seed); an epoch whose pass is shorter continues
  with a fresh pass (same generator) and a longer one is cut, so each epoch is about one full
  pass, never an estimate counting one modality only (the code's issue #11, mpanet.md §2.3).

  Args: as `IdentitySampler` (num_identities P, num_instances K per modality, seed, keep,
    steps_per_epoch: None for the epoch-0 pass length; camera ignored).

  Raises:
    ValueError: 2-d labels, mismatched arrays, P or K < 1, or fewer than P identities with a
      chunk.
  """

  def __init__(self, labels: Sequence[int] | np.ndarray, modality: Sequence[int] | np.ndarray,
               *, num_identities: int = 16, num_instances: int = 4, seed: int = 0,
               keep: np.ndarray | None = None, steps_per_epoch: int | None = None,
               camera: np.ndarray | None = None):
    del camera  # not camera-aware
    labels = _one_column(labels, "mpanet")
    base = IdentitySampler(labels, modality, num_identities=num_identities,
                           num_instances=num_instances, seed=seed, keep=keep,
                           steps_per_epoch=steps_per_epoch)  # the same checks
    self._lists = base._lists
    both = sorted(set(self._lists[VISIBLE]) & set(self._lists[INFRARED]))
    self.identities = np.array(both, np.int64)
    self.num_identities, self.num_instances, self.seed = num_identities, num_instances, seed
    self.num_images, self.per_step = base.num_images, base.per_step
    chunked = [c for c in both if self._chunks(c) > 0]
    if len(chunked) < num_identities:
      raise ValueError(f"num_identities P={num_identities} exceeds the {len(chunked)} "
                       f"identities with at least K={num_instances} images of each modality (or "
                       "fewer than K of both); lower --config.data.pipeline.num_identities")
    self.steps_per_epoch = (len(self._pass(np.random.default_rng([seed, 0])))
                            if steps_per_epoch is None else int(steps_per_epoch))

  def _chunks(self, label: int) -> int:
    n_vis, n_ir = len(self._lists[VISIBLE][label]), len(self._lists[INFRARED][label])
    k = self.num_instances
    return 1 if n_vis < k and n_ir < k else min(n_vis, n_ir) // k

  def _pass(self, rng: np.random.Generator) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """One pass: a list of steps, each P (visible chunk, infrared chunk) pairs."""
    k, chunks = self.num_instances, {}
    for label in self.identities.tolist():
      vis, ir = self._lists[VISIBLE][label], self._lists[INFRARED][label]
      if len(vis) < k and len(ir) < k:
        vis, ir = rng.choice(vis, k, replace=True), rng.choice(ir, k, replace=True)
      else:
        n = min(len(vis), len(ir))
        vis, ir = rng.choice(vis, n, replace=False), rng.choice(ir, n, replace=False)
      chunks[label] = [(vis[i * k:(i + 1) * k], ir[i * k:(i + 1) * k])
                       for i in range(len(vis) // k)]
    steps = []
    while True:
      available = np.array([c for c in self.identities.tolist() if chunks[c]], np.int64)
      if available.size < self.num_identities:
        return steps
      chosen = rng.choice(available, size=self.num_identities, replace=False)
      steps.append([chunks[c].pop(0) for c in chosen.tolist()])

  def epoch(self, epoch: int) -> EpochPlan:
    """Returns the index arrays of `epoch` (deterministic in (seed, epoch))."""
    rng = np.random.default_rng([self.seed, epoch])
    steps: list = []
    while len(steps) < self.steps_per_epoch:
      steps += self._pass(rng)
    steps = steps[:self.steps_per_epoch]
    vis = np.array([[v for v, _ in step] for step in steps], np.int64)
    ir = np.array([[i for _, i in step] for step in steps], np.int64)
    return EpochPlan(vis.reshape(-1), ir.reshape(-1), self.steps_per_epoch, self.per_step)


class ClusterSampler:
  """ClusterContrast's camera-aware `RandomMultipleGallerySampler`, per modality (mmm.md §5.3).

  For each modality separately (visible indices from visible records, infrared indices from
  infrared records; the two modalities' label values need not be related, as in MMM stage 1
  where they are separate cluster spaces), a stream of chunks of K record indices:

  1. the modality's pseudo-ids (labels >= 0 among its kept records) in a random order; per id
  2. one random anchor image, then K - 1 more images of the id, drawn from its images of
     *other cameras* than the anchor's when any exist, otherwise from its other images. Either
     way the draw is without replacement when at least K candidates exist and with
     replacement otherwise: the reference tests `len(candidates) >= num_instances`, so K - 1
     candidates (just enough) are still drawn with replacement. An id with a single image
     repeats it K times (the reference emits the lone anchor and moves on, which shifts every
     later batch's identity boundaries [I]).
  3. Each step takes the next P chunks. The reference's loader drops the last incomplete batch
     (`drop_last=True`) and restarts with a new order, so a pass gives floor(#ids / P) steps
     and the remainder ids wait for a later pass; each id appears at most once per pass. With
     fewer than P ids, passes are chained so a step still holds P chunks [I].

  Every epoch starts a new stream (the reference makes new loaders after each epoch's
  re-clustering), drawn from `np.random.default_rng([seed, epoch])`.

  Label columns: with labels int [N, L] (MMM stage 2: column 0 the per-modality cluster, column 1
  the joint cross-modality cluster; -1 = not in that column) step s samples column s % L from
  that column's own streams, so an epoch of L * iters steps is `iters` iterations of L optimiser
  steps (§5.5). A record is sampled by column c only when its label in c is >= 0.

  Args:
    labels: int [N] or [N, L] pseudo-labels (-1: left out).
    modality: int [N] 0 visible / 1 infrared.
    num_identities: P, pseudo-ids per step and modality (MMM: 8).
    num_instances: K, images per pseudo-id (MMM: 16).
    seed: run seed.
    keep: optional bool [N] mask of usable records.
    steps_per_epoch: fixed epoch length (a multiple of L); None gives
      L * ceil(max over modalities of #ids in column 0 / P).
    camera: int [N] camera ids; None treats every record as one camera (no other-camera draw).

  Raises:
    ValueError: bad shapes, labels below -1, P or K < 1, a steps_per_epoch that is not a
      multiple of L, or a column and modality without any pseudo-id.
  """

  def __init__(self, labels: Sequence[int] | np.ndarray, modality: Sequence[int] | np.ndarray,
               *, num_identities: int = 8, num_instances: int = 16, seed: int = 0,
               keep: np.ndarray | None = None, steps_per_epoch: int | None = None,
               camera: np.ndarray | None = None):
    labels, modality, kept = _label_columns(labels, modality, keep, "cluster")
    _check_sizes(num_identities, num_instances, steps_per_epoch)
    camera = (np.zeros(modality.shape, np.int64) if camera is None
              else np.asarray(camera, np.int64))
    if camera.shape != modality.shape:
      raise ValueError(f"camera has shape {camera.shape}, expected {modality.shape}")
    self.num_identities, self.num_instances, self.seed = num_identities, num_instances, seed
    self.per_step = num_identities * num_instances
    self.columns = labels.shape[1]
    self.num_images = tuple(int(np.sum(kept & (modality == m))) for m in (VISIBLE, INFRARED))
    # _pools[c][m]: per pseudo-id of column c and modality m, (record indices, their cameras).
    self._pools = []
    for c in range(self.columns):
      pools = []
      for m, name in ((VISIBLE, "visible"), (INFRARED, "infrared")):
        lists = _index_lists(labels[:, c], modality, kept & (labels[:, c] >= 0))[m]
        if not lists:
          raise ValueError(f"sampler 'cluster': no {name} record with a label >= 0 in label "
                           f"column {c}; nothing to sample")
        pools.append([(idx, camera[idx]) for _, idx in sorted(lists.items())])
      self._pools.append(pools)
    self.num_pseudo_ids = tuple(tuple(len(p) for p in pools) for pools in self._pools)
    if steps_per_epoch is None:
      steps_per_epoch = self.columns * -(-max(self.num_pseudo_ids[0]) // num_identities)
    elif steps_per_epoch % self.columns:
      raise ValueError(f"sampler 'cluster': steps_per_epoch={steps_per_epoch} must be a multiple "
                       f"of the {self.columns} label columns (one step per column in turn)")
    self.steps_per_epoch = int(steps_per_epoch)

  def _chunk(self, rng: np.random.Generator, idx: np.ndarray, cams: np.ndarray) -> np.ndarray:
    """K indices of one pseudo-id: a random anchor, then K - 1 others (see the class doc)."""
    k = self.num_instances
    anchor = int(rng.integers(idx.size))
    others = np.flatnonzero(np.arange(idx.size) != anchor)
    candidates = others[cams[others] != cams[anchor]]
    if candidates.size == 0:
      candidates = others
    if candidates.size == 0:
      return np.full(k, idx[anchor], np.int64)
    picks = rng.choice(candidates, size=k - 1, replace=candidates.size < k)
    return np.concatenate([idx[anchor:anchor + 1], idx[picks]])

  def _stream(self, rng: np.random.Generator, pools: list, steps: int) -> np.ndarray:
    """int64 [steps, P, K]: the first `steps` steps of one modality's chunk stream."""
    p = self.num_identities
    out, carry = [], []
    while len(out) < steps:
      chunks = [self._chunk(rng, *pools[i]) for i in rng.permutation(len(pools)).tolist()]
      if len(chunks) >= p:
        out += [chunks[s * p:(s + 1) * p] for s in range(len(chunks) // p)]
      else:
        carry += chunks
        while len(carry) >= p:
          out.append(carry[:p])
          del carry[:p]
    return np.asarray(out[:steps], np.int64).reshape(steps, p, self.num_instances)

  def epoch(self, epoch: int) -> EpochPlan:
    """Returns the index arrays of `epoch` (deterministic in (seed, epoch))."""
    rng = np.random.default_rng([self.seed, epoch])
    per_column = self.steps_per_epoch // self.columns
    out = np.empty((2, self.steps_per_epoch, self.num_identities, self.num_instances), np.int64)
    for c, pools in enumerate(self._pools):
      for m in (VISIBLE, INFRARED):
        out[m, c::self.columns] = self._stream(rng, pools[m], per_column)
    flat = out.reshape(2, -1)
    return EpochPlan(flat[0], flat[1], self.steps_per_epoch, self.per_step)


class AllSampler:
  """One shuffled pass over every kept record of each modality (MMM's warm-up, mmm.md §7.2).

  Per pass: the kept visible records (any label column >= 0) and the kept infrared records are
  shuffled independently; both lists are padded with random duplicates of their own records
  (without replacement while the list has enough records) to the same multiple of P * K, the
  length of the longer list rounded up, and cut into steps of P * K per modality. RGB/IR pairs,
  and the identities within a step, are arbitrary: the losses of this phase (plain CE) need no
  identity structure. The reference pads with duplicates of the *first* indices of each list
  (SYSU: 0..13); random duplicates spread the extra weight [I].

  An epoch has ceil(max(#visible, #infrared) / (P * K)) steps, one pass; a fixed
  `steps_per_epoch` cuts the pass or continues with a new shuffled pass.

  Args: as `ClusterSampler` (labels int [N] or [N, L], camera ignored).

  Raises:
    ValueError: bad shapes, labels below -1, P or K < 1, or a modality without a kept record.
  """

  def __init__(self, labels: Sequence[int] | np.ndarray, modality: Sequence[int] | np.ndarray,
               *, num_identities: int = 8, num_instances: int = 4, seed: int = 0,
               keep: np.ndarray | None = None, steps_per_epoch: int | None = None,
               camera: np.ndarray | None = None):
    del camera
    labels, modality, kept = _label_columns(labels, modality, keep, "all")
    _check_sizes(num_identities, num_instances, steps_per_epoch)
    self._idx = [np.flatnonzero(kept & (modality == m)) for m in (VISIBLE, INFRARED)]
    for m, name in ((VISIBLE, "visible"), (INFRARED, "infrared")):
      if self._idx[m].size == 0:
        raise ValueError(f"sampler 'all': no {name} record with a label >= 0 to sample")
    self.num_identities, self.num_instances, self.seed = num_identities, num_instances, seed
    self.per_step = num_identities * num_instances
    self.num_images = tuple(int(i.size) for i in self._idx)
    self.steps_per_epoch = (-(-max(self.num_images) // self.per_step) if steps_per_epoch is None
                            else int(steps_per_epoch))

  def _pass(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One pass: (visible, infrared) index lists of equal length, a multiple of P * K."""
    n = -(-max(self.num_images) // self.per_step) * self.per_step
    out = []
    for idx in self._idx:
      order = rng.permutation(idx)
      extra = n - idx.size
      pad = rng.choice(idx, size=extra, replace=extra > idx.size)
      out.append(np.concatenate([order, pad]))
    return out[0], out[1]

  def epoch(self, epoch: int) -> EpochPlan:
    """Returns the index arrays of `epoch` (deterministic in (seed, epoch))."""
    rng = np.random.default_rng([self.seed, epoch])
    total = self.steps_per_epoch * self.per_step
    vis, ir, have = [], [], 0
    while have < total:
      v, i = self._pass(rng)
      vis.append(v)
      ir.append(i)
      have += v.size
    return EpochPlan(np.concatenate(vis)[:total].astype(np.int64),
                     np.concatenate(ir)[:total].astype(np.int64), self.steps_per_epoch,
                     self.per_step)


class WarmupSampler:
  """Draws epochs [0, warm_epochs) from `warm` and later epochs from `main`.

  MMM's final stage trains its first epochs on every record (`AllSampler`, mmm.md §7.2) and
  then switches to the identity sampler; the trainer needs one epoch length, so the warm-up
  sampler must have the main sampler's `steps_per_epoch` and `per_step`. Other attributes
  (`num_images`, ...) are the main sampler's.

  Raises:
    ValueError: warm_epochs < 0, or `warm` with another epoch length or step size.
  """

  def __init__(self, main, warm, warm_epochs: int):
    if warm_epochs < 0:
      raise ValueError(f"warm_epochs={warm_epochs} must be >= 0")
    if (warm.steps_per_epoch, warm.per_step) != (main.steps_per_epoch, main.per_step):
      raise ValueError(f"warm-up sampler has {warm.steps_per_epoch} steps of {warm.per_step}, "
                       f"the main one {main.steps_per_epoch} of {main.per_step}; they must agree")
    self.main, self.warm, self.warm_epochs = main, warm, int(warm_epochs)
    self.steps_per_epoch, self.per_step = main.steps_per_epoch, main.per_step

  def __getattr__(self, name: str):
    if name.startswith("__") or name in ("main", "warm", "warm_epochs"):
      raise AttributeError(name)  # also keeps unpickling from recursing
    return getattr(self.main, name)

  def epoch(self, epoch: int) -> EpochPlan:
    """The warm-up sampler's plan for epochs below `warm_epochs`, else the main one's."""
    return (self.warm if epoch < self.warm_epochs else self.main).epoch(epoch)


class PseudoIdentitySampler(IdentitySampler):
  """The 'agw' P x K cross-modality draw over pseudo-labels (MMM's online stage, mmm.md §9
  row 9: 8 pseudo-ids x (4 visible + 4 infrared)).

  Differences from `IdentitySampler` [I], for labels that come from a clustering: only the
  labels with kept images of both modalities are drawn (a cluster of one modality has no
  cross-modality partner for the pair-wise terms; its records sit the epoch out), and when
  fewer than P such labels exist (early unsupervised epochs) a step draws them with
  replacement instead of failing. Same arguments and epoch length as `IdentitySampler`.

  Raises:
    ValueError: no label has images of both modalities, or the `IdentitySampler` errors.
  """

  def __init__(self, labels: Sequence[int] | np.ndarray, modality: Sequence[int] | np.ndarray,
               *, num_identities: int = 8, num_instances: int = 4, seed: int = 0,
               keep: np.ndarray | None = None, steps_per_epoch: int | None = None,
               camera: np.ndarray | None = None):
    labels = _one_column(labels, "pseudo")
    modality = np.asarray(modality, np.int64)
    kept = np.ones(labels.shape, bool) if keep is None else np.asarray(keep, bool)
    if labels.shape != modality.shape or kept.shape != labels.shape:
      raise ValueError(f"labels {labels.shape}, modality {modality.shape} and keep "
                       f"{kept.shape} must be equal-length 1-d arrays")
    kept = kept & (labels >= 0)
    both = np.intersect1d(labels[kept & (modality == VISIBLE)],
                          labels[kept & (modality == INFRARED)])
    if both.size == 0:
      raise ValueError("sampler 'pseudo': no pseudo-label holds images of both modalities; "
                       "nothing to pair")
    super().__init__(labels, modality, num_identities=min(num_identities, both.size),
                     num_instances=num_instances, seed=seed, keep=kept & np.isin(labels, both),
                     steps_per_epoch=steps_per_epoch, camera=camera)
    if steps_per_epoch is None:  # the epoch length counts every kept record, as 'agw'
      counts = [int(np.sum(kept & (modality == m))) for m in (VISIBLE, INFRARED)]
      self.steps_per_epoch = max(counts) // (num_identities * num_instances) + 1
    self.num_identities = num_identities
    self.per_step = num_identities * num_instances

  def epoch(self, epoch: int) -> EpochPlan:
    """Returns the index arrays of `epoch` (deterministic in (seed, epoch))."""
    rng = np.random.default_rng([self.seed, epoch])
    p, k = self.num_identities, self.num_instances
    replace = len(self.identities) < p
    out = np.empty((2, self.steps_per_epoch, p, k), np.int64)
    for s in range(self.steps_per_epoch):
      chosen = rng.choice(self.identities, size=p, replace=replace)
      for j, label in enumerate(chosen.tolist()):
        for m in (VISIBLE, INFRARED):
          out[m, s, j] = rng.choice(self._lists[m][label], size=k, replace=True)
    flat = out.reshape(2, -1)
    return EpochPlan(flat[0], flat[1], self.steps_per_epoch, self.per_step)


SAMPLERS = {"agw": IdentitySampler, "mpanet": MPANetSampler, "cluster": ClusterSampler,
            "all": AllSampler, "pseudo": PseudoIdentitySampler}


def modality_subset(labels: np.ndarray, modality: np.ndarray, *, fraction: float,
                    reduce_modality: int = INFRARED, unit: str = "images",
                    seed: int = 0) -> np.ndarray:
  """Keep mask for the modality-imbalance setting (MAUM spec §10).

  Args:
    labels: int [N] training labels.
    modality: int [N] 0 visible / 1 infrared.
    fraction: rho in (0, 1]; 1 keeps everything.
    reduce_modality: the modality that loses data (1 infrared, the paper's case; 0 visible).
    unit: 'images' (variant A: every identity keeps round(rho * n) of its images of that
      modality, at least one) or 'identities' (variant B: only round(rho * C) identities, at
      least one, keep their images of that modality; the others keep none).
    seed: subset seed, independent of the sampler's.

  Returns:
    bool [N] mask; records of the other modality are always kept.

  Raises:
    ValueError: fraction outside (0, 1], unknown unit or modality.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"imbalance fraction {fraction!r} must be in (0, 1]")
  if unit not in ("images", "identities"):
    raise ValueError(f"imbalance unit {unit!r} must be 'images' or 'identities'")
  if reduce_modality not in (VISIBLE, INFRARED):
    raise ValueError(f"reduce_modality {reduce_modality!r} must be 0 (visible) or 1 (infrared)")
  labels = np.asarray(labels)
  modality = np.asarray(modality)
  keep = np.ones(labels.shape, bool)
  if fraction == 1.0:
    return keep
  rng = np.random.default_rng([seed, reduce_modality, 1 if unit == "images" else 2])
  target = modality == reduce_modality
  ids = np.unique(labels[target])
  if unit == "images":
    for label in ids:
      idx = np.flatnonzero(target & (labels == label))
      n_keep = max(1, int(round(fraction * idx.size)))
      dropped = rng.permutation(idx)[n_keep:]
      keep[dropped] = False
  else:
    n_keep = max(1, int(round(fraction * ids.size)))
    kept_ids = rng.permutation(ids)[:n_keep]
    keep[target & ~np.isin(labels, kept_ids)] = False
  return keep
