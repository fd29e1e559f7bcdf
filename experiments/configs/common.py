"""Config pieces shared by every method: the run's top level, data, optimiser, train, eval.

A method's config file (`experiments/configs/<method>.py`) starts from `base_config` and adds
its own `model` and `loss` sections and presets.
"""

from __future__ import annotations

import ml_collections


def data_config(*, name: str = "sysu_mm01", height: int = 288,
                width: int = 144) -> ml_collections.ConfigDict:
  """Data settings. An empty `manual_dir` selects the built-in synthetic data.

  Fields mirror `maumjax.data.prepare.prepare_dataset` and
  `maumjax.data.pipeline.PipelineConfig`; see their docstrings for every default.
  """
  return ml_collections.ConfigDict({
      "name": name,  # 'sysu_mm01' or 'regdb'
      "manual_dir": "",  # extracted SYSU-MM01 / RegDB folder; '' = synthetic data
      "data_dir": "",  # TFDS data_dir; '' = ~/.cache/maumjax/tfds/...
      "height": height,
      "width": width,
      "trial": 1,  # RegDB trial 1..10
      "image_format": "png",
      "synthetic": {
          "num_identities": 40,
          "images_per_camera": 12,
          "images_per_modality": 10,
          "height": 128,
          "width": 64,
          "seed": 0,
          # SYSU layout: weight of reflected near-infrared light in the infrared images (SYSU's
          # infrared cameras are near-infrared ones); 0 renders them thermal only.
          "nir": 0.0,
      },
      "pipeline": {
          "num_identities": 8,  # P
          "num_instances": 4,  # K
          "augment_rgb": "agw",
          "augment_ir": "agw",
          "augment_on": "device",
          "cache": "none",
          "num_threads": 4,
          "num_workers": 0,
          "prefetch": 4,
          "imbalance_fraction": 1.0,
          "imbalance_modality": 1,
          "imbalance_unit": "images",
          "seed": 0,
          "sampler": "agw",  # 'agw' (AGW / MAUM) or 'mpanet' (one pass of paired chunks)
          "epoch_fraction": 1.0,  # < 1: shorter epochs, the same schedule in epochs
      },
  })


def synthetic_data(*, augment: str, **pipeline) -> ml_collections.ConfigDict:
  """The CPU demos' data: the built-in synthetic SYSU-MM01 layout, 100 identities, 10 images per
  camera folder, read at 64x32, with the augmentation preset `augment` for both modalities
  (`pipeline` overrides further pipeline fields)."""
  data = data_config(name="sysu_mm01", height=64, width=32)
  data.synthetic.update(num_identities=100, images_per_camera=10)
  data.pipeline.update(num_threads=2, augment_rgb=augment, augment_ir=augment, **pipeline)
  return data


def shrink_to_smoke(config: ml_collections.ConfigDict) -> None:
  """The `smoke` presets' part every method shares: 16 identities at 32x16, P = 4 x (2 + 2),
  two epochs without decay, a log line and a checkpoint every step / epoch, two trials."""
  config.data.height, config.data.width = 32, 16
  config.data.synthetic.update(num_identities=16, images_per_camera=10, height=64, width=32)
  config.data.pipeline.update(num_identities=4, num_instances=2)
  config.num_epochs = 2
  config.optim.update(decay_epochs=())
  config.train.update(log_every=1, checkpoint_every_epochs=1, eval_every_epochs=0,
                      progress=False)
  config.eval.update(trials=2, batch_size=32, num_ranked=2)


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """Optimiser (`maumjax.train.optim.OptimConfig`); default the AGW recipe (protocol.md §5.4)."""
  fields = dict(name="sgd", lr=0.1, backbone_lr_mult=0.1, momentum=0.9, nesterov=True,
                weight_decay=5e-4, warmup_epochs=10, decay_epochs=(20, 50), decay_factor=0.1,
                grad_clip=0.0)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def train_config(**overrides) -> ml_collections.ConfigDict:
  """The loop's cadence (`maumjax.train.loop`): logging, checkpoints, quick evaluations."""
  fields = dict(log_every=50, checkpoint_every_epochs=5, checkpoint_every_steps=0,
                keep_checkpoints=2, eval_every_epochs=10, progress=True, tensorboard=True)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def eval_config(**overrides) -> ml_collections.ConfigDict:
  """Evaluation (`maumjax.train.evaluation`): trials, SYSU settings, gallery sampler, TTA.

  sampling: SYSU-MM01 gallery sampler, 'agw' (AGW's python-random draw) or 'official'
    (rand_perm_cam.mat). distance: 'cosine' (L2-normalised features, AGW; ranks as MPANet's
    squared Euclidean of normalised features) or 'euclidean' (squared Euclidean of unnormalised
    features, MPANet's RegDB). regdb_cmc: 'plain' (AGW) or 'dedup' (identity-deduplicated,
    MPANet's code). select: the model the final evaluation scores, 'last' (the final state) or
    'best_on_test' (the state of the best quick evaluation, every `train.eval_every_epochs`
    epochs and after the last, kept in <workdir>/best: model selection on the test set, as
    MPANet's released code does; its numbers are optimistic). select_metric: what 'best'
    means, 'r1' (the first setting's Rank-1) or 'mAP'. Checked before training
    (`evaluation.check_config`).
  """
  fields = dict(trials=10, quick_trials=1, modes=("all", "indoor"), shots=(1, 10),
                sampling="agw", distance="cosine", regdb_cmc="plain", select="last",
                select_metric="r1", batch_size=64, flip=False, num_ranked=8)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def base_config(method: str, preset: str, *, num_epochs: int) -> ml_collections.ConfigDict:
  """Top-level run fields plus the shared optim, train and eval sections (no data/model/loss)."""
  config = ml_collections.ConfigDict()
  config.method = method
  config.preset = preset
  config.seed = 0
  config.parallel = "shard_map"  # 'shard_map' | 'pmap' | 'none' (one device)
  config.distributed = False  # call jax.distributed.initialize() (multi-process launch)
  # Where no cluster is detected (SLURM, Open MPI, Kubernetes, TPU pods do it): the coordinator's
  # host:port, the process count and this process's id; '' / 0 / -1 leave them to detection.
  config.coordinator_address = ""
  config.num_processes = 0
  config.process_id = -1
  config.num_epochs = num_epochs
  config.optim = optim_config()
  config.train = train_config()
  config.eval = eval_config()
  return config


# The data names of every method's presets (`<data>[_<row>]`); a config file lists them as
# `DATA` next to its `ROWS`, which is how the command line enumerates its presets.
DATA = ("synthetic", "sysu", "regdb")


def agw_method_config(preset: str | None, *, method: str, title: str, rows: dict[str, dict],
                      default_row: str, model: dict, loss: dict, synthetic, smoke,
                      num_epochs: int = 81) -> ml_collections.ConfigDict:
  """The config of a method trained with the AGW recipe at 288x144 (MAUM, BDF) for a preset.

  Args:
    preset: `<data>[_<row>]` with data in ('synthetic', 'sysu', 'regdb'), or 'smoke'; None is
      'synthetic'.
    method: the config's `method`.
    title: the method's name in error messages.
    rows: row name -> the `loss` fields it sets (not applied to 'smoke').
    default_row: the row of a bare `<data>` preset.
    model, loss: the method's `model` and `loss` sections (the real-data defaults).
    synthetic, smoke: `config -> None` editors for the synthetic and smoke presets (`smoke`
      runs after `synthetic`).
    num_epochs: the recipe's epochs.
  """
  preset = preset or "synthetic"
  data, row = split_preset(preset, method=title, data=DATA,
                           rows=tuple(rows), default_row=default_row)
  config = base_config(method, preset, num_epochs=num_epochs)
  config.model = model
  config.loss = loss
  if data in ("synthetic", "smoke"):
    synthetic(config)
  else:
    config.data = data_config(name={"sysu": "sysu_mm01", "regdb": "regdb"}[data])
  if preset == "smoke":
    smoke(config)
  else:
    config.loss.update(rows[row])
  return config


def split_preset(preset: str, *, method: str, data: tuple[str, ...], rows: tuple[str, ...],
                 default_row: str, extra: tuple[str, ...] = ("smoke",)) -> tuple[str, str]:
  """`<data>[_<row>]` -> (data, row); `extra` presets (e.g. 'smoke') pass through as data.

  Raises:
    ValueError: an unknown data name or row, listing the valid ones.
  """
  name, _, row = preset.partition("_")
  row = row or default_row
  if preset not in extra and (name not in data or row not in rows):
    raise ValueError(f"unknown {method} preset {preset!r}; use <data>[_<row>] with data in "
                     f"{data} and row in {rows}, or one of {extra}")
  return name, row
