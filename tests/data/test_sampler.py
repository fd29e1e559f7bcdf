"""Tests of the P x K cross-modality identity sampler and the imbalance subsets."""

from __future__ import annotations

import numpy as np
import pytest

from maumjax.data import sampler as sampler_lib


def _records(counts_rgb, counts_ir):
  """labels/modality arrays: identity c has counts_rgb[c] visible and counts_ir[c] IR records."""
  labels, modality = [], []
  for c, (n_rgb, n_ir) in enumerate(zip(counts_rgb, counts_ir)):
    labels += [c] * n_rgb + [c] * n_ir
    modality += [0] * n_rgb + [1] * n_ir
  # Interleave so record order is not grouped by modality.
  perm = np.random.default_rng(123).permutation(len(labels))
  return np.asarray(labels)[perm], np.asarray(modality)[perm]


def test_epoch_length_follows_reference_formula():
  labels, modality = _records([5] * 10, [3] * 10)  # 50 visible, 30 IR
  s = sampler_lib.IdentitySampler(labels, modality, num_identities=4, num_instances=2)
  # N = max(50, 30) = 50; P*K = 8; floor(50 / 8) + 1 = 7.
  assert s.steps_per_epoch == 7
  plan = s.epoch(0)
  assert plan.visible.shape == plan.infrared.shape == (7 * 8,)


def test_batches_are_identity_major_and_modality_pure():
  labels, modality = _records([6, 2, 7, 3, 5, 4], [3, 5, 1, 4, 2, 6])
  p, k = 3, 4
  s = sampler_lib.IdentitySampler(labels, modality, num_identities=p, num_instances=k, seed=7)
  plan = s.epoch(2)
  for step in range(plan.steps):
    block = slice(step * p * k, (step + 1) * p * k)
    vis, ir = plan.visible[block], plan.infrared[block]
    assert np.all(modality[vis] == 0) and np.all(modality[ir] == 1)
    lab_v = labels[vis].reshape(p, k)
    lab_i = labels[ir].reshape(p, k)
    # K consecutive slots per identity, same identity in both modalities, P distinct.
    assert np.all(lab_v == lab_v[:, :1]) and np.array_equal(lab_v, lab_i)
    assert len(set(lab_v[:, 0].tolist())) == p


def test_deterministic_per_seed_and_epoch():
  labels, modality = _records([4] * 8, [4] * 8)
  a = sampler_lib.IdentitySampler(labels, modality, num_identities=4, num_instances=2, seed=3)
  b = sampler_lib.IdentitySampler(labels, modality, num_identities=4, num_instances=2, seed=3)
  np.testing.assert_array_equal(a.epoch(5).visible, b.epoch(5).visible)
  np.testing.assert_array_equal(a.epoch(5).infrared, b.epoch(5).infrared)
  assert not np.array_equal(a.epoch(5).visible, a.epoch(6).visible)
  c = sampler_lib.IdentitySampler(labels, modality, num_identities=4, num_instances=2, seed=4)
  assert not np.array_equal(a.epoch(5).visible, c.epoch(5).visible)


def test_draws_with_replacement_and_uniformly():
  # Identity 0 has a single IR image but K = 4: with replacement it is repeated.
  labels, modality = _records([8] * 6, [1] + [8] * 5)
  s = sampler_lib.IdentitySampler(labels, modality, num_identities=3, num_instances=4, seed=0)
  ids_seen = []
  within = []
  for e in range(60):
    plan = s.epoch(e)
    lab = labels[plan.infrared].reshape(-1, 4)
    ids_seen.append(lab[:, 0])
    zero = plan.infrared.reshape(-1, 4)[lab[:, 0] == 0]
    if zero.size:
      assert np.all(zero == zero[:, :1])  # the only IR image of identity 0, four times
    vis = plan.visible.reshape(-1, 4)
    within.append(np.mean([len(set(r.tolist())) < 4 for r in vis]))
  ids_seen = np.concatenate(ids_seen)
  freq = np.bincount(ids_seen, minlength=6) / ids_seen.size
  # Each of 6 identities is drawn with probability 1/6 per slot; n ~ 60*9*3 draws.
  se = np.sqrt((1 / 6) * (5 / 6) / ids_seen.size)
  assert np.all(np.abs(freq - 1 / 6) < 5 * se)
  # With replacement from 8 images, P(4 draws all distinct) = 8*7*6*5/8^4 = 0.41.
  assert abs(np.mean(within) - (1 - 0.41015625)) < 0.05


def test_errors_name_the_problem():
  labels, modality = _records([2] * 3, [2] * 3)
  with pytest.raises(ValueError, match="P=4 exceeds the 3"):
    sampler_lib.IdentitySampler(labels, modality, num_identities=4, num_instances=2)
  with pytest.raises(ValueError, match="negative labels"):
    sampler_lib.IdentitySampler(np.full_like(labels, -1), modality, num_identities=1)
  with pytest.raises(ValueError, match="no infrared"):
    sampler_lib.IdentitySampler(labels, np.zeros_like(modality), num_identities=1)


def test_imbalance_images_keeps_fraction_per_identity():
  labels, modality = _records([10] * 5, [8, 8, 3, 1, 16])
  keep = sampler_lib.modality_subset(labels, modality, fraction=0.25, unit="images", seed=1)
  assert np.all(keep[modality == 0])
  for c, n in enumerate([8, 8, 3, 1, 16]):
    kept = np.sum(keep & (modality == 1) & (labels == c))
    assert kept == max(1, round(0.25 * n))  # 2, 2, 1, 1, 4
  again = sampler_lib.modality_subset(labels, modality, fraction=0.25, unit="images", seed=1)
  np.testing.assert_array_equal(keep, again)
  other = sampler_lib.modality_subset(labels, modality, fraction=0.25, unit="images", seed=2)
  assert not np.array_equal(keep, other)
  np.testing.assert_array_equal(
      sampler_lib.modality_subset(labels, modality, fraction=1.0), np.ones_like(keep))


def test_imbalance_identities_and_substitutes():
  labels, modality = _records([4] * 8, [4] * 8)
  keep = sampler_lib.modality_subset(labels, modality, fraction=0.25, unit="identities",
                                     reduce_modality=1, seed=0)
  ir_ids = np.unique(labels[keep & (modality == 1)])
  assert ir_ids.size == 2  # round(0.25 * 8)
  for c in ir_ids:  # the kept identities keep all their IR images
    assert np.sum(keep & (modality == 1) & (labels == c)) == 4
  s = sampler_lib.IdentitySampler(labels, modality, num_identities=4, num_instances=2,
                                  keep=keep, seed=0)
  assert s.num_images == (32, 8)
  plan = s.epoch(0)
  assert np.all(keep[plan.infrared]) and np.all(keep[plan.visible])
  # Every identity is still sampled on the visible side.
  seen = set()
  for e in range(20):
    seen |= set(labels[s.epoch(e).visible].tolist())
  assert seen == set(range(8))
  # IR slots only ever hold the two identities that kept IR images.
  assert set(labels[plan.infrared].tolist()) <= set(ir_ids.tolist())


def test_imbalance_argument_errors():
  labels, modality = _records([2] * 3, [2] * 3)
  with pytest.raises(ValueError, match="0.0"):
    sampler_lib.modality_subset(labels, modality, fraction=0.0)
  with pytest.raises(ValueError, match="'ids'"):
    sampler_lib.modality_subset(labels, modality, fraction=0.5, unit="ids")


# ---------------------------------------------------------------------------- MPANet sampler


def _mpanet_pass_reading(labels, modality, plan, p, k, counts):
  """Brute-force reading of mpanet.md §2.3 for the steps of one pass: P distinct identities
  per step, each K visible + K infrared of its own; an identity appears in at most
  `counts[c]` steps (its chunk count); no image repeats within the pass unless its identity
  was up-sampled (both modalities shorter than K)."""
  seen = {}
  for step in range(plan.steps):
    block = slice(step * p * k, (step + 1) * p * k)
    vis, ir = plan.visible[block].reshape(p, k), plan.infrared[block].reshape(p, k)
    assert np.all(modality[vis] == 0) and np.all(modality[ir] == 1)
    ids = labels[vis[:, 0]]
    assert len(set(ids.tolist())) == p
    for j, c in enumerate(ids.tolist()):
      assert np.all(labels[vis[j]] == c) and np.all(labels[ir[j]] == c)
      seen.setdefault(c, []).append((vis[j], ir[j]))
  for c, chunks in seen.items():
    assert len(chunks) <= counts[c]
    n_vis, n_ir = np.sum((labels == c) & (modality == 0)), np.sum((labels == c) & (modality == 1))
    if not (n_vis < k and n_ir < k):  # sub-sampled without replacement
      for m in (0, 1):
        flat = np.concatenate([ch[m] for ch in chunks])
        assert len(np.unique(flat)) == flat.size
  return seen


def test_mpanet_sampler_follows_the_pass_of_the_spec():
  # identity: (visible, infrared) counts; K = 2 per modality.
  counts_rgb = [9, 4, 1, 6, 2, 5, 3, 8]
  counts_ir = [3, 4, 1, 7, 9, 0, 5, 2]
  labels, modality = _records(counts_rgb, counts_ir)
  p, k = 3, 2
  # Chunks per identity: min(#vis, #ir) // K, or 1 when both are shorter than K (up-sampled);
  # identity 5 has no infrared image and gives none.
  chunks = {0: 1, 1: 2, 2: 1, 3: 3, 4: 1, 5: 0, 6: 1, 7: 1}
  s = sampler_lib.MPANetSampler(labels, modality, num_identities=p, num_instances=k, seed=3)
  assert set(s.identities.tolist()) == {0, 1, 2, 3, 4, 6, 7}
  for epoch in range(4):
    rng = np.random.default_rng([3, epoch])
    one_pass = s._pass(rng)
    # The pass ends only when fewer than P identities have chunks left.
    used = {}
    for step in one_pass:
      for v, _ in step:
        used[int(labels[v[0]])] = used.get(int(labels[v[0]]), 0) + 1
    left = [c for c, n in chunks.items() if n - used.get(c, 0) > 0]
    assert len(left) < p
    plan = s.epoch(epoch)
    assert plan.steps == s.steps_per_epoch
    if len(one_pass) >= s.steps_per_epoch:  # the epoch is (the start of) this pass
      _mpanet_pass_reading(labels, modality, plan, p, k, chunks)
  # Identity 2 has 1 + 1 images (< K): up-sampled with replacement to K each.
  plan = s.epoch(0)
  assert plan.visible.shape == plan.infrared.shape == (s.steps_per_epoch * p * k,)


def test_mpanet_sampler_hand_case_and_fixed_length():
  # Three identities with exactly one chunk each and P = 2: one step, then one identity is
  # left (< P), so the pass has one step; the epoch length is that, every epoch.
  labels, modality = _records([2, 2, 2], [2, 3, 2])
  s = sampler_lib.MPANetSampler(labels, modality, num_identities=2, num_instances=2, seed=0)
  assert s.steps_per_epoch == 1
  for epoch in range(5):
    plan = s.epoch(epoch)
    assert plan.steps == 1 and plan.visible.size == 4
  # A fixed length longer than a pass continues with a fresh pass, and is deterministic.
  s = sampler_lib.MPANetSampler(labels, modality, num_identities=2, num_instances=2, seed=0,
                                steps_per_epoch=5)
  a, b = s.epoch(1), s.epoch(1)
  assert a.steps == 5 and np.array_equal(a.visible, b.visible)
  assert not np.array_equal(s.epoch(2).visible, a.visible)


def test_mpanet_sampler_epoch_is_one_full_pass_on_a_larger_set():
  rng = np.random.default_rng(0)
  counts_rgb = rng.integers(4, 30, size=40).tolist()
  counts_ir = rng.integers(4, 20, size=40).tolist()
  labels, modality = _records(counts_rgb, counts_ir)
  p, k = 8, 4
  s = sampler_lib.MPANetSampler(labels, modality, num_identities=p, num_instances=k, seed=1)
  chunks = {c: min(a, b) // k for c, (a, b) in enumerate(zip(counts_rgb, counts_ir))}
  total = sum(chunks.values())
  # A pass uses nearly every chunk: at most P - 1 identities keep chunks at the end.
  assert total // p - max(chunks.values()) <= s.steps_per_epoch <= total // p
  _mpanet_pass_reading(labels, modality, s.epoch(0), p, k, chunks)


def test_pipeline_config_picks_the_sampler():
  from maumjax.data import pipeline

  assert pipeline.PipelineConfig(sampler="mpanet").sampler == "mpanet"
  with pytest.raises(ValueError, match="sampler='nope'"):
    pipeline.PipelineConfig(sampler="nope")
