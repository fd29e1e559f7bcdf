"""MAUM entry point: `python -m experiments.maum [--config=...:PRESET] [--config.x=y] [--workdir=D]`.

With no arguments: writes the built-in synthetic SYSU-MM01-layout data into the cache
(`~/.cache/maumjax`, or $MAUMJAX_CACHE), builds it, trains a tiny two-stream ResNet with MAUM and
evaluates it with the full SYSU-MM01 protocol, printing Rank-1 / mAP / mINP. Presets and
switches: experiments/configs/maum.py. A run restarted with the same --workdir resumes.
"""

from __future__ import annotations

import time

from absl import app, flags, logging
from ml_collections import config_flags

from maumjax import compilation_cache
from maumjax.data import prepare
from maumjax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", f"{__file__.rsplit('/', 1)[0]}/configs/maum.py", "Config file (and :preset).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "Run directory (checkpoints, log.jsonl, tensorboard/, metrics.json); "
    "default: a new folder under <cache>/runs/.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.method != "maum":
    raise app.UsageError(f"config.method={config.method!r}; this entry point trains 'maum'")
  logging.set_verbosity(logging.WARNING)  # TFDS logs every shard it writes at INFO
  compilation_cache.enable()
  if config.distributed and not _WORKDIR.value:
    raise app.UsageError("a multi-process run (config.distributed=True) needs --workdir, the "
                         "same folder for every process")
  workdir = _WORKDIR.value or str(
      prepare.cache_root() / "runs" / f"maum-{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
  print(f"workdir: {workdir}")
  result = loop.train_and_evaluate(config, workdir)
  print(result["table"])
  run = result["run"]
  print(f"trained {run['steps']} steps ({run['epochs']} epochs) on {run['devices']} "
        f"{run['backend']} device(s) at {run['train_images_per_s']} images/s; "
        f"metrics in {workdir}/metrics.json")


if __name__ == "__main__":
  app.run(main)
