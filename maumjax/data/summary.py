"""A readable summary of a prepared dataset and one training batch (the data demo)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from maumjax.data import pipeline as pipeline_lib
from maumjax.data import prepare as prepare_lib


def describe_batch(batch: Mapping[str, Any]) -> list[str]:
  """One line per modality: image shape/dtype/range and the labels of the batch."""
  lines = []
  for name in ("rgb", "ir"):
    part = batch[name]
    img = np.asarray(part["image"])
    labels = np.asarray(part["label"])
    lines.append(
        f"  {name:3s} image {tuple(img.shape)} {img.dtype} range [{img.min():.3f}, "
        f"{img.max():.3f}] mean {img.mean():+.3f}; cameras {sorted(set(part['camera'].tolist()))}"
        f"; labels {labels.tolist()}")
  return lines


def prepare_and_describe(data: Mapping[str, Any]) -> str:
  """Prepares the dataset of `data`, builds the pipeline and describes one training batch."""
  t0 = time.perf_counter()
  prepared = prepare_lib.prepare_from_config(data)
  t_prep = time.perf_counter() - t0
  info = prepared.builder.info
  source = pipeline_lib.open_train_source(prepared.builder)
  cfg = pipeline_lib.PipelineConfig(**data["pipeline"])
  t0 = time.perf_counter()
  pipe = pipeline_lib.make_train_pipeline(source, cfg)
  it = pipe.iterator(num_epochs=1)
  batch = next(it)
  t_batch = time.perf_counter() - t0
  it.close()
  shipped = []
  if cfg.augment_on == "device":
    import jax

    shipped = [f"  shipped as {batch['rgb']['image'].dtype} + augmentation parameters; after "
               "device_augment (jitted):"]
    batch = jax.device_get(jax.jit(lambda b: pipeline_lib.device_augment(b, cfg))(batch))
  meta = pipe.metadata
  n_vis, n_ir = pipe.sampler.num_images
  splits = ", ".join(f"{k} {v.num_examples}" for k, v in sorted(info.splits.items()))
  lines = [
      f"dataset   {prepared.name} ({'synthetic' if prepared.synthetic else 'user data'}) "
      f"config {prepared.builder.builder_config.name}",
      f"source    {prepared.manual_dir}",
      f"tfds      {prepared.builder.data_dir}",
      f"splits    {splits}",
      f"train     {len(np.unique(meta['label']))} identities, {n_vis} visible + {n_ir} "
      f"infrared images in use",
      f"sampler   P={cfg.num_identities} identities x K={cfg.num_instances} per modality, "
      f"{pipe.steps_per_epoch} steps per epoch",
      f"batch     {2 * pipe.local_batch} images (augment {cfg.augment_rgb}/{cfg.augment_ir} "
      f"on {cfg.augment_on})",
      *shipped,
      *describe_batch(batch),
      f"time      prepare {t_prep:.1f} s, first batch {t_batch:.1f} s",
  ]
  return "\n".join(lines)
