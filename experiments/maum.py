"""MAUM entry point: `python -m experiments.maum [--config=...:PRESET] [--config.x=y]`.

Until the MAUM trainer lands this prepares the data end to end (synthetic data when no
manual_dir is given, TFDS build, input pipeline) and prints a summary of one training batch.
"""

from __future__ import annotations

from absl import app, logging
from ml_collections import config_flags

from maumjax import compilation_cache
from maumjax.data import summary

_CONFIG = config_flags.DEFINE_config_file(
    "config", f"{__file__.rsplit('/', 1)[0]}/configs/maum.py", "Config file (and :preset).",
    lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # TFDS logs every shard it writes at INFO
  compilation_cache.enable()
  print(summary.prepare_and_describe(_CONFIG.value.data))


if __name__ == "__main__":
  app.run(main)
