"""MAUM configs.

Presets (select with `--config=experiments/configs/maum.py:NAME`):
  synthetic (default)  the built-in synthetic SYSU-MM01-layout data at 128x64, CPU-sized.
                       `python -m experiments.maum`
  sysu                 real SYSU-MM01 at 288x144; set --config.data.manual_dir.
  regdb                real RegDB trial 1 at 288x144; set --config.data.manual_dir and
                       --config.data.trial.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

PRESETS = ("synthetic", "sysu", "regdb")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  preset = preset or "synthetic"
  if preset not in PRESETS:
    raise ValueError(f"unknown MAUM preset {preset!r}; choose one of {PRESETS}")
  config = ml_collections.ConfigDict()
  config.method = "maum"
  config.preset = preset
  config.seed = 0
  if preset == "synthetic":
    config.data = common.data_config(name="sysu_mm01", height=128, width=64)
  elif preset == "sysu":
    config.data = common.data_config(name="sysu_mm01")
  else:
    config.data = common.data_config(name="regdb")
  return config
