"""Tests of the training pipeline over an in-memory record source."""

from __future__ import annotations

import io

import jax
import numpy as np
import pytest
from PIL import Image

from maumjax.data import augment as augment_lib
from maumjax.data import pipeline as pipeline_lib

H, W = 24, 12


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def source():
  """6 identities x (5 visible + 3 IR) records with distinct random images, shuffled order."""
  rng = np.random.default_rng(0)
  rows = []
  for label in range(6):
    for modality, n in ((0, 5), (1, 3)):
      for _ in range(n):
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        if modality:
          img[..., 1] = img[..., 2] = img[..., 0]
        rows.append({"image": _png(img), "label": label, "identity": 100 + label,
                     "camera": 3 if modality else 1, "modality": modality, "array": img})
  order = rng.permutation(len(rows))
  return [rows[i] for i in order]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_batch_content_matches_records(source):
  cfg = pipeline_lib.PipelineConfig(num_identities=2, num_instances=3, augment_rgb="none",
                                    augment_ir="none", num_threads=1, augment_on="host")
  pipe = pipeline_lib.make_train_pipeline(source, cfg, shard_index=0, shard_count=1)
  # N = max(30, 18) = 30; P*K = 6; 30 // 6 + 1 = 6 steps.
  assert pipe.steps_per_epoch == 6 and pipe.local_batch == 6
  it = pipe.iterator(num_epochs=1)
  batches = _take(it, 6)
  with pytest.raises(StopIteration):
    next(it)
  plan = pipe.sampler.epoch(0)
  for step, batch in enumerate(batches):
    for name, modality, idx in (("rgb", 0, plan.visible), ("ir", 1, plan.infrared)):
      part = batch[name]
      expect_idx = idx[step * 6:(step + 1) * 6]
      np.testing.assert_array_equal(part["index"], expect_idx)
      assert part["image"].shape == (6, H, W, 3) and part["image"].dtype == np.float32
      for j, i in enumerate(expect_idx):
        row = source[i]
        assert (part["label"][j], part["identity"][j], part["camera"][j], part["modality"][j]) \
            == (row["label"], row["identity"], row["camera"], modality)
        # 'none' only normalises: invert it and recover the stored pixels.
        mean = np.asarray(augment_lib.IMAGENET_MEAN, np.float32)
        std = np.asarray(augment_lib.IMAGENET_STD, np.float32)
        pixels = (part["image"][j] * std + mean) * 255.0
        np.testing.assert_allclose(pixels, row["array"], atol=1e-3)
    np.testing.assert_array_equal(batch["rgb"]["label"], batch["ir"]["label"])


def test_same_seed_same_batches_whatever_the_threads(source):
  base = dict(num_identities=2, num_instances=2, augment_rgb="agw", augment_ir="agw")
  a = pipeline_lib.make_train_pipeline(
      source, pipeline_lib.PipelineConfig(**base, num_threads=1), shard_index=0, shard_count=1)
  b = pipeline_lib.make_train_pipeline(
      source, pipeline_lib.PipelineConfig(**base, num_threads=3, prefetch=2), shard_index=0,
      shard_count=1)
  for x, y in zip(_take(a.iterator(2), 12), _take(b.iterator(2), 12)):
    _assert_batches_equal(x, y)
  c = pipeline_lib.make_train_pipeline(
      source, pipeline_lib.PipelineConfig(**base, seed=1), shard_index=0, shard_count=1)
  x, y = next(a.iterator(1)), next(c.iterator(1))
  assert not np.array_equal(x["rgb"]["index"], y["rgb"]["index"])


def test_worker_processes_give_the_same_batches_and_resume(source):
  base = dict(num_identities=2, num_instances=2, num_threads=1)
  threads = pipeline_lib.make_train_pipeline(source, pipeline_lib.PipelineConfig(**base),
                                             shard_index=0, shard_count=1)
  procs = pipeline_lib.make_train_pipeline(
      source, pipeline_lib.PipelineConfig(**base, num_workers=2), shard_index=0, shard_count=1)
  expect = _take(threads.iterator(1), 6)
  it = procs.iterator(1)
  got = _take(it, 3)
  state = it.get_state()
  it.close()
  resumed = procs.iterator(1)
  resumed.set_state(state)
  got += _take(resumed, 3)
  resumed.close()
  for x, y in zip(expect, got):
    _assert_batches_equal(x, y)


def test_resume_from_state_matches_uninterrupted(source):
  cfg = pipeline_lib.PipelineConfig(num_identities=2, num_instances=2, num_threads=2)
  pipe = pipeline_lib.make_train_pipeline(source, cfg, shard_index=0, shard_count=1)
  full = _take(pipe.iterator(3), 20)
  first = pipe.iterator(3)
  _take(first, 9)  # crosses the epoch boundary at step 8 (N=30, P*K=4: 8 steps)
  state = first.get_state()
  first.close()
  resumed = pipe.iterator(3)
  resumed.set_state(state)
  for x, y in zip(full[9:], _take(resumed, 11)):
    _assert_batches_equal(x, y)
  assert full[8]["epoch"][0] == 1 and full[7]["epoch"][0] == 0


def test_device_augmentation_equals_host(source):
  common = dict(num_identities=2, num_instances=2, augment_rgb="agw", augment_ir="agw",
                num_threads=1)
  host_cfg = pipeline_lib.PipelineConfig(**common, augment_on="host")
  dev_cfg = pipeline_lib.PipelineConfig(**common, augment_on="device")
  host = _take(pipeline_lib.make_train_pipeline(source, host_cfg, shard_index=0,
                                                shard_count=1).iterator(1), 3)
  dev = _take(pipeline_lib.make_train_pipeline(source, dev_cfg, shard_index=0,
                                               shard_count=1).iterator(1), 3)
  apply = jax.jit(lambda b: pipeline_lib.device_augment(b, dev_cfg))
  for h, d in zip(host, dev):
    assert d["rgb"]["image"].dtype == np.uint8 and "aug" in d["rgb"]
    out = apply(d)
    for name in ("rgb", "ir"):
      np.testing.assert_allclose(np.asarray(out[name]["image"]), h[name]["image"], atol=1e-5)
  # The augmentation really changes something (crop offsets or flips differ from identity).
  plain = pipeline_lib.PipelineConfig(**{**common, "augment_rgb": "none",
                                         "augment_on": "host"})
  p = next(pipeline_lib.make_train_pipeline(source, plain, shard_index=0,
                                            shard_count=1).iterator(1))
  assert not np.allclose(p["rgb"]["image"], host[0]["rgb"]["image"])


def test_host_shards_partition_the_global_batch(source):
  cfg = pipeline_lib.PipelineConfig(num_identities=4, num_instances=2, num_threads=1)
  whole = _take(pipeline_lib.make_train_pipeline(source, cfg, shard_index=0,
                                                 shard_count=1).iterator(1), 4)
  shards = [_take(pipeline_lib.make_train_pipeline(source, cfg, shard_index=h,
                                                   shard_count=2).iterator(1), 4)
            for h in (0, 1)]
  for step in range(4):
    joined = jax.tree.map(lambda a, b: np.concatenate([a, b]), shards[0][step], shards[1][step])
    _assert_batches_equal(joined, whole[step])
    # Each host holds whole identities: 2 identities x K=2.
    lab = shards[1][step]["rgb"]["label"].reshape(2, 2)
    assert np.all(lab == lab[:, :1])
  with pytest.raises(ValueError, match="divisible"):
    pipeline_lib.make_train_pipeline(source, cfg, shard_index=0, shard_count=3)


def test_ram_cache_gives_identical_batches(source):
  base = dict(num_identities=2, num_instances=2, num_threads=1)
  plain = pipeline_lib.make_train_pipeline(source, pipeline_lib.PipelineConfig(**base),
                                           shard_index=0, shard_count=1)
  cached = pipeline_lib.make_train_pipeline(
      source, pipeline_lib.PipelineConfig(**base, cache="ram"), shard_index=0, shard_count=1)
  assert cached.store.cached_bytes == len(source) * H * W * 3
  for x, y in zip(_take(plain.iterator(1), 5), _take(cached.iterator(1), 5)):
    _assert_batches_equal(x, y)


def test_imbalance_option_reaches_the_batches(source):
  cfg = pipeline_lib.PipelineConfig(num_identities=2, num_instances=2, num_threads=1,
                                    imbalance_fraction=0.34, imbalance_unit="images")
  pipe = pipeline_lib.make_train_pipeline(source, cfg, shard_index=0, shard_count=1)
  kept_ir = np.flatnonzero(pipe.keep & (pipe.metadata["modality"] == 1))
  assert kept_ir.size == 6  # max(1, round(0.34 * 3)) = 1 per identity
  for batch in _take(pipe.iterator(1), pipe.steps_per_epoch):
    assert np.isin(batch["ir"]["index"], kept_ir).all()


def test_config_errors_list_choices():
  with pytest.raises(ValueError, match="host"):
    pipeline_lib.PipelineConfig(augment_on="gpu")
  with pytest.raises(ValueError, match="ram"):
    pipeline_lib.PipelineConfig(cache="disk")
  with pytest.raises(ValueError):
    pipeline_lib.PipelineConfig(augment_rgb="no-such-preset")


@pytest.mark.parametrize("sampler", ["agw", "mpanet"])
def test_epoch_fraction_shortens_the_epoch_and_only_that(source, sampler):
  """The epoch is the sampler's own length times the fraction (at least one step); a fixed
  length is scaled too."""
  base = dict(num_identities=2, num_instances=2, num_threads=1, sampler=sampler)
  whole = pipeline_lib.make_train_pipeline(source, pipeline_lib.PipelineConfig(**base),
                                           shard_index=0, shard_count=1)
  natural = whole.steps_per_epoch
  assert natural >= 3
  for fraction, fixed, expected in ((0.5, 0, max(1, round(natural / 2))), (0.3, 10, 3),
                                    (0.01, 0, 1), (2.0, 0, 2 * natural)):
    cfg = pipeline_lib.PipelineConfig(**base, steps_per_epoch=fixed, epoch_fraction=fraction)
    pipe = pipeline_lib.make_train_pipeline(source, cfg, shard_index=0, shard_count=1)
    assert pipe.steps_per_epoch == expected, (fraction, fixed)
    # A length the caller gives (the trainer's, when it relabels mid-run) is not scaled again.
    again = pipeline_lib.make_train_pipeline(source, cfg, shard_index=0, shard_count=1,
                                             steps_per_epoch=pipe.steps_per_epoch)
    assert again.steps_per_epoch == expected
  with pytest.raises(ValueError, match="epoch_fraction=0.0 must be > 0"):
    pipeline_lib.PipelineConfig(**base, epoch_fraction=0.0)
