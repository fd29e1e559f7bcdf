"""Tests of MMM's samplers: the camera-aware cluster sampler, the all-records sampler, warm-up.

Every property is checked against a brute-force recomputation from the record arrays (the
candidates of a chunk, the ids of a pass, the records of a modality), not against the code's
own intermediate structures.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from maumjax.data import pipeline as pipeline_lib
from maumjax.data import sampler as sampler_lib


def _random_records(n=400, ids_vis=9, ids_ir=7, cameras=4, seed=0, ir_offset=0):
  """labels (-1 for some records), modality and camera of `n` shuffled records."""
  rng = np.random.default_rng(seed)
  modality = rng.integers(0, 2, n)
  labels = np.where(modality == 0, rng.integers(0, ids_vis, n),
                    ir_offset + rng.integers(0, ids_ir, n))
  labels[rng.random(n) < 0.15] = -1  # DBSCAN outliers
  camera = rng.integers(0, cameras, n)
  return labels, modality, camera


def _chunks(plan, modality_name, p, k):
  idx = plan.visible if modality_name == "visible" else plan.infrared
  return idx.reshape(plan.steps, p, k)


def _check_chunk(chunk, labels, modality, camera, m, k, kept=None):
  """Brute force: one pseudo-id of modality m, anchor first, the others drawn by the rule."""
  kept = np.ones(len(labels), bool) if kept is None else kept
  label = labels[chunk[0]]
  assert label >= 0 and np.all(labels[chunk] == label) and np.all(modality[chunk] == m)
  members = np.flatnonzero(kept & (modality == m) & (labels == label))
  anchor, rest = chunk[0], chunk[1:]
  other_cam = [i for i in members if camera[i] != camera[anchor]]
  other_img = [i for i in members if i != anchor]
  candidates = other_cam or other_img
  if not candidates:
    assert np.all(chunk == anchor)  # a single-image id repeats it
    return "single"
  assert set(rest.tolist()) <= set(candidates)
  if len(candidates) >= k:
    assert len(set(rest.tolist())) == k - 1  # without replacement
  return "other_cam" if other_cam else "same_cam"


def test_cluster_chunks_follow_the_reference_rule():
  labels, modality, camera = _random_records()
  p, k = 3, 4
  s = sampler_lib.ClusterSampler(labels, modality, num_identities=p, num_instances=k, seed=1,
                                 camera=camera, steps_per_epoch=12)
  plan = s.epoch(0)
  assert plan.visible.shape == plan.infrared.shape == (12 * p * k,) and plan.per_step == p * k
  assert plan.visible.dtype == plan.infrared.dtype == np.int64
  for m, name in ((0, "visible"), (1, "infrared")):
    for step in _chunks(plan, name, p, k):
      for chunk in step:
        _check_chunk(chunk, labels, modality, camera, m, k)
      assert len(set(labels[step[:, 0]].tolist())) == p  # one pass per step here: P ids


def test_cluster_other_camera_preference_and_replacement_threshold():
  # Pseudo-id 0: 10 images over 3 cameras; 1: 6 images of one camera; 2: a single image;
  # 3: one image of camera 0 and exactly K - 1 = 3 of camera 1 (with replacement: the
  # reference draws without replacement only from at least K candidates).
  cams = {0: [0, 0, 0, 0, 1, 1, 1, 2, 2, 2], 1: [5] * 6, 2: [7], 3: [0, 1, 1, 1]}
  labels, camera = [], []
  for label, cs in cams.items():
    labels += [label] * len(cs)
    camera += cs
  labels, camera = np.asarray(labels), np.asarray(camera)
  modality = np.zeros(len(labels), int)
  labels = np.concatenate([labels, [0, 0]])  # two infrared records of id 0
  modality = np.concatenate([modality, [1, 1]])
  camera = np.concatenate([camera, [3, 3]])
  k = 4
  s = sampler_lib.ClusterSampler(labels, modality, num_identities=4, num_instances=k, seed=0,
                                 camera=camera, steps_per_epoch=50)
  kinds, dup_in_3 = {}, 0
  for e in range(2):
    for chunk in _chunks(s.epoch(e), "visible", 4, k).reshape(-1, k):
      kind = _check_chunk(chunk, labels, modality, camera, 0, k)
      label = int(labels[chunk[0]])
      kinds.setdefault(label, set()).add(kind)
      if label == 0:  # many other-camera images: the anchor's camera never comes back
        assert not np.any(camera[chunk[1:]] == camera[chunk[0]])
      if label == 3 and camera[chunk[0]] == 0:
        dup_in_3 += len(set(chunk[1:].tolist())) < k - 1
  assert kinds == {0: {"other_cam"}, 1: {"same_cam"}, 2: {"single"}, 3: {"other_cam"}}
  # With 3 candidates drawn 3 times with replacement, 7/9 of such chunks hold a duplicate.
  assert dup_in_3 > 0
  # Infrared id 0 has two images of one camera: the other one is repeated.
  for chunk in _chunks(s.epoch(0), "infrared", 4, k).reshape(-1, k):
    assert set(chunk.tolist()) <= {len(labels) - 2, len(labels) - 1}
    assert len(set(chunk[1:].tolist())) == 1 and chunk[1] != chunk[0]


def test_cluster_each_id_once_per_pass_and_default_length():
  labels, modality, camera = _random_records(ids_vis=8, ids_ir=7)
  kept = labels >= 0
  n_vis = len(np.unique(labels[kept & (modality == 0)]))
  n_ir = len(np.unique(labels[kept & (modality == 1)]))
  assert (n_vis, n_ir) == (8, 7)
  p, k = 4, 2
  s = sampler_lib.ClusterSampler(labels, modality, num_identities=p, num_instances=k, seed=2,
                                 camera=camera)
  assert s.steps_per_epoch == math.ceil(max(n_vis, n_ir) / p) == 2
  fixed = sampler_lib.ClusterSampler(labels, modality, num_identities=p, num_instances=k,
                                     seed=2, camera=camera, steps_per_epoch=6)
  plan = fixed.epoch(3)
  # Visible: 8 ids, P = 4: every pass is 2 steps holding each id exactly once.
  vis = labels[_chunks(plan, "visible", p, k)[:, :, 0]]
  for start in range(0, 6, 2):
    assert sorted(vis[start:start + 2].reshape(-1).tolist()) == list(range(8))
  # Infrared: 7 ids, P = 4: a pass gives 1 step (the last 3 chunks are dropped, as the
  # reference's drop_last loader), so no step mixes two passes: 4 distinct ids in every step.
  longer = sampler_lib.ClusterSampler(labels, modality, num_identities=p, num_instances=k,
                                      seed=2, camera=camera, steps_per_epoch=30)
  ir = labels[_chunks(longer.epoch(3), "infrared", p, k)[:, :, 0]]
  assert all(len(set(row.tolist())) == p for row in ir)


def test_cluster_fewer_ids_than_p_chain_passes():
  labels = np.array([0, 0, 1, 1, 1, 5, 5, 6])
  modality = np.array([0, 0, 0, 0, 0, 1, 1, 1])
  p, k = 3, 2
  s = sampler_lib.ClusterSampler(labels, modality, num_identities=p, num_instances=k, seed=0,
                                 steps_per_epoch=4)
  plan = s.epoch(0)
  for name, ids in (("visible", [0, 1]), ("infrared", [5, 6])):
    stream = labels[_chunks(plan, name, p, k)[:, :, 0]].reshape(-1)
    assert stream.size == 12
    for start in range(0, 12, 2):  # consecutive passes of the 2 ids
      assert sorted(stream[start:start + 2].tolist()) == ids


def test_cluster_is_deterministic_per_seed_and_epoch():
  labels, modality, camera = _random_records()

  def make(seed):
    return sampler_lib.ClusterSampler(labels, modality, num_identities=3, num_instances=4,
                                      seed=seed, camera=camera)

  a, b, c = make(5), make(5), make(6)
  for name in ("visible", "infrared"):
    np.testing.assert_array_equal(getattr(a.epoch(4), name), getattr(b.epoch(4), name))
    assert not np.array_equal(getattr(a.epoch(4), name), getattr(a.epoch(5), name))
    assert not np.array_equal(getattr(a.epoch(4), name), getattr(c.epoch(4), name))


def test_cluster_modalities_have_independent_label_spaces():
  # Visible pseudo-ids 0..8, infrared ones 100..106: nothing relates the two.
  labels, modality, camera = _random_records(ids_vis=9, ids_ir=7, ir_offset=100)
  p, k = 3, 4
  s = sampler_lib.ClusterSampler(labels, modality, num_identities=p, num_instances=k, seed=0,
                                 camera=camera)
  assert s.steps_per_epoch == 3  # ceil(max(9, 7) / 3)
  plan = s.epoch(1)
  vis, ir = labels[plan.visible], labels[plan.infrared]
  assert set(vis.tolist()) == set(range(9))  # one full pass of 3 steps
  assert set(ir.tolist()) <= set(range(100, 107))
  assert len(set(ir[:2 * p * k].tolist())) == 6  # a pass of 7 ids: 2 steps, 6 distinct
  for m, name in ((0, "visible"), (1, "infrared")):
    for chunk in _chunks(plan, name, p, k).reshape(-1, k):
      _check_chunk(chunk, labels, modality, camera, m, k)


def test_cluster_label_columns_alternate_by_step():
  labels0, modality, camera = _random_records(n=500, ids_vis=8, ids_ir=6)
  rng = np.random.default_rng(9)
  joint = rng.integers(0, 5, len(labels0))  # joint clusters, some records not in any
  joint[rng.random(len(joint)) < 0.3] = -1
  labels0[:20] = -1
  joint[:20] = -1  # records 0..19: in no column, never drawn
  labels0[20:60] = -1  # in column 1 only
  labels = np.stack([labels0, joint], axis=1)
  p, k = 2, 3
  s = sampler_lib.ClusterSampler(labels, modality, num_identities=p, num_instances=k, seed=3,
                                 camera=camera)
  n0 = max(len(np.unique(labels0[(labels0 >= 0) & (modality == m)])) for m in (0, 1))
  assert s.steps_per_epoch == 2 * math.ceil(n0 / p)
  plan = s.epoch(0)
  col1_seen = set()
  for m, name in ((0, "visible"), (1, "infrared")):
    steps = _chunks(plan, name, p, k)
    assert not np.isin(steps, np.arange(20)).any()
    for step_index, step in enumerate(steps):
      column = step_index % 2
      for chunk in step:
        _check_chunk(chunk, labels[:, column], modality, camera, m, k)
      if column:
        col1_seen |= set(step.reshape(-1).tolist())
  assert col1_seen & set(range(20, 60))  # column-1-only records do get drawn
  with pytest.raises(ValueError, match="multiple of the 2 label columns"):
    sampler_lib.ClusterSampler(labels, modality, steps_per_epoch=5)


def test_cluster_errors_name_the_problem():
  labels, modality, _ = _random_records()
  ir_out = np.where(modality == 1, -1, labels)
  with pytest.raises(ValueError, match="no infrared record with a label >= 0 in label column 0"):
    sampler_lib.ClusterSampler(ir_out, modality)
  col1_empty = np.stack([labels, np.where(modality == 0, -1, 0)], axis=1)
  with pytest.raises(ValueError, match="no visible record .* column 1"):
    sampler_lib.ClusterSampler(col1_empty, modality)
  with pytest.raises(ValueError, match="below -1"):
    sampler_lib.ClusterSampler(labels - 5, modality)
  with pytest.raises(ValueError, match="camera has shape"):
    sampler_lib.ClusterSampler(labels, modality, camera=np.zeros(3))


def test_all_sampler_covers_every_kept_record_once_before_padding():
  labels, modality, _ = _random_records(n=300)
  keep = np.random.default_rng(4).random(len(labels)) > 0.1
  used = keep & (labels >= 0)
  vis_ids, ir_ids = np.flatnonzero(used & (modality == 0)), np.flatnonzero(used & (modality == 1))
  p, k = 3, 4
  s = sampler_lib.AllSampler(labels, modality, num_identities=p, num_instances=k, seed=0,
                             keep=keep)
  longer = max(len(vis_ids), len(ir_ids))
  steps = math.ceil(longer / (p * k))
  assert s.steps_per_epoch == steps and s.num_images == (len(vis_ids), len(ir_ids))
  plan = s.epoch(0)
  assert plan.visible.shape == plan.infrared.shape == (steps * p * k,)
  for got, ids in ((plan.visible, vis_ids), (plan.infrared, ir_ids)):
    assert sorted(got[:len(ids)].tolist()) == ids.tolist()  # each once, shuffled
    assert set(got.tolist()) <= set(ids.tolist())  # padding: the modality's own records
    assert not np.array_equal(got[:len(ids)], ids)
  # A longer fixed epoch continues with a new shuffle; a shorter one is cut.
  per_pass = steps * p * k
  long = sampler_lib.AllSampler(labels, modality, num_identities=p, num_instances=k, seed=0,
                                keep=keep, steps_per_epoch=2 * steps + 1)
  lp = long.epoch(0)
  np.testing.assert_array_equal(lp.visible[:per_pass], plan.visible)
  second = lp.visible[per_pass:per_pass + len(vis_ids)]
  assert sorted(second.tolist()) == vis_ids.tolist()
  short = sampler_lib.AllSampler(labels, modality, num_identities=p, num_instances=k, seed=0,
                                 keep=keep, steps_per_epoch=2)
  np.testing.assert_array_equal(short.epoch(0).infrared, plan.infrared[:2 * p * k])


def test_all_sampler_with_label_columns_keeps_records_of_any_column():
  labels = np.array([[0, -1], [-1, 2], [-1, -1], [1, 1], [-1, 0], [-1, -1]])
  modality = np.array([0, 0, 0, 1, 1, 1])
  s = sampler_lib.AllSampler(labels, modality, num_identities=1, num_instances=2)
  plan = s.epoch(0)
  assert s.steps_per_epoch == 1
  assert sorted(plan.visible.tolist()) == [0, 1] and sorted(plan.infrared.tolist()) == [3, 4]


def test_agw_and_mpanet_reject_label_columns():
  labels = np.zeros((8, 2), int)
  modality = np.array([0, 1] * 4)
  for name in ("agw", "mpanet"):
    with pytest.raises(ValueError, match=f"sampler '{name}' takes one label per record"):
      sampler_lib.SAMPLERS[name](labels, modality, num_identities=1, num_instances=1)
    # They accept (and ignore) cameras.
    sampler_lib.SAMPLERS[name](labels[:, 0], modality, num_identities=1, num_instances=1,
                               camera=np.arange(8))


def _meta(labels, modality, camera):
  return {"label": labels, "identity": labels, "camera": camera, "modality": modality}


def test_warm_epochs_switch_sampler_with_the_main_length():
  labels, modality, camera = _random_records()
  labels = np.where(labels < 0, 0, labels)  # dataset labels have no -1
  meta = _meta(labels, modality, camera)
  cfg = pipeline_lib.PipelineConfig(num_identities=3, num_instances=4, sampler="cluster",
                                    warm_epochs=2, seed=7)
  pipe = pipeline_lib.make_train_pipeline([None] * len(labels), cfg, shard_index=0,
                                          shard_count=1, metadata=meta)
  main = sampler_lib.ClusterSampler(labels, modality, num_identities=3, num_instances=4, seed=7,
                                    camera=camera)
  warm = sampler_lib.AllSampler(labels, modality, num_identities=3, num_instances=4, seed=7,
                                steps_per_epoch=main.steps_per_epoch)
  assert warm.steps_per_epoch != sampler_lib.AllSampler(labels, modality, num_identities=3,
                                                        num_instances=4).steps_per_epoch
  assert pipe.steps_per_epoch == main.steps_per_epoch and pipe.local_batch == 12
  assert pipe.sampler.num_images == main.num_images
  for epoch, expect in ((0, warm), (1, warm), (2, main), (5, main)):
    got, want = pipe.sampler.epoch(epoch), expect.epoch(epoch)
    assert got.steps == main.steps_per_epoch
    np.testing.assert_array_equal(got.visible, want.visible)
    np.testing.assert_array_equal(got.infrared, want.infrared)


def test_config_steps_per_epoch_and_validation():
  labels, modality, camera = _random_records()
  labels = np.where(labels < 0, 0, labels)
  meta = _meta(labels, modality, camera)

  def build(cfg, **kw):
    return pipeline_lib.make_train_pipeline([None] * len(labels), cfg, shard_index=0,
                                            shard_count=1, metadata=meta, **kw)

  cfg = pipeline_lib.PipelineConfig(num_identities=3, num_instances=4, steps_per_epoch=7)
  assert build(cfg).steps_per_epoch == 7
  assert build(cfg, steps_per_epoch=5).steps_per_epoch == 5  # the argument wins
  default = build(pipeline_lib.PipelineConfig(num_identities=3, num_instances=4))
  longer = max(np.sum(modality == 0), np.sum(modality == 1))
  assert default.steps_per_epoch == longer // 12 + 1  # agw's own: max(Nv, Ni) // (P*K) + 1
  for field in ("steps_per_epoch", "warm_epochs"):
    with pytest.raises(ValueError, match=f"{field}=-1"):
      pipeline_lib.PipelineConfig(**{field: -1})
  for name in ("cluster", "all"):
    assert pipeline_lib.PipelineConfig(sampler=name).sampler == name


def test_pipeline_rejects_bad_label_shapes_and_agw_columns():
  labels, modality, camera = _random_records(n=40)
  labels = np.where(labels < 0, 0, labels)
  meta = _meta(labels, modality, camera)

  def build(cfg, lab):
    return pipeline_lib.make_train_pipeline([None] * len(labels), cfg, shard_index=0,
                                            shard_count=1, metadata=meta, labels=lab)

  cfg = pipeline_lib.PipelineConfig(num_identities=2, num_instances=2, sampler="cluster")
  with pytest.raises(ValueError, match=r"expected int \[40\] .* or \[40, L\]"):
    build(cfg, np.zeros((40, 2, 1), int))
  with pytest.raises(ValueError, match=r"expected int \[40\]"):
    build(cfg, np.zeros(39, int))
  with pytest.raises(ValueError, match="sampler 'agw' takes one label per record"):
    build(pipeline_lib.PipelineConfig(num_identities=2, num_instances=2),
          np.stack([labels, labels], 1))


def test_pseudo_sampler_pairs_labels_of_both_modalities_with_replacement_below_p():
  """'pseudo': each step's P chunks are one label's K visible and K infrared records; labels
  of one modality only are never drawn; with fewer two-modality labels than P they repeat
  within a step; without any, a clear error."""
  labels = np.array([0] * 5 + [1] * 5 + [2] * 3 + [0] * 4 + [1] * 4 + [3] * 4)
  modality = np.array([0] * 13 + [1] * 12)
  sampler = sampler_lib.PseudoIdentitySampler(labels, modality, num_identities=4,
                                              num_instances=3, seed=1)
  assert sampler.steps_per_epoch == 13 // 12 + 1  # the 'agw' length over every kept record
  plan = sampler.epoch(0)
  vis = plan.visible.reshape(sampler.steps_per_epoch, 4, 3)
  ir = plan.infrared.reshape(sampler.steps_per_epoch, 4, 3)
  for s in range(sampler.steps_per_epoch):
    for j in range(4):
      (lv,), (li,) = np.unique(labels[vis[s, j]]), np.unique(labels[ir[s, j]])
      assert lv == li and lv in (0, 1)  # paired, never the one-modality labels 2 and 3
      assert np.all(modality[vis[s, j]] == 0) and np.all(modality[ir[s, j]] == 1)
  assert len(set(labels[vis[:, :, 0]].ravel().tolist())) == 2  # drawn with replacement
  np.testing.assert_array_equal(sampler.epoch(0).visible, plan.visible)
  with pytest.raises(ValueError, match="both modalities"):
    sampler_lib.PseudoIdentitySampler(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]),
                                      num_identities=1, num_instances=1)
