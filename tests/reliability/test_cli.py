"""The command line reports a user's mistake in one line (exit status 2), as a user runs it.

Every check runs an entry point in a subprocess and reads what it prints. The mistakes are all
found before any data is prepared or anything compiled, so each run costs about its imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAUM = "experiments.maum"


def _run(args: list[str], cache: Path) -> subprocess.CompletedProcess:
  env = {**os.environ, "MAUMJAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120, check=False)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
  """The single stderr line of a user error; fails unless that is all the process printed."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  return lines[0]


def test_misspelled_field_names_the_closest_fields(tmp_path):
  line = _one_line_error(_run([MAUM, "--config.train.epoch=3"], tmp_path))
  assert "'train.epoch'" in line and "num_epochs" in line and "--help" in line
  # The same with an explicit preset (ml_collections then parses the overrides later).
  line = _one_line_error(_run([MAUM, "--config=experiments/configs/maum.py:smoke",
                               "--config.model.pretrianed=x"], tmp_path))
  assert "'model.pretrianed'" in line and "model.pretrained" in line


def test_unknown_section_lists_the_sections(tmp_path):
  line = _one_line_error(_run([MAUM, "--config.trian.log_every=1"], tmp_path))
  assert "'trian'" in line and "did you mean train?" in line
  assert "data, eval, loss, model, optim, train" in line


def test_value_of_the_wrong_type_names_the_field_and_its_default(tmp_path):
  line = _one_line_error(_run([MAUM, "--config.train.log_every=abc"], tmp_path))
  assert "--config.train.log_every=abc" in line and "int" in line and "default 10" in line
  # A tuple field: ml_collections itself would take ('abc',) and fail deep in training.
  line = _one_line_error(_run([MAUM, "--config.optim.decay_epochs=abc"], tmp_path))
  assert "optim.decay_epochs" in line and "tuple of int" in line and "(16, 22)" in line


def test_unknown_preset_lists_the_presets(tmp_path):
  line = _one_line_error(_run([MAUM, "--config=experiments/configs/maum.py:sysuu"], tmp_path))
  assert "'sysuu'" in line and "did you mean sysu" in line
  for preset in ("synthetic", "regdb", "smoke", "sysu_baseline", "regdb_bidir"):
    assert preset in line


def test_workdir_that_is_a_file_is_refused_before_any_data(tmp_path):
  afile = tmp_path / "notes.txt"
  afile.write_text("x")
  line = _one_line_error(_run([MAUM, f"--workdir={afile}"], tmp_path))
  assert f"--workdir {afile} is a file; give a folder path" in line
  assert "--verbose" in line  # the hint
  assert not (tmp_path / "synthetic").exists() and not (tmp_path / "runs").exists()


def test_unknown_eval_choice_is_refused_before_any_data(tmp_path):
  line = _one_line_error(_run(["experiments.mpanet", "--config.eval.distance=l2"], tmp_path))
  assert "config.eval.distance='l2' is not one of ['cosine', 'euclidean']" in line
  assert not (tmp_path / "synthetic").exists() and not (tmp_path / "runs").exists()


def test_verbose_shows_the_traceback(tmp_path):
  afile = tmp_path / "notes.txt"
  afile.write_text("x")
  proc = _run([MAUM, f"--workdir={afile}", "--verbose"], tmp_path)
  assert proc.returncode == 2
  assert "Traceback" in proc.stderr and "WorkdirError" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == f"error: --workdir {afile} is a file; give a " \
                                                 "folder path"


def test_broken_weights_file_is_one_line_naming_it_before_any_data(tmp_path):
  weights = tmp_path / "x.safetensors"
  weights.write_bytes(os.urandom(4096))
  line = _one_line_error(_run([MAUM, f"--config.model.pretrained={weights}"], tmp_path))
  assert str(weights) in line
  assert not (tmp_path / "synthetic").exists()  # refused before the data was written


def test_unknown_config_change_section_lists_the_allowed_ones(tmp_path):
  line = _one_line_error(_run([MAUM, "--config_change=optim,trian"], tmp_path))
  assert "trian" in line
  assert "data, model, loss, optim, method, seed, num_epochs" in line


def test_usage_error_is_one_line(tmp_path):
  line = _one_line_error(_run([MAUM, "stray_argument"], tmp_path))
  assert "stray_argument" in line


def test_a_bug_keeps_its_traceback(tmp_path):
  config = tmp_path / "buggy.py"
  config.write_text("def get_config(preset=None):\n  raise RuntimeError('a bug')\n")
  proc = _run([MAUM, f"--config={config}"], tmp_path)
  assert proc.returncode not in (0, 2)
  assert "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr


def test_help_lists_presets_fields_and_flags(tmp_path):
  proc = _run([MAUM, "--help"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  for preset in ("synthetic", "sysu", "regdb", "smoke", "synthetic_baseline", "regdb_bidir"):
    assert preset in out
  for field in ("optim.lr=0.01", "num_epochs=24", "seed=0", "data.manual_dir=''",
                "model.pretrained=''", "train.log_every=10", "eval.trials=10", "loss.margin=0.25"):
    assert field in out
  for flag in ("--config:", "--workdir:", "--config_change:", "--[no]verbose:"):
    assert flag in out
  assert "recorded in the run's config history" in " ".join(out.split())  # --config_change


def test_evaluate_missing_workdir_is_one_line(tmp_path):
  missing = tmp_path / "no_such_run"
  line = _one_line_error(_run(["experiments.evaluate", f"--workdir={missing}"], tmp_path))
  assert f"--workdir {missing} does not exist" in line
