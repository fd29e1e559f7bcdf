"""What every training entry point shares: flags, the workdir, the run and its printout.

An entry module is a few lines (experiments/maum.py):

    from experiments import launch
    if __name__ == "__main__":
      launch.main("maum")

`launch.main(method)` defines `--config` (default `experiments/configs/<method>.py`, with an
optional `:PRESET`; `--config.<section>.<field>=value` overrides a field), `--workdir`,
`--config_change` and `--verbose`, checks that the config's `method` is the entry point's,
trains and evaluates the run through `maumjax.train.loop` and prints the protocol's table.
The command line itself (one-line user errors with exit status 2, the checks of the config
overrides, `--help`) is `experiments.cli`.

The library (JAX, the data pipeline, the trainer) is imported only once the flags are
parsed, so that a mistake on the command line is reported in a fraction of a second.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli
from maumjax.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _define_flags(default_config: str):
  config = config_flags.DEFINE_config_file(
      "config", default_config,
      "Config file and preset, FILE[:PRESET]; --config.<section>.<field>=VALUE overrides a "
      "field (--help lists the presets and fields).", lock_config=True)
  workdir = flags.DEFINE_string(
      "workdir", "", "Run directory (checkpoints, log.jsonl, tensorboard/, metrics.json); "
      "default: a new folder under <cache>/runs/. A run started again with the same workdir "
      "resumes.")
  config_change = flags.DEFINE_list(
      "config_change", [], "SECTION[,SECTION]: allow these config sections to differ from the "
      "run being resumed (e.g. num_epochs or optim); recorded in the run's config history. "
      "Without it a resumed run must match the saved config.json.")
  return config, workdir, config_change


def _check(method: str, config, workdir: str, config_change: Sequence[str]) -> None:
  """The checks `run` makes before it touches the data or compiles anything.

  Raises:
    UserError: see `run`.
  """
  from maumjax.train import workdir as workdir_lib  # no JAX import (unlike maumjax.methods)

  if config.method != method:
    raise UserError(f"config.method={config.method!r}; this entry point trains {method!r} "
                    f"(use python -m experiments.{config.method})")
  workdir_lib.check_sections(config_change)
  if workdir:
    workdir_lib.check_workdir_path(workdir)
  if config.distributed and not workdir:
    raise UserError("a multi-process run (config.distributed=True) needs --workdir, the same "
                    "folder for every process")
  from maumjax import methods
  from maumjax.train import evaluation

  methods.get(method)
  evaluation.check_config(config)
  pretrained = config.get("model", {}).get("pretrained")
  if pretrained:
    # A missing or broken weights file is reported now rather than after the data is prepared
    # (minutes for SYSU-MM01), from its metadata alone; the method reads the tensors later.
    from maumjax.models import weights

    weights.state_dict_shapes(pretrained)


def run(method: str, config, workdir: str, *, config_change: Sequence[str] = ()) -> dict:
  """Trains and evaluates one run of `method`; prints the workdir first and the table last.

  Checks the arguments first, then turns on the persistent compilation cache
  (`maumjax.compilation_cache`) and trains.

  Args:
    method: the entry point's method (a key of `maumjax.methods.METHODS`).
    config: the run's ConfigDict (experiments/configs/<method>.py).
    workdir: the run directory; '' for a new folder under <cache>/runs/.
    config_change: config sections allowed to differ from the run being resumed (a subset of
      `maumjax.train.loop.RESUME_SECTIONS`); recorded in the run's config history.

  Raises:
    UserError: the config is for another method, `config_change` names an unknown section, an
      `eval` field an unknown choice, the workdir (or a folder above it) is a file, a multi-process run has no workdir, or
      `model.pretrained` is not a readable weights file (`WeightsError`): all before any data
      is prepared. Later, the library's own (a workdir holding another run, ...).
  """
  _check(method, config, workdir, config_change)
  from maumjax import compilation_cache
  from maumjax.data import prepare
  from maumjax.train import loop

  compilation_cache.enable()
  workdir = workdir or str(prepare.cache_root() / "runs" /
                           f"{method}-{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
  print(f"workdir: {workdir}")
  result = loop.train_and_evaluate(config, workdir, config_change=tuple(config_change))
  print(result["table"])
  r = result["run"]
  print(f"trained {r['steps']} steps ({r['epochs']} epochs) on {r['devices']} {r['backend']} "
        f"device(s) at {r['train_images_per_s']} images/s; metrics in {workdir}/metrics.json")
  return result


def main(method: str) -> None:
  """Parses the command line and runs `method` (the whole body of an entry module).

  A `maumjax.errors.UserError` (from the command line, these checks or the library) is printed
  as one line on stderr with exit status 2; `--verbose` adds its traceback.
  """
  default = str(CONFIG_DIR / f"{method}.py")
  config_file = cli.load_config("config", default)  # before ml_collections parses the overrides
  config_flag, workdir_flag, change_flag = _define_flags(default)

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}; flags are --name=value")
    logging.set_verbosity(logging.WARNING)  # TFDS logs every shard it writes at INFO
    run(method, config_flag.value, workdir_flag.value, config_change=change_flag.value)

  cli.run(_main, config=config_file)
