"""Method implementations. `METHODS` maps a config's `method` name to its module.

Each module implements the interface of `maumjax.methods.api` (init, phase, step_parts, embed,
variables_of, optionally on_epoch_start); the shared trainer in `maumjax.train` runs any of
them. Add a method by writing `methods/<name>.py` and listing it here.
"""

from __future__ import annotations

from maumjax.methods import api, bdf, maum, mmm, mpanet

METHODS = {"maum": maum, "mpanet": mpanet, "bdf": bdf, "mmm": mmm}


def get(name: str):
  """The method module for `name`; raises listing the valid names."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of {tuple(METHODS)}")
  return api.check_method(METHODS[name], name)
