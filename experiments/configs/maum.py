"""MAUM configs: `python -m experiments.maum --config=experiments/configs/maum.py:PRESET`.

Presets are `<data>` or `<data>_<row>`:

  data      synthetic (default)  built-in synthetic SYSU-MM01-layout data (100 identities), tiny
                                 ResNet at 64x32, 24 epochs; about 2 minutes on a 2-core CPU.
            sysu                 SYSU-MM01 at 288x144, ResNet-50 with ImageNet weights, the
                                 AGW recipe (maum.md §6), 81 epochs. GPU job.
            regdb                RegDB trial `data.trial` (1..10), same recipe. GPU job.
  row       maum (default)       full MAUM: MS-proxies + unidirectional metrics + memory (K=8)
            baseline             shared proxies + triplet (the relay baseline)
            ms                   modality-specific proxies only
            uni                  MS-proxies + unidirectional metrics, no memory (K=0)
            bidir                control: cross-modality terms WITHOUT stop-gradient
  also      smoke                a few synthetic steps (tests)

Examples:
  python -m experiments.maum                                         # synthetic demo
  python -m experiments.maum --config=experiments/configs/maum.py:synthetic_baseline
  python -m experiments.maum --config=experiments/configs/maum.py:sysu \\
      --config.data.manual_dir=/data/SYSU-MM01 \\
      --config.model.pretrained=/weights/resnet50-0676ba61.pth --workdir=runs/maum_sysu
  python -m experiments.maum --config=experiments/configs/maum.py:regdb \\
      --config.data.manual_dir=/data/RegDB --config.data.trial=3 \\
      --config.model.pretrained=/weights/resnet50.safetensors --workdir=runs/maum_regdb_3

Any field can be overridden with `--config.<section>.<field>=value`; every switch and its
default (with its source tag) is documented in `maumjax/methods/maum.py` (LossConfig),
`experiments/configs/common.py` (the run's top level, optim, train and eval sections),
`maumjax/models/reid.py` (ReidNet), `maumjax/train/optim.py` (OptimConfig) and
`maumjax/data/pipeline.py` (PipelineConfig). `python -m experiments.maum --help` lists the presets
and every field with its default (`--config=experiments/configs/maum.py:sysu --help`: the
sysu preset's); a misspelled field or preset is refused with the closest valid names.

Paper numbers to compare with (single-shot, part-feature MAUM, maum.md §8): SYSU all-search
R1 71.68 / mAP 68.79, indoor-search 76.97 / 81.94; RegDB visible->thermal 87.87 / 85.09,
thermal->visible 86.95 / 84.34.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

DATA = common.DATA
ROWS = {
    "maum": dict(shared_proxy=False, ms_proxy=True, uni=True, memory_size=8),
    "baseline": dict(shared_proxy=True, ms_proxy=False, uni=False, memory_size=0),
    "ms": dict(shared_proxy=False, ms_proxy=True, uni=False, memory_size=0),
    "uni": dict(shared_proxy=False, ms_proxy=True, uni=True, memory_size=0),
    "bidir": dict(shared_proxy=False, ms_proxy=True, uni=True, memory_size=8,
                  uni_stop_gradient=False),
}


def _loss() -> dict:
  """maum.md §11 defaults."""
  return dict(metric="circle", gamma=64.0, margin=0.25, scale=16.0, shared_proxy=False,
              ms_proxy=True, uni=True, uni_stop_gradient=True, uni_start_epoch=10, memory_size=8,
              mem_mode="fifo", mem_update_every=1, mem_momentum=0.9, triplet=True,
              tri_margin=0.3, tri_on="concat", head_reduce="sum", w_ms=1.0, w_uni=1.0, w_tri=1.0,
              w_shared=1.0, proxy_init_std=0.001, proxy_unit_norm=False,
              mask_absent_classes=True)


def _model() -> dict:
  """ResNet-50, last stride 1, two-stream stem, 6 parts x 256-d (maum.md §2)."""
  return dict(name="reid", arch="resnet50", last_stride=1, specific_stages=1, head="parts",
              pool="gem", part_pool="gem", gem_p=3.0, num_parts=6, part_dim=256, dtype="float32",
              sync_bn=True, pretrained="")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  return common.agw_method_config(preset, method="maum", title="MAUM", rows=ROWS,
                                  default_row="maum", model=_model(), loss=_loss(),
                                  synthetic=_synthetic, smoke=_smoke)


def _synthetic(config: ml_collections.ConfigDict) -> None:
  """CPU-sized: tiny ResNet, 64x32 images, a short schedule with the recipe's shape."""
  config.data = common.synthetic_data(augment="agw_small")
  config.model.update(arch="tiny", num_parts=4, part_dim=64)
  config.num_epochs = 24
  # From scratch, so the backbone trains at the head's lr (the 0.1 factor is for ImageNet
  # weights), and both at 0.01: at the recipe's 0.1 the tiny model underfits (Circle loss barely
  # falls) and the rows' ranking changes from seed to seed. Warm-up, phase switch and decay keep
  # the recipe's shape on a short schedule.
  config.optim.update(lr=0.01, backbone_lr_mult=1.0, warmup_epochs=4, decay_epochs=(16, 22))
  config.loss.update(uni_start_epoch=4)
  config.train.update(log_every=10, checkpoint_every_epochs=4, eval_every_epochs=8)
  config.eval.update(batch_size=128, num_ranked=6)


def _smoke(config: ml_collections.ConfigDict) -> None:
  """Seconds: 16 identities at 32x16, two short epochs (tests and quick checks)."""
  _synthetic(config)
  common.shrink_to_smoke(config)
  config.model.update(num_parts=2, part_dim=16)
  config.optim.warmup_epochs = 1
  config.loss.update(uni_start_epoch=1, memory_size=2)
