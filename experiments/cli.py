"""The command line of the entry points: one-line user errors, checked config overrides, --help.

    cli.run(main)                                  # experiments/evaluate.py

    config = cli.load_config("config", default)    # experiments/launch.py: --config=FILE[:PRESET]
    config_flags.DEFINE_config_file("config", default, ...)
    cli.run(main, config=config)

`run` is `absl.app.run` with these differences:

* A mistake the user can fix is printed as one line, `error: <message>`, on stderr, and the
  process exits with status 2 (`EXIT_USER_ERROR`): a `maumjax.errors.UserError` raised by main
  or by the library under it, an `app.UsageError`, a flag that does not parse, an unknown
  `--config.<field>` or preset. `--verbose` prints the traceback as well. Any other exception
  is a bug and keeps its traceback.
* The `--config.<field>=value` overrides are checked against the config file's fields before
  absl and ml_collections parse them (an unknown field would otherwise end in a long traceback
  inside ml_collections): an unknown field or section names the closest valid ones, an
  unknown preset lists the presets.
* `--help` (`--helpshort`, `-?`) prints the entry module's docstring, the config file's
  docstring, its presets and every field with its default, and the entry point's flags;
  `--helpfull` adds absl's own flags. Both exit with status 0.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags

from maumjax.errors import UserError, one_line

EXIT_USER_ERROR = 2
VERBOSE_HINT = "(--verbose shows the traceback)"

VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, show its traceback as well as the "
                            "one-line message.")

_HELP_ARGS = ("-?", "--help", "-help", "--helpshort", "-helpshort")
_HELPFULL_ARGS = ("--helpfull", "-helpfull")
_TRUE = ("", "1", "t", "true", "y", "yes")


def command() -> str:
  """How the user started this process: `python -m experiments.maum`, or the script's path."""
  spec = getattr(sys.modules["__main__"], "__spec__", None)
  if spec is not None and spec.name:
    return f"python -m {spec.name}"
  return f"python {sys.argv[0]}"


def _display(path: str | Path) -> str:
  """`path` relative to the working directory when it lies below it."""
  try:
    return str(Path(path).resolve().relative_to(Path.cwd()))
  except ValueError:
    return str(path)


def _options(argv: Sequence[str]) -> list[str]:
  """The arguments absl reads as flags: those after the program name and before `--`."""
  args = list(argv[1:])
  return args[:args.index("--")] if "--" in args else args


def _verbose(argv: Sequence[str]) -> bool:
  """--verbose, from the parsed flags or, before they are parsed, from argv (last one wins)."""
  if flags.FLAGS.is_parsed():
    return VERBOSE.value
  verbose = False
  for arg in _options(argv):
    m = re.fullmatch(r"--?(no)?verbose(?:=(.*))?", arg)
    if m:
      verbose = not m[1] and (m[2] or "").lower() in _TRUE
  return verbose


def _fail(error: BaseException, argv: Sequence[str], hint: str = "") -> NoReturn:
  """Prints `error` as one line on stderr (after its traceback with --verbose); exits 2."""
  verbose = _verbose(argv)
  if verbose:
    traceback.print_exception(error)
  message = one_line(error) or type(error).__name__
  if hint and not verbose:
    message = f"{message} {hint}"
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  if getattr(error, "exit_now", False):
    # The library left threads that may never finish (a failed checkpoint save): skip the
    # interpreter's teardown, which would wait on them and print their late tracebacks.
    sys.stdout.flush()
    os._exit(EXIT_USER_ERROR)
  sys.exit(EXIT_USER_ERROR)


# ---------------------------------------------------------------------------- config file


def _flatten(config: Any, prefix: str = "") -> tuple[dict[str, Any], list[str]]:
  """(dotted field -> default, dotted section names) of a ConfigDict, in key order."""
  fields, sections = {}, []
  for key, value in config.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      sections.append(name)
      sub_fields, sub_sections = _flatten(value, f"{name}.")
      fields.update(sub_fields)
      sections += sub_sections
    else:
      fields[name] = value
  return fields, sections


class ConfigFile:
  """A method's config file (`experiments/configs/<method>.py`) and one of its presets.

  Attributes:
    path: the file, as given (relative to the working directory) or absolute.
    module: the loaded module (its `get_config(preset)` builds the config).
    preset: the preset asked for, or None for `get_config()`'s default.
    config: the config of that preset.
    fields: dotted field name -> default, e.g. {'optim.lr': 0.1, ...}.
    sections: dotted section names, e.g. ['data', 'data.pipeline', ...].
  """

  def __init__(self, spec: str, flag: str = "config", overrides: Sequence[str] = ()):
    """Loads `spec` (`FILE` or `FILE:PRESET`) as ml_collections' config flag does.

    Args:
      spec: the `--<flag>` value.
      flag: the config flag's name.
      overrides: the fields `--<flag>.<field>=...` sets ('train.log_every', ...).

    Raises:
      UserError: no such file, an unknown preset, or an override of an unknown field or
        section.
    """
    path, colon, preset = spec.partition(":")
    self.path, self.preset, self.flag = path, (preset if colon else None), flag
    if not Path(path).is_file():
      raise UserError(f"--{flag}={spec}: config file {path} not found; the configs are "
                      f"experiments/configs/<method>.py")
    module_spec = importlib.util.spec_from_file_location(f"_cli_{flag}_file", path)
    self.module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(self.module)
    try:
      self.config = self.module.get_config(*(() if self.preset is None else (self.preset,)))
    except ValueError:
      presets = self.presets()
      if self.preset is None or self.preset in presets:
        raise  # a bug in the config file, not the user's preset
      close = difflib.get_close_matches(self.preset, presets, n=3)
      raise UserError(f"unknown preset {self.preset!r} in {_display(path)}"
                      + (f"; did you mean {', '.join(close)}?" if close else "")
                      + f" presets: {', '.join(presets)}") from None
    self.fields, self.sections = _flatten(self.config)
    self.overrides = tuple(overrides)
    for field in self.overrides:
      self.check_override(field)

  def presets(self) -> list[str]:
    """The presets `get_config` accepts, in the order the file names them.

    The file's `PRESETS` if it has one; else the names in its docstring, and for the
    `<data>[_<row>]` convention (`DATA`, `ROWS`) every combination, that `get_config` accepts.
    Empty when `get_config` accepts any name (nothing to list).
    """
    explicit = getattr(self.module, "PRESETS", None)
    if explicit is not None:
      return list(explicit)
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", self.module.__doc__ or "")
    data, rows = getattr(self.module, "DATA", ()), getattr(self.module, "ROWS", ())
    names += [f"{d}_{r}" for d in data for r in rows]

    def accepted(name):
      try:
        self.module.get_config(name)
      except ValueError:
        return False
      return True

    if accepted("no such preset"):
      return []
    return [n for n in dict.fromkeys(names) if accepted(n)]

  def check_override(self, field: str) -> None:
    """Raises UserError unless `field` (as in `--config.<field>=...`) is a field or section."""
    name = re.sub(r"\[[^\]]*\]", "", field)  # config_path's `a.b[0]` indexing
    if name in self.fields or name in self.sections:
      return
    top = [*self.sections, *self.fields]
    head = name.split(".")[0]
    how = f"(fields: {command()} --help)"
    if "." in name and head not in top:
      close = difflib.get_close_matches(head, [s for s in self.sections if "." not in s], n=2)
      roots = ", ".join(s for s in self.sections if "." not in s)
      raise UserError(f"unknown config section {head!r} in --{self.flag}.{field}"
                      + (f"; did you mean {' or '.join(close)}?" if close else "")
                      + f" sections: {roots} {how}")
    close = _close_fields(name, list(self.fields))
    raise UserError(f"unknown config field {name!r}"
                    + (f"; did you mean {', '.join(close)}?" if close else "") + f" {how}")

  def check_values(self, config: Any) -> None:
    """Raises UserError where an override gave a tuple field elements of another type.

    ml_collections parses `--config.optim.decay_epochs=abc` as ('abc',) without complaint;
    a tuple whose default holds elements of one type must get elements of that type.
    """
    for field in self.overrides:
      default = self.fields.get(field)
      if not isinstance(default, tuple) or len({type(x) for x in default}) != 1:
        continue
      kind = type(default[0])
      value = config
      for part in field.split("."):
        value = value[part]
      if not all(isinstance(x, kind) or (kind is float and type(x) is int) for x in value):
        raise UserError(f"--{self.flag}.{field}: got {value!r}, expected a tuple of "
                        f"{kind.__name__} like the default {default!r} (e.g. "
                        f"--{self.flag}.{field}='{default!r}')")

  def describe(self, field: str) -> str:
    """'; train.log_every is of type int (default 50)' for a known field, else ''."""
    name = re.sub(r"\[[^\]]*\]", "", field)
    if name not in self.fields:
      return ""
    default = self.fields[name]
    return f"; {name} is of type {type(default).__name__} (default {default!r})"

  def help(self) -> str:
    """The config file's docstring, its presets and every field with its default."""
    shown = _display(self.path)
    lines = [f"Config file {shown}:", "", (self.module.__doc__ or "").strip(), ""]
    presets = self.presets()
    if presets:
      default = self.config.get("preset", self.preset) if self.preset is None else None
      lines.append(f"Presets (--{self.flag}={shown}:PRESET"
                   + (f"; default {default}" if default else "") + "):")
      lines += _pack(presets, ", ")
      lines.append("")
    example = "optim.lr" if "optim.lr" in self.fields else next(iter(self.fields), "FIELD")
    lines += textwrap.wrap(
        f"Config fields and their defaults in preset {self.config.get('preset', self.preset)}; "
        f"set one with --{self.flag}.FIELD=VALUE (e.g. --{self.flag}.{example}="
        f"{self.fields.get(example)}). What each field means: {shown} and the files its "
        "docstring names.", width=100, break_long_words=False, break_on_hyphens=False)
    groups: dict[str, list[str]] = {}
    for name, value in self.fields.items():
      groups.setdefault(name.rpartition(".")[0], []).append(f"{name}={value!r}")
    for section in sorted(groups):
      lines += _pack(groups[section], " ")
    return "\n".join(lines)


def _close_fields(name: str, fields: list[str]) -> list[str]:
  """Up to 3 fields close to `name`: by the whole dotted name, then by its last part."""
  close = difflib.get_close_matches(name, fields, n=3, cutoff=0.7)
  last = name.rpartition(".")[2]
  by_last = {}
  for field in fields:
    by_last.setdefault(field.rpartition(".")[2], []).append(field)
  for leaf in difflib.get_close_matches(last, list(by_last), n=3, cutoff=0.6):
    close += by_last[leaf]
  return list(dict.fromkeys(close))[:3]


def _pack(items: Sequence[str], sep: str, width: int = 100) -> list[str]:
  """`items` joined by `sep` on lines of at most `width` columns (an item is never split)."""
  lines, line = [], ""
  for item in items:
    if line and len(line) + len(sep) + len(item) > width:
      lines.append(line + sep.rstrip())
      line = "    " + item
    else:
      line = f"{line}{sep}{item}" if line else "  " + item
  return lines + ([line] if line else [])


def _config_args(argv: Sequence[str], flag: str, default: str) -> tuple[str, list[str]]:
  """(the `--<flag>` value or `default`, the fields of the `--<flag>.<field>` overrides)."""
  spec, overrides = default, []
  args = _options(argv)
  for i, arg in enumerate(args):
    m = re.fullmatch(rf"--?{re.escape(flag)}(?:=(.*))?", arg)
    if m:
      spec = m[1] if m[1] is not None else (args[i + 1] if i + 1 < len(args) else spec)
    m = re.match(rf"--?(?:no)?{re.escape(flag)}\.([^=]+)", arg)
    if m:
      overrides.append(m[1])
  return spec, overrides


# ---------------------------------------------------------------------------- help and run


def _flags_help(full: bool) -> str:
  """The entry point's flags (those of __main__ and of experiments.*); all flags if `full`."""
  if full:
    return flags.FLAGS.get_help()
  names = [name for name in flags.FLAGS.flags_by_module_dict()
           if name == sys.argv[0] or name.startswith("experiments.")]
  names.sort(key=lambda name: name == __name__)  # the entry point's own flags first
  return "\n".join(flags.FLAGS.module_help(name) for name in names)


def _print_help(config: ConfigFile | None, *, full: bool) -> NoReturn:
  """Prints the help (see the module docstring) on stdout and exits with status 0."""
  doc = (sys.modules["__main__"].__doc__ or f"{command()} [flags]").strip()
  parts = [doc]
  if config is not None:
    parts.append(config.help())
  parts.append("flags:" + _flags_help(full))
  if not full:
    parts.append("Try --helpfull to get a list of all flags (absl's included).")
  sys.stdout.write("\n\n".join(parts) + "\n")
  sys.exit(0)


def _help_asked(argv: Sequence[str]) -> str | None:
  """'short' or 'full' when argv asks for --help / --helpfull, else None."""
  for arg in _options(argv):
    name, _, value = arg.partition("=")
    if value.lower() not in _TRUE:
      continue
    if name in _HELPFULL_ARGS:
      return "full"
    if name in _HELP_ARGS:
      return "short"
  return None


def _flag_error_message(error: flags.Error, config: ConfigFile | None) -> str:
  """absl's message for a flag that does not parse, with the field's type and default."""
  message = one_line(error)
  m = re.fullmatch(r"flag --([^=]+)=(.*?): (.*)", message)
  if m and config is not None and m[1].startswith(config.flag + "."):
    return f"--{m[1]}={m[2]}: {m[3]}{config.describe(m[1][len(config.flag) + 1:])}"
  return message


def load_config(flag: str, default: str, argv: Sequence[str] | None = None) -> ConfigFile:
  """The config file that argv's `--<flag>` (else `default`) names, its overrides checked.

  Call it before `config_flags.DEFINE_config_file(flag, default, ...)`: without `--<flag>` on
  the command line, ml_collections parses the default file and its `--<flag>.<field>`
  overrides when the flag is defined, and an unknown field ends there in a traceback.

  Args:
    flag: the config flag's name ('config').
    default: its default, `FILE` or `FILE:PRESET`.
    argv: the command line, program name first; default sys.argv.

  Returns:
    The loaded config file. A user error (no such file, an unknown preset, field or section)
    is printed as one line and the process exits with status 2.
  """
  argv = sys.argv if argv is None else argv
  try:
    expanded = [argv[0], *flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)]
    spec, overrides = _config_args(expanded, flag, default)
    config = ConfigFile(spec, flag, overrides)
  except UserError as error:
    _fail(error, argv)
  except flags.Error as error:  # e.g. a --flagfile that cannot be read
    _fail(UserError(one_line(error)), argv)
  return config


def parse_flags(argv: Sequence[str], *, config: ConfigFile | None = None) -> list[str]:
  """absl's flags_parser for `run`: --help and --helpfull, then `flags.FLAGS(argv)`.

  Args:
    argv: the command line, program name first.
    config: the config file `load_config` loaded, for --help and for the type and default of
      a `--config.<field>` value that does not parse; None: the entry point has no config.

  Returns:
    The arguments that are not flags, program name first (what main receives).
  """
  argv = list(argv)
  try:
    asked = _help_asked([argv[0], *flags.FLAGS.read_flags_from_files(argv[1:],
                                                                      force_gnu=False)])
    if asked:
      _print_help(config, full=asked == "full")
    rest = flags.FLAGS(argv)
  except flags.Error as error:
    _fail(UserError(_flag_error_message(error, config)), argv, f"(see {command()} --help)")
  if config is not None:
    try:
      config.check_values(flags.FLAGS[config.flag].value)
    except UserError as error:
      _fail(error, argv)
  return rest


class _QuietLibraries(logging.Filter):
  """Drops Orbax's log records and asyncio's "Task exception was never retrieved" unless
  --verbose: a failed checkpoint save logs dozens of tracebacks from Orbax's background
  threads, and the trainer reports the failure itself, as one line naming the folder."""

  def filter(self, record: logging.LogRecord) -> bool:
    if flags.FLAGS.is_parsed() and VERBOSE.value:
      return True
    return not (record.name == "asyncio" or "/orbax/" in record.pathname.replace("\\", "/"))


def quiet_library_logs() -> None:
  """Installs `_QuietLibraries` on the root, absl and asyncio loggers and their handlers.

  (After a failed save, tensorstore's native callbacks may still print a few bare
  "Event loop is closed" tracebacks of their own; they do not pass through Python's hooks.)
  """
  quiet = _QuietLibraries()
  for logger in (logging.getLogger(), logging.getLogger("absl"), logging.getLogger("asyncio")):
    logger.addFilter(quiet)
    for handler in logger.handlers:
      handler.addFilter(quiet)


def run(main: Callable[[list[str]], Any], *, config: ConfigFile | None = None) -> None:
  """`absl.app.run(main)` with one-line user errors (exit status 2) and the help above.

  Args:
    main: the entry point's main(argv).
    config: what `load_config` returned, for an entry point with a config flag.
  """
  quiet_library_logs()

  def checked_main(argv):
    try:
      return main(argv)
    except UserError as error:
      _fail(error, sys.argv, VERBOSE_HINT)
    except app.UsageError as error:
      _fail(error, sys.argv, f"(see {command()} --help)")

  app.run(checked_main, flags_parser=lambda argv: parse_flags(argv, config=config))
