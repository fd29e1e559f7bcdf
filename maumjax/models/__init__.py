"""Models: torchvision-layout ResNets, re-ID heads, the two-stream ReidNet, checkpoint loading.

Modules:
  resnet   ResNet v1.5 run as a range of stages; ARCHS ('resnet50', 'resnet18', 'tiny');
           AGW's non-local blocks (`NonLocal`, `non_local='agw'`).
  heads    GeM/average pooling, BN-neck, global head, PCB-style part head.
  reid     ReidNet: modality-specific early stages, shared trunk, heads; `embed` for testing.
  mpanet   MPANet: single-stream ResNet with modality alleviation and pattern alignment.
  bdf      BDFNet: one ResNet over [V; I; V^; I^] (shared, by-origin or four stems).
  weights  torch-free reading of torchvision checkpoints, conversion, strict loading.

`MODELS` maps a config's `model.name` to its Flax module; `model_from_config` builds one from a
config's `model` section, for every method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from maumjax.models.bdf import BDFNet
from maumjax.models.heads import (
  BNNeck,
  GlobalHead,
  PartHead,
  avg_pool,
  gem_pool,
  gem_pool_mean_eps,
)
from maumjax.models.mpanet import MPANet
from maumjax.models.reid import MODALITY_IR, MODALITY_RGB, ReidNet, head_dims, param_groups
from maumjax.models.resnet import (
  ARCHS,
  ArchSpec,
  NonLocal,
  ResNet,
  feature_map_size,
  non_local_positions,
  stage_output_channels,
)
from maumjax.models.weights import (
  LoadReport,
  load_backbone,
  read_state_dict,
  sha256,
  torchvision_to_flax,
)

MODELS = {"reid": ReidNet, "mpanet": MPANet, "bdf": BDFNet}
# Keys of a config's model section that configure the run, not the module.
NON_MODULE_KEYS = ("name", "pretrained", "sync_bn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_from_config(model_cfg: Mapping[str, Any], **overrides):
  """The module of a config's `model` section: `MODELS[name](**fields)`.

  Args:
    model_cfg: the plain-dict `model` section; `name` (default 'reid') picks the module, and
      `pretrained` / `sync_bn` (run settings) are not passed to it; `dtype` is a name in
      `DTYPES`.
    **overrides: extra module fields a method sets itself.

  Raises:
    ValueError: an unknown model name or dtype, listing the valid ones.
  """
  name = model_cfg.get("name", "reid")
  if name not in MODELS:
    raise ValueError(f"model.name={name!r}; choose one of {tuple(MODELS)}")
  kwargs = {k: v for k, v in model_cfg.items() if k not in NON_MODULE_KEYS}
  dtype = kwargs.get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"model.dtype={dtype!r}; choose one of {tuple(DTYPES)}")
  kwargs["dtype"] = DTYPES[dtype]
  return MODELS[name](**kwargs, **overrides)


__all__ = [
  "MODELS", "model_from_config", "head_dims", "param_groups", "BDFNet", "MPANet",
  "ARCHS", "MODALITY_IR", "MODALITY_RGB", "ArchSpec", "BNNeck", "GlobalHead", "LoadReport",
  "NonLocal", "PartHead", "ReidNet", "ResNet", "avg_pool", "feature_map_size", "gem_pool",
  "gem_pool_mean_eps", "load_backbone", "non_local_positions",
  "read_state_dict", "sha256", "stage_output_channels", "torchvision_to_flax",
]
