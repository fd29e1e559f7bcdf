"""Evaluate a saved run: `python -m experiments.evaluate --workdir=DIR [--step=N]`.

Restores the checkpoint (default: the latest) of a run made by any training entry point
(`experiments.maum`, ...), rebuilds the method's model from the run's `config.json` (which
names the method, looked up in `maumjax.methods.METHODS`) and runs the full protocol of its
dataset (SYSU-MM01: all- and indoor-search, single- and multi-shot, `eval.trials` trials;
RegDB: both directions). Prints
the table and writes `<workdir>/eval_step<N>/` (JSON record, CMC plot, ranked lists) and
`<workdir>/eval_step<N>/metrics.json`. `--eval.<field>` style overrides: --trials, --flip,
--sampling; `--model=tta_derivative=true` changes a test-time model field (BDF's derivative
test-time augmentation) and writes to `eval_step<N>_tta_derivative-True/`.

A mistake the user can fix (a --workdir that is not a run directory, a flag that does not
parse, any `maumjax.errors.UserError` from the library) is printed as one line on stderr with
exit status 2; `--verbose` adds the traceback (see experiments/cli.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags, logging

from experiments import cli
from maumjax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory made by a training entry point.",
                               required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_TRIALS = flags.DEFINE_integer("trials", None, "SYSU-MM01 trials (default: the run's eval.trials).")
_FLIP = flags.DEFINE_bool("flip", None, "Flip test-time augmentation (default: the run's).")
_SAMPLING = flags.DEFINE_enum("sampling", None, ["agw", "official"],
                              "SYSU gallery sampler (default: the run's).")
_MODEL = flags.DEFINE_list(
    "model", [], "FIELD=VALUE[,FIELD=VALUE]: test-time fields of the run's model section to "
    "change, e.g. tta_derivative=true (BDF: average base and derivative features); results go "
    "to eval_step<N>_<field>-<value>/.")


def _parse_model(pairs) -> dict:
  """['tta_derivative=true'] -> {'tta_derivative': True} (JSON values; bare words as text)."""
  out = {}
  for pair in pairs:
    field, sep, text = pair.partition("=")
    if not sep or not field:
      raise UserError(f"--model {pair!r}: expected FIELD=VALUE, e.g. tta_derivative=true")
    try:
      out[field] = json.loads(text)
    except json.JSONDecodeError:
      out[field] = text
  return out


def _check_workdir(workdir: str) -> None:
  """Raises UserError unless `workdir` is a run directory (it holds config.json)."""
  path = Path(workdir)
  how = "give the folder a training entry point wrote (python -m experiments.<method> --workdir=D)"
  if not path.exists():
    raise UserError(f"--workdir {workdir} does not exist; {how}")
  if not path.is_dir():
    raise UserError(f"--workdir {workdir} is a file; {how}")
  if not (path / "config.json").is_file():
    raise UserError(f"--workdir {workdir} is not a run directory (no config.json); {how}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}; flags are --name=value")
  _check_workdir(_WORKDIR.value)
  logging.set_verbosity(logging.WARNING)
  from maumjax import compilation_cache  # after the checks: they need no JAX import
  from maumjax.train import evaluation

  compilation_cache.enable()
  overrides = {k: v for k, v in (("trials", _TRIALS.value), ("flip", _FLIP.value),
                                 ("sampling", _SAMPLING.value)) if v is not None}
  result = evaluation.evaluate_workdir(_WORKDIR.value, step=_STEP.value, overrides=overrides,
                                       model_overrides=_parse_model(_MODEL.value))
  print(result["table"])
  print(json.dumps(result["summary"], indent=1))
  print(f"written to {result['out_dir']}")


if __name__ == "__main__":
  cli.run(main)
