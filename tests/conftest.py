"""Test-wide setup: CPU only, 4 simulated devices, the persistent compilation cache.

The XLA flag must be set before JAX initialises its backends, so it is set at import time of
this module, which pytest loads before any test module.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=4"
# Most of the suite's time is XLA compiling tiny models that then run for milliseconds. LLVM's
# optimisation passes are most of a CPU compile: without them a train step compiles in under
# a third of the time (33 s -> 10 s for one smoke run's programs on the 2-core CI VM). They only
# make the generated code faster; the programs (HLO) and the tests' tolerances are unchanged.
# Subprocesses started by tests inherit these flags through the environment.
for _flag in ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"):
  if _flag.split("=")[0] not in _flags:
    _flags += " " + _flag
os.environ["XLA_FLAGS"] = _flags.strip()

from maumjax import compilation_cache  # noqa: E402

compilation_cache.enable()

