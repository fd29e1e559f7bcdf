"""Tests of relabelled training data with label columns [N, L] through the pipeline (MMM)."""

from __future__ import annotations


import numpy as np
import pytest

from maumjax.data import pipeline as pipeline_lib
from maumjax.train import inputs
from tests.data.test_pipeline import _png

H, W = 8, 4


@pytest.fixture(scope="module")
def source():
  """6 identities x (5 visible over 2 cameras + 4 IR) tiny records, shuffled order."""
  rng = np.random.default_rng(0)
  rows = []
  for label in range(6):
    for modality, n in ((0, 5), (1, 4)):
      for j in range(n):
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        rows.append({"image": _png(img), "label": label, "identity": 100 + label,
                     "camera": 3 if modality else 1 + j % 2, "modality": modality})
  order = rng.permutation(len(rows))
  return [rows[i] for i in order]


def _columns(source):
  """Column 0: per-modality clusters (IR in its own label space), column 1: joint clusters."""
  rng = np.random.default_rng(1)
  lab = np.array([r["label"] for r in source])
  mod = np.array([r["modality"] for r in source])
  col0 = np.where(mod == 0, lab, 10 + lab // 2)
  col1 = lab % 3
  col0[rng.random(len(lab)) < 0.2] = -1
  col1[rng.random(len(lab)) < 0.3] = -1
  col0[:3] = col1[:3] = -1
  return np.stack([col0, col1], axis=1)


def test_label_columns_reach_the_batches(source):
  labels = _columns(source)
  p, k = 2, 3
  cfg = pipeline_lib.PipelineConfig(num_identities=p, num_instances=k, sampler="cluster",
                                    augment_rgb="none", augment_ir="none", augment_on="host",
                                    num_threads=1, steps_per_epoch=4)
  pipe = pipeline_lib.make_train_pipeline(source, cfg, shard_index=0, shard_count=1,
                                          labels=labels)
  assert pipe.steps_per_epoch == 4 and pipe.metadata["label"].shape == (len(source), 2)
  np.testing.assert_array_equal(pipe.keep, np.any(labels >= 0, axis=1))
  it = pipe.iterator(num_epochs=1)
  cams = np.array([r["camera"] for r in source])
  for step in range(4):
    batch = next(it)
    for name, m in (("rgb", 0), ("ir", 1)):
      part = batch[name]
      index = np.asarray(part["index"])
      assert part["label"].shape == (p * k, 2) and part["label"].dtype == np.int32
      np.testing.assert_array_equal(part["label"], labels[index])
      np.testing.assert_array_equal(part["camera"], cams[index])
      assert part["camera"].shape == (p * k,)
      np.testing.assert_array_equal(part["modality"], np.full(p * k, m))
      # Step parity picks the column: one pseudo-id of it per K consecutive slots.
      col = part["label"][:, step % 2].reshape(p, k)
      assert np.all(col >= 0) and np.all(col == col[:, :1])
      assert not np.isin(index, [0, 1, 2]).any()
  it.close()


def test_one_column_labels_keep_the_batch_layout(source):
  labels = _columns(source)[:, 0]
  cfg = pipeline_lib.PipelineConfig(num_identities=2, num_instances=2, sampler="cluster",
                                    augment_rgb="none", augment_ir="none", augment_on="host",
                                    num_threads=1)
  pipe = pipeline_lib.make_train_pipeline(source, cfg, shard_index=0, shard_count=1,
                                          labels=labels)
  batch = next(pipe.iterator(num_epochs=1))
  assert batch["rgb"]["label"].shape == (4,)
  np.testing.assert_array_equal(batch["rgb"]["label"], labels[np.asarray(batch["rgb"]["index"])])


def test_check_labels_accepts_columns():
  ok = inputs.check_labels(np.array([[0, -1], [2, 1], [-1, -1]]), 3, "mmm")
  assert ok.dtype == np.int64 and ok.shape == (3, 2)
  assert inputs.check_labels([0, -1, 4], 3, "mmm").shape == (3,)
  for bad in (np.zeros((3, 2, 1), int), np.zeros((3, 0), int), np.zeros((2, 2), int),
              np.zeros((3, 2))):
    with pytest.raises(ValueError, match=r"expected int \[3\] .* or int \[3, L\]"):
      inputs.check_labels(bad, 3, "mmm")
  with pytest.raises(ValueError, match="returned label -2"):
    inputs.check_labels(np.array([[0, -2], [0, 0], [0, 0]]), 3, "mmm")
