"""A run's training data: the prepared dataset, its pipeline and the facts a method needs.

Shared by the loop (`train/loop.py`) and by the evaluation of a saved run
(`train/evaluation.py`), so neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from maumjax.data import pipeline as pipeline_lib
from maumjax.data import prepare as prepare_lib
from maumjax.methods import api


def prepare(config: Mapping[str, Any]):
  """Prepares the dataset of a run config and its training pipeline.

  Returns:
    (prepared dataset, pipeline config, train pipeline, train source).
  """
  prepared = prepare_lib.prepare_from_config(config["data"])
  source = pipeline_lib.open_train_source(prepared.builder)
  pipe_cfg = pipeline_lib.PipelineConfig(**config["data"]["pipeline"])
  return prepared, pipe_cfg, pipeline_lib.make_train_pipeline(source, pipe_cfg), source


def data_info(pipe: pipeline_lib.TrainPipeline, config: Mapping[str, Any]) -> api.DataInfo:
  """The `DataInfo` of a run: classes (per modality, after the imbalance subset), image shape
  and steps per epoch."""
  meta = pipe.metadata
  return api.DataInfo.from_labels(meta["label"], meta["modality"], pipe.keep,
                                  image_shape=(config["data"]["height"], config["data"]["width"]),
                                  steps_per_epoch=pipe.steps_per_epoch)


def check_labels(labels: Any, num_records: int, who: str) -> np.ndarray:
  """Validates relabelled training labels: int [N], or int [N, L] label columns (e.g. MMM stage
  2's per-modality and joint clusters), with -1 for records left out (of a column).

  Raises:
    ValueError: wrong shape, non-integers, or values below -1; names `who` (the method).
  """
  arr = np.asarray(labels)
  shape_ok = (arr.ndim in (1, 2) and arr.shape[0] == num_records
              and (arr.ndim == 1 or arr.shape[1] >= 1))
  if not shape_ok or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{who}.on_epoch_start returned labels of shape {arr.shape} and dtype "
                     f"{arr.dtype}; expected int [{num_records}] (one label per train record) or "
                     f"int [{num_records}, L] (L label columns), -1 for records left out")
  if arr.size and arr.min() < -1:
    raise ValueError(f"{who}.on_epoch_start returned label {int(arr.min())}; labels are >= 0, "
                     "or -1 for records left out")
  return arr.astype(np.int64)
