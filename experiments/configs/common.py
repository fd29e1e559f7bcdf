"""Config pieces shared by every method: data and input pipeline."""

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
      },
  })
