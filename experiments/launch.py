"""What every training entry point shares: flags, the workdir, the run and its printout.

An entry module is a few lines (experiments/maum.py):

    from experiments import launch
    if __name__ == "__main__":
      launch.main("maum")

`launch.main(method)` defines `--config` (default `experiments/configs/<method>.py`, with an
optional `:PRESET`; `--config.<section>.<field>=value` overrides a field) and `--workdir`,
checks that the config's `method` is the entry point's, trains and evaluates the run through
`maumjax.train.loop` and prints the protocol's table.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from maumjax import compilation_cache
from maumjax import methods
from maumjax.data import prepare
from maumjax.train import loop

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _define_flags(method: str):
  config = config_flags.DEFINE_config_file(
      "config", str(CONFIG_DIR / f"{method}.py"), "Config file (and :preset).",
      lock_config=True)
  workdir = flags.DEFINE_string(
      "workdir", "", "Run directory (checkpoints, log.jsonl, tensorboard/, metrics.json); "
      "default: a new folder under <cache>/runs/.")
  return config, workdir


def run(method: str, config, workdir: str) -> dict:
  """Trains and evaluates one run of `method`; prints the workdir first and the table last.

  Raises:
    app.UsageError: the config is for another method, or a multi-process run has no workdir.
  """
  if config.method != method:
    raise app.UsageError(f"config.method={config.method!r}; this entry point trains "
                         f"{method!r} (use python -m experiments.{config.method})")
  methods.get(method)
  if config.distributed and not workdir:
    raise app.UsageError("a multi-process run (config.distributed=True) needs --workdir, the "
                         "same folder for every process")
  workdir = workdir or str(prepare.cache_root() / "runs" /
                           f"{method}-{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
  print(f"workdir: {workdir}")
  result = loop.train_and_evaluate(config, workdir)
  print(result["table"])
  r = result["run"]
  print(f"trained {r['steps']} steps ({r['epochs']} epochs) on {r['devices']} {r['backend']} "
        f"device(s) at {r['train_images_per_s']} images/s; metrics in {workdir}/metrics.json")
  return result


def main(method: str) -> None:
  """Parses the command line and runs `method` (the whole body of an entry module)."""
  config_flag, workdir_flag = _define_flags(method)

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # TFDS logs every shard it writes at INFO
    compilation_cache.enable()
    run(method, config_flag.value, workdir_flag.value)

  app.run(_main)
