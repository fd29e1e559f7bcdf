"""Cross-modality identity samplers (P identities x K visible + K infrared) and imbalance subsets.

Two samplers with the same output (`EpochPlan`), chosen by `PipelineConfig.sampler` through
`SAMPLERS`: 'agw' (`IdentitySampler`, below) and 'mpanet' (`MPANetSampler`, one pass over each
identity's paired images, mpanet.md §2.3).

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

  Raises:
    ValueError: on mismatched array lengths, P or K < 1, fewer than P identities, or a modality
      without any image.
  """

  def __init__(self, labels: Sequence[int] | np.ndarray, modality: Sequence[int] | np.ndarray,
               *, num_identities: int = 8, num_instances: int = 4, seed: int = 0,
               keep: np.ndarray | None = None, steps_per_epoch: int | None = None):
    labels = np.asarray(labels, np.int64)
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
    steps_per_epoch: None for the epoch-0 pass length).

  Raises:
    ValueError: mismatched arrays, P or K < 1, or fewer than P identities with a chunk.
  """

  def __init__(self, labels: Sequence[int] | np.ndarray, modality: Sequence[int] | np.ndarray,
               *, num_identities: int = 16, num_instances: int = 4, seed: int = 0,
               keep: np.ndarray | None = None, steps_per_epoch: int | None = None):
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


SAMPLERS = {"agw": IdentitySampler, "mpanet": MPANetSampler}


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
