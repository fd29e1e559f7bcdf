"""Training input pipeline: TFDS data source -> identity sampler -> Grain -> batches.

Shape of one step (protocol.md §5.1; stack.md §6.2):

  sampler (P identities x K per modality, seeded by (seed, epoch))
    -> element = one (visible, infrared) pair of record indices
    -> Grain map: read both images (from the array_record source, or from a RAM cache of
       decoded images), draw augmentation parameters from (seed, epoch, slot), and either apply
       them on the host (`augment_on='host'`) or ship uint8 images plus the parameters for the
       jitted step to apply (`augment_on='device'`, see `device_augment`)
    -> batch of P*K pairs per host: {'rgb': {...}, 'ir': {...}}, identity-major, so an even
       split along axis 0 gives every device whole identities with both modalities.

Everything random is a pure function of (seed, epoch, slot), independent of worker count,
thread timing and sharding, so a run resumes exactly from the iterator's state (a few bytes of
JSON, see `TrainIterator.get_state`), and a multi-host run sees the same global batch as a
single-host one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from maumjax.data import augment as augment_lib
from maumjax.data import images
from maumjax.data import sampler as sampler_lib

AUGMENT_ON = ("host", "device")
CACHE_MODES = ("none", "ram")
META_KEYS = ("label", "identity", "camera", "modality")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Input pipeline settings; every field is a switch with the reference default.

  Attributes:
    num_identities: P, identities per step (AGW: 8).
    num_instances: K, images per identity per modality (AGW: 4).
    augment_rgb: augmentation preset name (see `maumjax.data.augment.PRESETS`) for visible
      images; 'agw' is pad 10 + random crop + flip.
    augment_ir: the same for infrared images.
    augment_on: 'device' (default) ships uint8 images plus parameters and `device_augment`
      applies them inside the jitted step; 'host' applies them in the loader (float32
      batches). Measured on 2 CPU cores at 288x144 (README, Performance): host augmentation
      costs about a third of the loader's time (normalising alone is 0.4 ms per image) and
      quadruples the bytes sent to the accelerator, while on the device it is a few fused
      elementwise ops.
    cache: 'none' decodes every image when it is read; 'ram' decodes the whole training split
      once into a uint8 array (SYSU-MM01 at 288x144 is about 4.2 GB).
    num_threads: Grain read threads (batches prepared concurrently).
    num_workers: Grain worker processes (0: threads only). Processes copy the RAM cache, so
      use threads with cache='ram'.
    prefetch: batches kept ready ahead of the consumer.
    imbalance_fraction: rho for the modality-imbalance setting (1.0 = balanced, off).
    imbalance_modality: modality that loses data (1 infrared, 0 visible).
    imbalance_unit: 'images' (variant A) or 'identities' (variant B), see
      `maumjax.data.sampler.modality_subset`.
    seed: seed of the sampler, the augmentation and the imbalance subset.
    sampler: 'agw' (`sampler.IdentitySampler`: P random identities per step, K images of each
      modality drawn with replacement; AGW, MAUM), 'mpanet' (`sampler.MPANetSampler`: one
      pass over every identity's paired K + K chunks per epoch; MPANet), 'cluster'
      (`sampler.ClusterSampler`: camera-aware P x K chunks of pseudo-ids, per modality, label
      columns on alternate steps; MMM stages 1 and 2), 'all' (`sampler.AllSampler`: one
      shuffled pass over every record, arbitrary pairs; MMM's warm-up) or 'pseudo'
      (`sampler.PseudoIdentitySampler`: 'agw' over the pseudo-labels holding both
      modalities, with replacement below P of them; MMM's online stage).
    steps_per_epoch: epoch length; 0 keeps the sampler's own (its docstring gives the
      formula), > 0 fixes it (e.g. MMM's `--iters`, doubled for stage 2's two steps per
      iteration). The `steps_per_epoch` argument of `make_train_pipeline` wins when given.
    epoch_fraction: the epoch is this fraction (> 0) of the length above (the sampler's own
      or `steps_per_epoch`), at least one step: 0.5 halves every run's steps and keeps its
      schedule, which counts in epochs (a shorter budget of the same shape). A length given
      to `make_train_pipeline` is used as it is.
    warm_epochs: epochs [0, warm_epochs) are drawn by the 'all' sampler whatever `sampler`
      says, with the main sampler's epoch length (MMM final stage's CE warm-up, mmm.md §7.2);
      0 is off.
  """

  num_identities: int = 8
  num_instances: int = 4
  augment_rgb: str = "agw"
  augment_ir: str = "agw"
  augment_on: str = "device"
  cache: str = "none"
  num_threads: int = 4
  num_workers: int = 0
  prefetch: int = 4
  imbalance_fraction: float = 1.0
  imbalance_modality: int = sampler_lib.INFRARED
  imbalance_unit: str = "images"
  seed: int = 0
  sampler: str = "agw"
  steps_per_epoch: int = 0
  epoch_fraction: float = 1.0
  warm_epochs: int = 0

  def __post_init__(self):
    if self.sampler not in sampler_lib.SAMPLERS:
      raise ValueError(f"sampler={self.sampler!r}; choose one of {tuple(sampler_lib.SAMPLERS)}")
    if self.augment_on not in AUGMENT_ON:
      raise ValueError(f"augment_on={self.augment_on!r}; choose one of {AUGMENT_ON}")
    if self.cache not in CACHE_MODES:
      raise ValueError(f"cache={self.cache!r}; choose one of {CACHE_MODES}")
    for name in ("augment_rgb", "augment_ir"):
      augment_lib.preset(getattr(self, name))  # raises with the valid names
    if self.num_threads < 1 or self.num_workers < 0 or self.prefetch < 1:
      raise ValueError(f"num_threads={self.num_threads} (>= 1), num_workers={self.num_workers} "
                       f"(>= 0), prefetch={self.prefetch} (>= 1) out of range")
    if self.steps_per_epoch < 0 or self.warm_epochs < 0:
      raise ValueError(f"steps_per_epoch={self.steps_per_epoch} and warm_epochs="
                       f"{self.warm_epochs} must be >= 0 (0: the sampler's own length / no "
                       "warm-up)")
    if not self.epoch_fraction > 0:
      raise ValueError(f"epoch_fraction={self.epoch_fraction} must be > 0 (1.0: whole epochs)")


def read_metadata(source: Sequence[dict[str, Any]], *, chunk: int = 1024) -> dict[str, np.ndarray]:
  """Reads label, identity, camera and modality of every record, as int64 arrays.

  `source` should skip image decoding (`tfds.decode.SkipDecoding()`), as
  `open_train_source` arranges, so this reads bytes but decodes nothing.
  """
  cols = {k: [] for k in META_KEYS}
  getitems = getattr(source, "__getitems__", None)
  for start in range(0, len(source), chunk):
    keys = range(start, min(start + chunk, len(source)))
    rows = getitems(list(keys)) if getitems else [source[i] for i in keys]
    for row in rows:
      for k in META_KEYS:
        cols[k].append(int(row[k]))
  return {k: np.asarray(v, np.int64) for k, v in cols.items()}


def read_paths(source: Sequence[dict[str, Any]], *, chunk: int = 1024) -> np.ndarray:
  """The 'path' of every record, in record order (str [N]): the key under which a method
  stores per-record results (MMM's pseudo-labels), so they never depend on record order."""
  paths = []
  getitems = getattr(source, "__getitems__", None)
  for start in range(0, len(source), chunk):
    keys = range(start, min(start + chunk, len(source)))
    for row in (getitems(list(keys)) if getitems else [source[i] for i in keys]):
      p = row["path"]
      paths.append(p.decode() if isinstance(p, bytes) else str(p))
  return np.asarray(paths, dtype=str)


class ImageStore:
  """uint8 images of a record source by index, decoded on read or from a RAM cache.

  Args:
    source: random-access records whose 'image' is encoded bytes (or already an array).
    cache_indices: records to decode up front into one array (cache='ram'); None decodes on
      every read.
    num_threads: threads used to fill the cache (PIL releases the GIL while decoding).
  """

  def __init__(self, source: Sequence[dict[str, Any]], *,
               cache_indices: np.ndarray | None = None, num_threads: int = 0):
    self._source = source
    self._cache = None
    self._slot = None
    if cache_indices is not None:
      cache_indices = np.unique(np.asarray(cache_indices, np.int64))
      first = self._decode(cache_indices[0])
      self._cache = np.empty((len(cache_indices),) + first.shape, np.uint8)
      self._slot = np.full(len(source), -1, np.int64)
      self._slot[cache_indices] = np.arange(len(cache_indices))

      def fill(pos):
        img = self._decode(cache_indices[pos])
        if img.shape != first.shape:
          raise ValueError(f"record {int(cache_indices[pos])} has image shape {img.shape}, "
                           f"expected {first.shape}; the RAM cache needs one image size")
        self._cache[pos] = img

      workers = num_threads or min(8, os.cpu_count() or 1)
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, range(len(cache_indices))))

  @property
  def cached_bytes(self) -> int:
    return 0 if self._cache is None else self._cache.nbytes

  def _decode(self, index) -> np.ndarray:
    image = self._source[int(index)]["image"]
    return image if isinstance(image, np.ndarray) else images.decode_image(image)

  def __getitem__(self, index: int) -> np.ndarray:
    if self._cache is not None:
      slot = self._slot[index]
      if slot >= 0:
        return self._cache[slot]
    return self._decode(index)


class _Elements:
  """Random-access sequence of (epoch, global slot, visible index, infrared index).

  Element g of this host is slot j of step s of epoch e, where a step holds `local` pairs of
  this host; the global slot is `s * per_step + shard_index * local + j`.
  """

  def __init__(self, sampler: Any, num_epochs: int, shard_index: int,
               shard_count: int, start_epoch: int = 0):
    self._sampler = sampler
    self._start = start_epoch
    self._num_epochs = num_epochs
    self._shard = shard_index
    self.local = sampler.per_step // shard_count
    self.per_epoch = sampler.steps_per_epoch * self.local
    self._plans: dict[int, sampler_lib.EpochPlan] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_lock"] = None
    state["_plans"] = {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._num_epochs * self.per_epoch

  def _plan(self, epoch: int) -> sampler_lib.EpochPlan:
    with self._lock:
      plan = self._plans.get(epoch)
      if plan is None:
        plan = self._sampler.epoch(epoch)
        # Keep two epochs: prefetch threads may straddle an epoch boundary.
        self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
        self._plans[epoch] = plan
      return plan

  def __getitem__(self, g: int) -> tuple[int, int, int, int]:
    if not 0 <= g < len(self):
      raise IndexError(g)
    epoch = self._start + g // self.per_epoch
    step, j = divmod(g % self.per_epoch, self.local)
    slot = step * self._sampler.per_step + self._shard * self.local + j
    plan = self._plan(epoch)
    return epoch, slot, int(plan.visible[slot]), int(plan.infrared[slot])


class _LoadPair:
  """Grain map: element -> {'rgb': {...}, 'ir': {...}, 'epoch', 'slot'} for one pair."""

  def __init__(self, store: ImageStore, meta: dict[str, np.ndarray], aug_rgb, aug_ir,
               on_device: bool, seed: int):
    self._store = store
    self._meta = meta
    self._aug = (aug_rgb, aug_ir)
    self._on_device = on_device
    self._seed = seed

  def __call__(self, element):
    epoch, slot, idx_rgb, idx_ir = element
    out = {"epoch": np.int32(epoch), "slot": np.int32(slot)}
    for m, (name, index) in enumerate((("rgb", idx_rgb), ("ir", idx_ir))):
      image = self._store[index]
      cfg = self._aug[m]
      rng = np.random.default_rng([self._seed, epoch, slot, m])
      params = augment_lib.draw_params(rng, cfg, image.shape[0], image.shape[1])
      record = {}
      for k in META_KEYS:
        value = self._meta[k][index]  # a row for label columns [N, L]
        record[k] = value.astype(np.int32) if isinstance(value, np.ndarray) else np.int32(value)
      record["index"] = np.int32(index)
      if self._on_device:
        record["image"] = image
        record["aug"] = params
      else:
        record["image"] = augment_lib.apply_numpy(image, params, cfg)
      out[name] = record
    return out


def device_augment(batch: dict[str, Any], config: PipelineConfig, *,
                   keep_pixels: bool = False) -> dict[str, Any]:
  """Applies the shipped augmentation parameters to uint8 images, inside a jitted step.

  With `augment_on='host'` the batch is returned unchanged. Otherwise each modality's
  'image' becomes the float32 normalised, augmented image, exactly as the host path computes
  it (`maumjax.data.augment.apply_jax` equals `apply_numpy`).

  Args:
    batch: one device's batch, `{'rgb': {'image' uint8, 'aug', ...}, 'ir': {...}, ...}`.
    config: the pipeline config (augmentation presets, `augment_on`).
    keep_pixels: also keep, per modality, 'raw' (the shipped uint8 images), 'pixels' (the
      augmented uint8 pixels before normalisation, `augment.apply_jax_pixels`) and 'aug' (the
      parameters), for a method that makes more inputs from them on the device (BDF).

  Raises:
    ValueError: `keep_pixels` with `augment_on='host'` (the batch holds no pixels then).
  """
  if config.augment_on == "host":
    if keep_pixels:
      raise ValueError("this method derives images from the augmented pixels on the device; "
                       "set data.pipeline.augment_on='device' (it is 'host')")
    return batch
  out = dict(batch)
  for name, preset in (("rgb", config.augment_rgb), ("ir", config.augment_ir)):
    part = dict(batch[name])
    cfg = augment_lib.preset(preset)
    aug = part.pop("aug")
    pixels = augment_lib.apply_jax_pixels(part["image"], aug, cfg)
    if keep_pixels:
      part.update(raw=part["image"], pixels=pixels, aug=aug)
    part["image"] = augment_lib.apply_jax_tensor(pixels, aug, cfg)
    out[name] = part
  return out


class TrainIterator:
  """Iterator over training batches with a checkpointable state.

  Each `next()` returns one step's host-local batch:
  `{'rgb': {'image', 'label', 'identity', 'camera', 'modality', 'index'[, 'aug']},
    'ir': {...}, 'epoch', 'slot'}`, every leaf with leading dimension P*K / shard_count;
  'label' is [B, L] when the pipeline was built with label columns [N, L].
  """

  def __init__(self, dataset: grain.MapDataset, read_options, mp_options, steps_per_epoch: int):
    self._dataset = dataset
    self._read_options = read_options
    self._mp_options = mp_options
    self.steps_per_epoch = steps_per_epoch
    self._iter = self._make_iter()

  def _make_iter(self):
    ds = self._dataset.to_iter_dataset(self._read_options)
    if self._mp_options is not None:
      from absl import flags

      # Grain's worker processes read an absl flag; outside `absl.app.run` (notebooks,
      # pytest, user scripts) the flags are unparsed and Grain would raise.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(self._mp_options)
    return iter(ds)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    """A small JSON-serialisable state; `set_state` resumes at the next batch."""
    return self._iter.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._iter.set_state(state)

  def close(self) -> None:
    close = getattr(self._iter, "close", None)
    if close is not None:
      close()


@dataclasses.dataclass
class TrainPipeline:
  """The prepared training pipeline of one host.

  Attributes:
    config: the pipeline settings.
    sampler: the identity sampler (its `steps_per_epoch` is the epoch length).
    metadata: int64 arrays label/identity/camera/modality per record of the source ('label'
      is [N, L] when the pipeline was built with label columns).
    keep: bool mask of records in use (modality-imbalance subset).
    store: the image store (decode on read, or RAM cache).
    shard_index, shard_count: this host's slice of every global batch.
  """

  config: PipelineConfig
  sampler: Any  # one of `sampler_lib.SAMPLERS`, or a `sampler_lib.WarmupSampler`
  metadata: dict[str, np.ndarray]
  keep: np.ndarray
  store: ImageStore
  shard_index: int = 0
  shard_count: int = 1

  @property
  def steps_per_epoch(self) -> int:
    return self.sampler.steps_per_epoch

  @property
  def local_batch(self) -> int:
    """Pairs per step on this host (each pair is one visible and one infrared image)."""
    return self.sampler.per_step // self.shard_count

  def dataset(self, num_epochs: int, *, start_epoch: int = 0) -> grain.MapDataset:
    """A random-access Grain dataset of this host's batches for `num_epochs` epochs."""
    cfg = self.config
    elements = _Elements(self.sampler, num_epochs, self.shard_index, self.shard_count,
                         start_epoch)
    load = _LoadPair(self.store, self.metadata, augment_lib.preset(cfg.augment_rgb),
                     augment_lib.preset(cfg.augment_ir), cfg.augment_on == "device", cfg.seed)
    return grain.MapDataset.source(elements).map(load).batch(elements.local,
                                                             drop_remainder=True)

  def iterator(self, num_epochs: int, *, start_epoch: int = 0) -> TrainIterator:
    """Threaded (and optionally multi-process) iterator over `dataset(num_epochs)`."""
    cfg = self.config
    read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
    mp = grain.MultiprocessingOptions(num_workers=cfg.num_workers) if cfg.num_workers else None
    return TrainIterator(self.dataset(num_epochs, start_epoch=start_epoch), read, mp,
                         self.steps_per_epoch)


def make_train_pipeline(source: Sequence[dict[str, Any]], config: PipelineConfig = PipelineConfig(),
                        *, shard_index: int | None = None, shard_count: int | None = None,
                        metadata: dict[str, np.ndarray] | None = None,
                        labels: np.ndarray | None = None,
                        steps_per_epoch: int | None = None,
                        store: ImageStore | None = None) -> TrainPipeline:
  """Builds the training pipeline over a random-access record source.

  Args:
    source: the `train` split, e.g. `open_train_source(...)` (TFDS array_record data source
      with image decoding skipped), or any sequence of dicts with 'image' (encoded bytes or a
      uint8 array) and the keys of `META_KEYS`.
    config: pipeline settings.
    shard_index: this host's index among `shard_count` hosts; defaults to
      `jax.process_index()` / `jax.process_count()`.
    shard_count: see shard_index. P must be divisible by it.
    metadata: precomputed `read_metadata(source)`, to skip the scan.
    labels: int [N] training labels replacing the dataset's (a method's relabelling, e.g.
      MMM's pseudo-labels), or int [N, L] label columns (MMM stage 2: per-modality and joint
      clusters; samplers 'cluster' and 'all' only); -1 leaves a record out of a column, and a
      record is used when any column is >= 0. Batches then carry 'label' [B, L]. The imbalance
      subset is still drawn from the dataset's labels, so it does not change with a
      relabelling.
    steps_per_epoch: fixed epoch length (see `IdentitySampler`); None uses
      `config.steps_per_epoch` (0: the sampler's own length).
    store: an `ImageStore` of `source` to reuse (e.g. its RAM cache across relabellings).

  Raises:
    ValueError: P not divisible by the number of hosts, or invalid sampler settings.
  """
  if shard_index is None or shard_count is None:
    import jax  # Imported here so data-only users (benchmarks, tools) need not start JAX.
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if config.num_identities % shard_count:
    raise ValueError(f"num_identities P={config.num_identities} must be divisible by the "
                     f"{shard_count} hosts, so every host gets whole identities")
  meta = read_metadata(source) if metadata is None else metadata
  keep = sampler_lib.modality_subset(
      meta["label"], meta["modality"], fraction=config.imbalance_fraction,
      reduce_modality=config.imbalance_modality, unit=config.imbalance_unit, seed=config.seed)
  if labels is not None:
    labels = np.asarray(labels, np.int64)
    n = len(meta["label"])
    if labels.ndim not in (1, 2) or labels.shape[0] != n or 0 in labels.shape[1:]:
      raise ValueError(f"labels has shape {labels.shape}; expected int [{n}] (one label per "
                       f"record) or [{n}, L] (L >= 1 label columns)")
    keep = keep & (labels >= 0 if labels.ndim == 1 else np.any(labels >= 0, axis=1))
    meta = {**meta, "label": labels}
  sampler = make_sampler(config, meta, keep, steps_per_epoch=steps_per_epoch)
  if store is None:
    cache = np.flatnonzero(keep) if config.cache == "ram" else None
    store = ImageStore(source, cache_indices=cache)
  return TrainPipeline(config, sampler, meta, keep, store, shard_index, shard_count)


def make_sampler(config: PipelineConfig, meta: dict[str, np.ndarray], keep: np.ndarray, *,
                 steps_per_epoch: int | None = None):
  """The sampler of `config` over `meta` ('label', 'modality', 'camera') and the `keep` mask.

  `config.sampler` picks the class from `sampler_lib.SAMPLERS`; with `config.warm_epochs` > 0
  it is wrapped in a `sampler_lib.WarmupSampler` whose first epochs come from an 'all' sampler
  of the same epoch length. The epoch length is `steps_per_epoch` when given (a caller that
  knows it already, e.g. the trainer relabelling mid-run), else the config's:
  `config.steps_per_epoch` or the sampler's own, times `config.epoch_fraction`.
  """
  kwargs = dict(num_identities=config.num_identities, num_instances=config.num_instances,
                seed=config.seed, keep=keep, camera=meta["camera"])
  make = sampler_lib.SAMPLERS[config.sampler]
  from_config = steps_per_epoch is None
  if from_config:
    steps_per_epoch = config.steps_per_epoch or None
  sampler = make(meta["label"], meta["modality"], steps_per_epoch=steps_per_epoch, **kwargs)
  if from_config and config.epoch_fraction != 1.0:
    steps = max(1, round(config.epoch_fraction * sampler.steps_per_epoch))
    sampler = make(meta["label"], meta["modality"], steps_per_epoch=steps, **kwargs)
  if config.warm_epochs > 0:
    warm = sampler_lib.AllSampler(meta["label"], meta["modality"],
                                  steps_per_epoch=sampler.steps_per_epoch, **kwargs)
    sampler = sampler_lib.WarmupSampler(sampler, warm, config.warm_epochs)
  return sampler


class PreparedSource:
  """Random-access records of one split of a prepared dataset, images left encoded.

  Opens `tfds.builder_from_directory(builder_dir).as_data_source(split)` with image decoding
  skipped: the pipeline decodes images itself, so the metadata scan and the RAM cache decode
  each image at most once. It pickles as (builder_dir, split) and reopens in the receiving
  process, so Grain worker processes can use it whatever builder config made the files.

  Args:
    builder_dir: the prepared dataset's version folder (`builder.data_dir`).
    split: 'train', 'query', 'gallery', 'test_visible', ...
  """

  def __init__(self, builder_dir: str | os.PathLike, split: str = "train"):
    self.builder_dir = os.fspath(builder_dir)
    self.split = split
    self._source = None

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds

      builder = tfds.builder_from_directory(self.builder_dir)
      self._source = builder.as_data_source(
          self.split, decoders={"image": tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self):
    return {"builder_dir": self.builder_dir, "split": self.split, "_source": None}

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._open()[index]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return self._open().__getitems__(indices)


def open_train_source(builder, split: str = "train") -> PreparedSource:
  """`PreparedSource` of a prepared TFDS builder's split (images left encoded)."""
  return PreparedSource(builder.data_dir, split)
