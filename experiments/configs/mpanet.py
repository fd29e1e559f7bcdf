"""MPANet configs: `python -m experiments.mpanet --config=experiments/configs/mpanet.py:PRESET`.

Presets are `<data>` or `<data>_<row>`:

  data      synthetic (default)  built-in synthetic SYSU-MM01-layout data (100 identities), small
                                 single-stream ResNet at 64x32, 24 epochs; CPU.
            sysu                 SYSU-MM01 at 384x128, ResNet-50 with ImageNet weights, the
                                 released code's recipe (mpanet.md §5), 140 epochs. GPU job.
            regdb                RegDB trial `data.trial` (1..10) at 256x128, P=12 x (5 + 5),
                                 lr x0.1 after epoch 110 (the code's RegDB config). GPU job.
  row       mpanet (default)     full MPANet: MAM (after stages 3, 4) + PAM + CC + ML
            baseline             ResNet + BN-neck + identity CE (Table 3, first row)
            cc                   + center-cluster loss
            ml                   + mutual mean learning (modality classifiers + KL to the means)
            ml_cc                + both
            pam                  + both + pattern alignment (no MAM)
            se                   full, MAM replaced by squeeze-excitation (Table 4)
            in                   full, MAM replaced by plain instance norm (Table 4)
  also      smoke                a few synthetic steps (tests)

Every switch and its default (with its source) is documented in `maumjax/methods/mpanet.py`
(LossConfig) and `maumjax/models/mpanet.py` (MPANet). Paper (Table 1, SYSU all-search single-shot)
R1 70.58 / mAP 68.24; the author's re-run of the released code 68.78 / 65.96 (mpanet.md §7).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

DATA = common.DATA
ROWS = {
    "mpanet": dict(loss=dict(cc=True, ml=True), model=dict(pam=True, modality_attention=2)),
    "baseline": dict(loss=dict(cc=False, ml=False), model=dict(pam=False, modality_attention=0)),
    "cc": dict(loss=dict(cc=True, ml=False), model=dict(pam=False, modality_attention=0)),
    "ml": dict(loss=dict(cc=False, ml=True), model=dict(pam=False, modality_attention=0)),
    "ml_cc": dict(loss=dict(cc=True, ml=True), model=dict(pam=False, modality_attention=0)),
    "pam": dict(loss=dict(cc=True, ml=True), model=dict(pam=True, modality_attention=0)),
    "se": dict(loss=dict(cc=True, ml=True), model=dict(pam=True, modality_attention=2,
                                                        mam_variant="se")),
    "in": dict(loss=dict(cc=True, ml=True), model=dict(pam=True, modality_attention=2,
                                                        mam_variant="in")),
}


def _loss() -> dict:
  """mpanet.md §4, §9: the released code's choices."""
  return dict(w_id=1.0, cc=True, cc_margin=0.7, w_cc=1.0, w_sep=0.5, ml=True, sid_weight=1.0,
              kl_weight=2.5, kl_direction="student_teacher", loss_norm="batch_mean",
              ema_rate=0.2, ema_schedule="code")


def _model() -> dict:
  """ResNet-50, last stride 1, one stream, MAM after stages 3 and 4, PAM with 6 patterns."""
  return dict(name="mpanet", arch="resnet50", last_stride=1, modality_attention=2,
              mam_variant="mam", mam_reduction=16, pam=True, num_parts=6, dtype="float32",
              sync_bn=True, pretrained="")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  preset = preset or "synthetic"
  data, row = common.split_preset(preset, method="MPANet", data=DATA, rows=tuple(ROWS),
                                  default_row="mpanet")
  config = common.base_config("mpanet", preset, num_epochs=140)
  config.model = _model()
  config.loss = _loss()
  # Adam, coupled L2 5e-4, lr 3.5e-4 for every parameter, x0.1 after epochs 80 and 120.
  config.optim.update(name="adam", lr=3.5e-4, backbone_lr_mult=1.0, weight_decay=5e-4,
                      warmup_epochs=0, decay_epochs=(80, 120))
  config.eval.update(sampling="official")
  if data in ("synthetic", "smoke"):
    _synthetic(config)
  elif data == "sysu":
    config.data = common.data_config(name="sysu_mm01", height=384, width=128)
    config.data.pipeline.update(num_identities=16, num_instances=4, sampler="mpanet",
                                augment_rgb="mpanet", augment_ir="mpanet")
  else:
    config.data = common.data_config(name="regdb", height=256, width=128)
    config.data.pipeline.update(num_identities=12, num_instances=5, sampler="mpanet",
                                augment_rgb="mpanet", augment_ir="mpanet")
    config.optim.decay_epochs = (110,)
    # The code ranks RegDB by squared Euclidean distance of unnormalised BN-neck features and
    # uses its SYSU (identity-deduplicated) CMC there too (mpanet.md §6).
    config.eval.update(distance="euclidean", regdb_cmc="dedup")
  if preset == "smoke":
    _smoke(config)
  else:
    config.loss.update(ROWS[row]["loss"])
    config.model.update(ROWS[row]["model"])
  return config


def _synthetic(config: ml_collections.ConfigDict) -> None:
  """CPU-sized: a small ResNet at 64x32, a short schedule with the recipe's shape.

  `small` (widths 16-128), not `tiny` (8-64): with tiny's channels the instance norm of the
  MAM (on 4 x 2 maps) leaves too little identity information, and the full model stayed near
  chance (all-search R1 6.5-7.9% over seeds; the SE row, the same gate without the norm,
  14.5%); README "Training MPANet" has the measurements.
  """
  config.data = common.synthetic_data(augment="mpanet_small", num_identities=8,
                                      num_instances=4, sampler="mpanet")
  config.model.update(arch="small", num_parts=4)
  config.num_epochs = 24
  config.optim.update(lr=1e-3, decay_epochs=(16, 22))
  # The synthetic data have no rand_perm_cam.mat: AGW's gallery sampler.
  config.eval.update(sampling="agw", batch_size=128, num_ranked=6)
  config.train.update(log_every=10, checkpoint_every_epochs=4, eval_every_epochs=8)


def _smoke(config: ml_collections.ConfigDict) -> None:
  """Seconds: 16 identities at 32x16, two short epochs (tests and quick checks)."""
  _synthetic(config)
  common.shrink_to_smoke(config)
  config.model.update(arch="tiny", num_parts=2)
