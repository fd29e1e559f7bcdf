"""SYSU-MM01 TFDS builder package (TFDS needs package-form builders, protocol.md 7.2)."""

from __future__ import annotations

from maumjax.data.sysu_mm01.sysu_mm01_dataset_builder import SysuMm01, SysuMm01Config

__all__ = ["SysuMm01", "SysuMm01Config"]
