"""BDF configs: `python -m experiments.bdf --config=experiments/configs/bdf.py:PRESET`.

Presets are `<data>` or `<data>_<row>`:

  data      synthetic (default)  built-in synthetic SYSU-MM01-layout data (100 identities), tiny
                                 ResNet at 64x32, 16 epochs; about 3 minutes on a 2-core CPU.
            sysu                 SYSU-MM01 at 288x144, ResNet-50 with ImageNet weights, the AGW
                                 recipe (bdf.md §5): SGD 0.1 (backbone 0.01), warm-up 10,
                                 x0.1 at epochs 20 and 50, 81 epochs, P=8 x (4 + 4) base images
                                 (128 with the derivatives). GPU job.
            regdb                RegDB trial `data.trial` (1..10), the same recipe. GPU job.
  row       full (default)       derivatives + DID + MML + MDL
            base                 no derivatives: identity CE + AGW's batch-hard triplet
            did                  derivative inputs, DID (identity CE over the 4 modalities) only
            did_mml              DID + MML
            did_mdl              DID + MDL
  also      smoke                a few synthetic steps (tests)

The reconstruction's switches (bdf.md §7) are fields: the I^ derivation
`--config.model.derive_ir=` contrast_gamma (default) | learnable_1x1 | hist_eq | invert |
pseudocolor; `--config.model.stems=` shared | by_origin | four; `--config.model.tta_derivative`;
`--config.loss.derive_where=` after_augment | before_augment; `--config.loss.did_mode=` ce |
ce_plus_consistency; `--config.loss.homologous=` intra | cross; `--config.loss.family=`
batch_hard | center. Every switch and its default
is documented in `maumjax/methods/bdf.py` (LossConfig) and `maumjax/models/bdf.py` (BDFNet).

Poster numbers (single-shot, bdf.md §6): SYSU all-search R1 51.05 / mAP 49.63, indoor-search
55.93 / 63.38; RegDB visible to thermal 80.67 / 78.83.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

DATA = common.DATA
ROWS = {
    "full": dict(derivatives=True, tri=False, mml=True, mdl=True),
    "base": dict(derivatives=False, tri=True, mml=False, mdl=False),
    "did": dict(derivatives=True, tri=False, mml=False, mdl=False),
    "did_mml": dict(derivatives=True, tri=False, mml=True, mdl=False),
    "did_mdl": dict(derivatives=True, tri=False, mml=False, mdl=True),
}


def _loss() -> dict:
  """bdf.md §4, §7 defaults (all [I])."""
  return dict(derivatives=True, derive_where="after_augment", w_id=1.0, did_mode="ce",
              label_smoothing=0.0, tri=False, w_tri=1.0, mml=True, w_mml=1.0, mdl=True,
              w_mdl=1.0, margin=0.3, family="batch_hard", homologous="intra")


def _model() -> dict:
  """ResNet-50, last stride 1, one shared stream, GeM, BN-neck (bdf.md §3)."""
  return dict(name="bdf", arch="resnet50", last_stride=1, stems="shared", pool="gem",
              gem_p=3.0, derive_vis="grey", derive_ir="contrast_gamma", tta_derivative=False,
              dtype="float32", sync_bn=True, pretrained="")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  return common.agw_method_config(preset, method="bdf", title="BDF", rows=ROWS,
                                  default_row="full", model=_model(), loss=_loss(),
                                  synthetic=_synthetic, smoke=_smoke)


def _synthetic(config: ml_collections.ConfigDict) -> None:
  """CPU-sized: tiny ResNet, 64x32 images, a short schedule with the recipe's shape.

  From scratch, so the backbone trains at the head's lr and both at 0.01 (as MAUM's synthetic
  preset, for the same reason: the recipe's 0.1 is for a pretrained backbone).
  """
  config.data = common.synthetic_data(augment="agw_small")
  config.model.update(arch="tiny")
  # 16 epochs (MAUM's demo has 24): every step runs twice the images (the derivatives).
  config.num_epochs = 16
  config.optim.update(lr=0.01, backbone_lr_mult=1.0, warmup_epochs=3, decay_epochs=(10, 14))
  config.train.update(log_every=10, checkpoint_every_epochs=4, eval_every_epochs=8)
  config.eval.update(batch_size=128, num_ranked=6)


def _smoke(config: ml_collections.ConfigDict) -> None:
  """Seconds: 16 identities at 32x16, two short epochs (tests and quick checks)."""
  _synthetic(config)
  common.shrink_to_smoke(config)
  config.optim.warmup_epochs = 1
