"""Models: torchvision-layout ResNets, re-ID heads, the two-stream ReidNet, checkpoint loading.

Modules:
  resnet   ResNet v1.5 run as a range of stages; ARCHS ('resnet50', 'resnet18', 'tiny').
  heads    GeM/average pooling, BN-neck, global head, PCB-style part head.
  reid     ReidNet: modality-specific early stages, shared trunk, heads; `embed` for testing.
  weights  torch-free reading of torchvision checkpoints, conversion, strict loading.
"""

from __future__ import annotations

from maumjax.models.heads import BNNeck, GlobalHead, PartHead, avg_pool, gem_pool
from maumjax.models.reid import MODALITY_IR, MODALITY_RGB, ReidNet
from maumjax.models.resnet import ARCHS, ArchSpec, ResNet, feature_map_size, stage_output_channels
from maumjax.models.weights import (
  LoadReport,
  load_backbone,
  read_state_dict,
  sha256,
  torchvision_to_flax,
)

__all__ = [
  "ARCHS", "MODALITY_IR", "MODALITY_RGB", "ArchSpec", "BNNeck", "GlobalHead", "LoadReport",
  "PartHead", "ReidNet", "ResNet", "avg_pool", "feature_map_size", "gem_pool", "load_backbone",
  "read_state_dict", "sha256", "stage_output_channels", "torchvision_to_flax",
]
