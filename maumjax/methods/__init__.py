"""Method implementations. `METHODS` maps a config's `method` name to its module."""

from __future__ import annotations

from maumjax.methods import maum

METHODS = {"maum": maum}


def get(name: str):
  """The method module for `name`; raises listing the valid names."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of {tuple(METHODS)}")
  return METHODS[name]
