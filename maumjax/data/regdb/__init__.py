"""RegDB TFDS builder package (TFDS needs package-form builders, protocol.md 7.2)."""

from __future__ import annotations

from maumjax.data.regdb.regdb_dataset_builder import Regdb, RegdbConfig

__all__ = ["Regdb", "RegdbConfig"]
