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

