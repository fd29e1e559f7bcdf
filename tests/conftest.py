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



# The test files that take longest (seconds of one fresh CI run on the 2-core VM, most first).
# They are collected first, and setup.cfg turns off pytest-xdist's reordering by test count
# (--no-loadscope-reorder), so the two workers start on them and the many short files fill
# the end: a long file left for last would keep one worker busy while the other idles. Only
# the order changes; a file missing from this list runs after these in the usual order.
LONGEST_FIRST = (
    "tests/methods/test_mmm_pipeline.py",  # 155 s
    "tests/train/test_loop.py",  # 129 s
    "tests/train/test_multiprocess.py",  # 82 s
    "tests/experiments/test_entrypoints.py",  # 79 s
    "tests/methods/test_mmm.py",
    "tests/methods/test_maum.py",  # 67 s
    "tests/experiments/test_suite.py",  # 65 s
    "tests/methods/test_mpanet.py",  # 65 s
    "tests/train/test_parallel.py",  # 62 s
    "tests/methods/test_bdf.py",  # 57 s
    "tests/train/test_method_api.py",  # 51 s
    "tests/experiments/test_compare.py",  # 25-45 s
    "tests/experiments/test_pretrain.py",  # 20 s
    "tests/methods/test_mmm_online.py",
)


def pytest_collection_modifyitems(session, config, items):
  rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
  root = config.rootpath

  def key(item):
    path = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
    return rank.get(path, len(rank))

  items.sort(key=key)  # stable: the usual order within a file and among unlisted files
