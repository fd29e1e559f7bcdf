"""Persistent XLA compilation cache shared by tests, runs and benchmarks.

Compiling a train step dominates short runs on CPU (stack.md §8: lower + compile fell from
4.3 s to 1.3 s in a second process with the cache on), so every entry point enables it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import jax
from jax import monitoring

ENV_VAR = "MAUMJAX_COMPILATION_CACHE"


def default_cache_dir() -> Path:
  """`$MAUMJAX_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/maumjax/jax`, else `~/.cache/maumjax/jax`."""
  if os.environ.get(ENV_VAR):
    return Path(os.environ[ENV_VAR]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "maumjax" / "jax"


def enable(cache_dir: str | os.PathLike | None = None, *, min_compile_secs: float = 0.5) -> Path:
  """Turns on JAX's persistent compilation cache in `cache_dir` and returns the directory.

  Args:
    cache_dir: where compiled executables are stored; `default_cache_dir()` when None. Set
      `MAUMJAX_COMPILATION_CACHE=off` to disable the cache.
    min_compile_secs: only programs that took at least this long to compile are stored.
  """
  if os.environ.get(ENV_VAR, "").lower() == "off":
    return Path()
  path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


# Emitted once per program JAX lowers to XLA, whether the executable then comes from a backend
# compile or from the persistent cache, so a retrace is seen even when the cache is warm.
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
# Emitted once per XLA compilation actually run (not for in-memory or persistent cache hits).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_active_counters: list[Compilations] = []
_listening = False


@dataclasses.dataclass
class Compilations:
  """What `count_compilations` saw.

  Attributes:
    count: programs lowered to XLA (each new trace; compiled or read from a cache).
    backend: XLA compilations actually run (cache misses).
  """

  count: int = 0
  backend: int = 0


def _on_event(name: str, duration: float, **kwargs) -> None:
  del duration, kwargs
  for counter in _active_counters:
    if name == LOWERING_EVENT:
      counter.count += 1
    elif name == BACKEND_COMPILE_EVENT:
      counter.backend += 1


@contextlib.contextmanager
def count_compilations() -> Iterator[Compilations]:
  """Counts the programs JAX lowers and compiles inside the block (a recompilation check).

  Example:
    step(state, batch)                 # first call compiles
    with count_compilations() as seen:
      step(state, batch)
    assert seen.count == 0             # no retrace, no recompilation
  """
  global _listening
  if not _listening:
    monitoring.register_event_duration_secs_listener(_on_event)
    _listening = True
  counter = Compilations()
  _active_counters.append(counter)
  try:
    yield counter
  finally:
    _active_counters.remove(counter)
