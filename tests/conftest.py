"""Test-wide setup: CPU only, 4 simulated devices, the persistent compilation cache.

The XLA flag must be set before JAX initialises its backends, so it is set at import time of
this module, which pytest loads before any test module.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()

from maumjax import compilation_cache  # noqa: E402

compilation_cache.enable()


# The two xdist workers take whole files (`--dist loadfile`, setup.cfg) in collection order, so
# a heavy file collected last can leave one worker running alone for minutes. Heaviest files
# first (about 40-250 s each on the 2-core CI machine), the many light ones fill the tail.
_HEAVY_FIRST = (
    "tests/train/test_loop.py", "tests/train/test_multiprocess.py",
    "tests/experiments/test_suite.py", "tests/train/test_parallel.py",
    "tests/train/test_method_api.py", "tests/experiments/test_entrypoints.py",
    "tests/methods/test_maum.py", "tests/methods/test_mpanet.py", "tests/methods/test_bdf.py",
    "tests/reliability/test_training_faults.py",
)


def pytest_collection_modifyitems(config, items):
  del config

  def rank(item):
    path = item.nodeid.split("::")[0]
    return _HEAVY_FIRST.index(path) if path in _HEAVY_FIRST else len(_HEAVY_FIRST)

  items.sort(key=rank)  # stable: a file's tests keep their order and stay together
