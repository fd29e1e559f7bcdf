"""MMM configs: `python -m experiments.mmm --config=experiments/configs/mmm.py:PRESET`.

Presets are `<data>` or `<data>_<row>`:

  data      synthetic (default)  built-in synthetic SYSU-MM01-layout data (100 identities),
                                 tiny two-stream ResNet at 64x32, every stage shortened; CPU.
            sysu                 SYSU-MM01 at 288x144, ResNet-50 with ImageNet weights, the
                                 released code's recipe (mmm.md §5, §7): stages 1 and 2 of
                                 50 epochs x 200 iterations, the final stage 100 epochs. GPU job.
            regdb                RegDB trial `data.trial` (1..10): 100 iterations per epoch,
                                 DBSCAN eps 0.3, joint k1 38 / k2 18. GPU job.
  row       full (default)       CMC (stages 1, 2) + MMLM + Intra + Inter (mmm.md §10 ablation)
            cmc                  CMC only: stages 1 and 2, the stage-2 model is the result
            mmlm                 + MMLM: the final stage with CE + triplet, no SCA
            mmlm_intra           + Intra
            mmlm_inter           + Inter
            paper                the paper's online pipeline (mmm.md §1, §9 row 1), one
                                 stage 'online': per-epoch re-clustering, joint memory and
                                 Hungarian matching (cost over the visible sub-memories),
                                 ClusterNCE + Intra (squared L2, from the first epoch) + Inter
                                 (the paper's normalisation, from epoch 15, i.e. index 14), no
                                 triplet; P = 8 x (4 + 4), 80 epochs of Adam 3.5e-4 [I: the
                                 optimiser and iterations are the memory stages']
  also      smoke                a few synthetic steps per stage (tests); smoke_paper likewise

`config.stages` (comma-separated, in order, from 'stage1', 'stage2', 'mmlm', 'final'; or
'online' alone, the paper pipeline) picks the stages to run; a stage whose run finished in the workdir is not run again, and an
interrupted one resumes from its last checkpoint. The sections:

  mmm       clustering, memory and final-stage loss switches (`maumjax.methods.mmm.MMMConfig`)
  mmlm      matching: greedy (code) | hungarian (paper), cost_sum_over ir (code) | visible
            (paper), unmatched nearest | keep_own_label | drop, off_by_one (the code's bug,
            default off), sub_memories n = 4
  stage1, stage2, final, online
            each stage's epochs, optimiser and pipeline fields (sampler, P, K, steps per
            epoch); the shared data, model, train and eval sections apply to every stage.

Paper (mmm.md §10, unverified reading): SYSU all-search R1 61.6 / mAP 57.9, RegDB visible to
thermal 89.7 / 80.5.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

DATA = common.DATA
STAGE_NAMES = ("stage1", "stage2", "mmlm", "final")
ROWS = {
    "full": dict(stages="stage1,stage2,mmlm,final", intra=True, inter=True),
    "cmc": dict(stages="stage1,stage2", intra=True, inter=True),
    "mmlm": dict(stages="stage1,stage2,mmlm,final", intra=False, inter=False),
    "mmlm_intra": dict(stages="stage1,stage2,mmlm,final", intra=True, inter=False),
    "mmlm_inter": dict(stages="stage1,stage2,mmlm,final", intra=False, inter=True),
    "paper": dict(stages="online", intra=True, inter=True),
}


def _mmm() -> dict:
  """`MMMConfig`'s fields a user sets (the stage and the hand-offs are the driver's)."""
  return dict(pipeline="code_offline", k1=30, k2=6, joint_k1=40, joint_k2=32, eps=0.6,
              min_samples=4, max_clusters=1024, feature_batch=128, temperature=0.05,
              mem_momentum=0.1, mem_update="sequential", warm_epochs=5, use_ce=True,
              use_triplet=True, margin=0.2, intra=True, intra_form="l1_weighted", sm_w=0.5,
              intra_start=5, inter=True, inter_norm="code", md_w=0.05, inter_start=5,
              gmm_pass_mode="train", diagnostics=True, joint_fallback="all_clusters")


def _memory_stage(epochs: int, iters: int) -> ml_collections.ConfigDict:
  """Stages 1 and 2 (Baseline.py): Adam 3.5e-4 (coupled L2 5e-4) for every parameter, x0.1
  every 20 epochs, P = 8 pseudo-ids x K = 16 per modality, the camera-aware sampler."""
  return ml_collections.ConfigDict({
      "num_epochs": epochs,
      "optim": common.optim_config(name="adam", lr=3.5e-4, backbone_lr_mult=1.0,
                                   weight_decay=5e-4, warmup_epochs=0,
                                   decay_epochs=tuple(range(20, epochs, 20))),
      # steps_per_epoch counts iterations: stage 2 runs two optimiser steps per iteration.
      "pipeline": {"sampler": "cluster", "num_identities": 8, "num_instances": 16,
                   "steps_per_epoch": iters},
  })


def _final_stage(epochs: int) -> ml_collections.ConfigDict:
  """main.py: SGD 0.1 (backbone 0.01), Nesterov, warm-up 10, x0.1 at 20 and 40 (not AGW's
  50), P = 6 x (4 + 4), 5 CE-only epochs over every image first."""
  return ml_collections.ConfigDict({
      "num_epochs": epochs,
      "optim": common.optim_config(warmup_epochs=10, decay_epochs=(20, 40)),
      "pipeline": {"sampler": "agw", "num_identities": 6, "num_instances": 4,
                   "steps_per_epoch": 0},
  })


def _online_stage(epochs: int, iters: int) -> ml_collections.ConfigDict:
  """The paper pipeline's one stage: the memory stages' optimiser [I], the identity sampler
  over the matched pseudo-labels that hold both modalities ('pseudo'), P = 8 x (4 + 4) (the
  paper's batch, mmm.md §9 row 9)."""
  stage = _memory_stage(epochs, iters)
  stage.pipeline = {"sampler": "pseudo", "num_identities": 8, "num_instances": 4,
                    "steps_per_epoch": iters}
  return stage


def _paper(config: ml_collections.ConfigDict, inter_start: int) -> None:
  """The paper's choices (mmm.md §9 rows 1-3, 5-7, 13)."""
  config.mmm.update(pipeline="paper_online", intra_form="l2sq", inter_norm="paper",
                    intra_start=0, inter_start=inter_start, use_triplet=False)
  config.mmlm.update(matching="hungarian", cost_sum_over="visible", unmatched="nearest")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  preset = preset or "synthetic"
  data, row = common.split_preset(preset, method="MMM", data=DATA + ("smoke",),
                                  rows=tuple(ROWS), default_row="full")
  config = common.base_config("mmm", preset, num_epochs=0)
  del config.optim  # each stage has its own optimiser and length
  del config.num_epochs
  config.stages = ROWS[row]["stages"]
  # The AGW network (mmm.md §3): two modality-specific stems, shared layers 1-4 with AGW's
  # non-local blocks, GeM p = 3 with the code's +1e-12 after the mean, a BN-neck. The paper's
  # "shared ResNet-50" (§9 row 11) is specific_stages=0, non_local='none'.
  config.model = dict(name="reid", arch="resnet50", last_stride=1, specific_stages=1,
                      head="global", pool="gem_mean_eps", gem_p=3.0, non_local="agw",
                      dtype="float32", sync_bn=True, pretrained="")
  config.mmm = _mmm()
  config.mmm.update(intra=ROWS[row]["intra"], inter=ROWS[row]["inter"])
  config.mmlm = dict(matching="greedy", cost_sum_over="ir", unmatched="nearest",
                     off_by_one=False, sub_memories=4)
  config.stage1 = _memory_stage(50, 200)
  config.stage2 = _memory_stage(50, 200)
  config.final = _final_stage(100)
  config.online = _online_stage(80, 200)
  if row == "paper":
    _paper(config, inter_start=14)
  # The code evaluates with AGW's random gallery (sampler A), as every AGW-family method.
  config.eval.update(sampling="agw")
  if data in ("synthetic", "smoke"):
    _synthetic(config, paper=row == "paper")
  else:
    config.data = common.data_config(name={"sysu": "sysu_mm01", "regdb": "regdb"}[data])
    config.data.pipeline.update(augment_rgb="caj_visible", augment_ir="caj_thermal")
    if data == "regdb":
      config.mmm.update(eps=0.3, joint_k1=38, joint_k2=18)
      for stage in (config.stage1, config.stage2, config.online):
        stage.pipeline.steps_per_epoch = 100
  if data == "smoke":
    _smoke(config)
  return config


def _synthetic(config: ml_collections.ConfigDict, paper: bool = False) -> None:
  """CPU-sized: tiny ResNet from scratch at 64x32, short stages."""
  config.data = common.synthetic_data(augment="agw_small")
  config.model.update(arch="tiny")
  config.mmm.update(max_clusters=256, warm_epochs=2, intra_start=2, inter_start=2)
  config.stage1 = _memory_stage(4, 20)
  config.stage2 = _memory_stage(3, 20)
  for stage in (config.stage1, config.stage2):
    stage.pipeline.update(num_identities=8, num_instances=8)
    stage.optim.update(lr=1e-3)
  config.final = _final_stage(12)
  config.final.optim.update(lr=0.01, backbone_lr_mult=1.0, warmup_epochs=2, decay_epochs=(8,))
  config.final.pipeline.steps_per_epoch = 40
  # The paper pipeline: as long as stages 1 + 2 together, Inter from the same fraction of the
  # run as the paper's 15 of 80 epochs.
  config.online = _online_stage(8, 20)
  config.online.optim.update(lr=1e-3)
  if paper:
    config.mmm.update(intra_start=0, inter_start=2)
  config.train.update(log_every=10, checkpoint_every_epochs=2, eval_every_epochs=0)
  config.eval.update(batch_size=128, num_ranked=6)


def _smoke(config: ml_collections.ConfigDict) -> None:
  """Seconds per stage: 16 identities at 32x16, two or three short epochs each (tests)."""
  config.data.height, config.data.width = 32, 16
  config.data.synthetic.update(num_identities=16, images_per_camera=10, height=64, width=32)
  config.train.update(log_every=1, checkpoint_every_epochs=1, eval_every_epochs=0,
                      progress=False)
  config.eval.update(trials=2, batch_size=32, num_ranked=2)
  config.mmm.update(max_clusters=128, feature_batch=64, k1=6, k2=3, joint_k1=30, joint_k2=10,
                    eps=0.6, warm_epochs=1, intra_start=1, inter_start=1)
  for stage in (config.stage1, config.stage2):
    stage.num_epochs = 2
    stage.optim.update(decay_epochs=())
    stage.pipeline.update(num_identities=4, num_instances=4, steps_per_epoch=2)
  config.final.num_epochs = 2
  config.final.optim.update(warmup_epochs=1, decay_epochs=())
  config.online.num_epochs = 2
  config.online.optim.update(decay_epochs=())
  config.online.pipeline.update(num_identities=4, num_instances=2, steps_per_epoch=2)
  if config.mmm.pipeline == "paper_online":
    config.mmm.update(intra_start=0, inter_start=0)  # one phase: one compiled step
  config.final.pipeline.update(num_identities=4, num_instances=2, steps_per_epoch=3)
