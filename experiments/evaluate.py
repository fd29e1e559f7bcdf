"""Evaluate a saved run: `python -m experiments.evaluate --workdir=DIR [--step=N]`.

Restores the checkpoint (default: the latest) of a run made by any training entry point
(`experiments.maum`, ...), rebuilds the method's model from the run's `config.json` (which
names the method, looked up in `maumjax.methods.METHODS`) and runs the full protocol of its
dataset (SYSU-MM01: all- and indoor-search, single- and multi-shot, `eval.trials` trials;
RegDB: both directions). Prints
the table and writes `<workdir>/eval_step<N>/` (JSON record, CMC plot, ranked lists) and
`<workdir>/eval_step<N>/metrics.json`. `--eval.<field>` style overrides: --trials, --flip,
--sampling.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from maumjax import compilation_cache
from maumjax.train import evaluation

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory made by a training entry point.",
                               required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_TRIALS = flags.DEFINE_integer("trials", None, "SYSU-MM01 trials (default: the run's eval.trials).")
_FLIP = flags.DEFINE_bool("flip", None, "Flip test-time augmentation (default: the run's).")
_SAMPLING = flags.DEFINE_enum("sampling", None, ["agw", "official"],
                              "SYSU gallery sampler (default: the run's).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  compilation_cache.enable()
  overrides = {k: v for k, v in (("trials", _TRIALS.value), ("flip", _FLIP.value),
                                 ("sampling", _SAMPLING.value)) if v is not None}
  result = evaluation.evaluate_workdir(_WORKDIR.value, step=_STEP.value, overrides=overrides)
  print(result["table"])
  print(json.dumps(result["summary"], indent=1))
  print(f"written to {result['out_dir']}")


if __name__ == "__main__":
  app.run(main)
