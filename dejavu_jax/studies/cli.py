"""The command line every config-driven experiment main shares (`run(main, default_config)`).

What it guarantees, so that the command line tells the truth:

* `--help` (also -h, --helpshort, --helpfull) prints the script's doc, its flags and every field
  of the config it would run (the value, and the meaning each field was declared with), then
  exits 0. The config and its `--config.<field>` overrides are loaded first, so a documented
  command with a wrong field fails under `--help` too.
* Every main gets `--compile_cache` (JAX's persistent compilation cache, on by default) and quiet
  third-party logging unless `--verbosity` asks for more (studies/jaxcache.py).
* A missing config file, a misspelled field, a bad value (`ConfigError`) or a non-empty output
  directory is ONE line on stderr, `error: ...` (with ml_collections' "did you mean" when it has
  one), and exit code 2, before anything is built or written.

absl parses `--config.<field>` overrides while the flag is defined (it reads sys.argv), so the
flag is defined here, under the same error handling, and not at import time of a main.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from dejavu_jax.studies import jaxcache

HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")
USAGE_ERROR = 2


class UsageError(ValueError):
  """A command-line problem to report in one line (exit code 2)."""


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def one_line(e: BaseException) -> str:
  """An exception's message on one line (KeyError/AttributeError messages come quoted)."""
  text = str(e)
  if isinstance(e, (KeyError, AttributeError)) and text[:1] in "'\"":
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
  if "Did you mean" in text:   # ml_collections: the misspelled field, then its suggestion
    text = "unknown field " + text.replace("\nDid you mean", "; did you mean")
  while "Configuration is not available because of an earlier failure" in text and e.__cause__:
    e = e.__cause__
    text = str(e)
  return " ".join(text.replace("\\n", " ").split())


def _config_path(argv: list[str], default: str) -> str:
  value = default
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      value = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  return value.split(":", 1)[0]


def flat_fields(c, prefix: str = ""):
  """(dotted name, value) of every leaf of a ConfigDict."""
  for key in c.keys():
    v = c[key]
    if hasattr(v, "keys") and hasattr(v, "to_dict"):
      yield from flat_fields(v, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", v


def describe_values(c) -> str:
  """The generic field list: every field of the config and its value."""
  rows = list(flat_fields(c))
  width = max((len(n) for n, _ in rows), default=0)
  return "\n".join(f"{n:<{width}}  {v!r}" for n, v in rows)


def help_text(doc: str, c, describe: Callable, config_path: str = "") -> str:
  own = flags.FLAGS.main_module_help().strip()
  return "\n".join([
      (doc or "").strip(), "",
      "flags:", "  --config: the experiment config file (a configs/*.py with get_config(); "
      "':arg' passes arg to it); override any field with --config.<field>=<value>",
      *(["  " + line for line in own.splitlines()[1:]] if own else []),
      "", f"config fields of {config_path} (value and meaning):",
      describe(c)])


def run(main: Callable, default_config: str, doc: str = "",
        describe: Callable = describe_values, errors: tuple = (),
        check: Callable | None = None) -> None:
  """Defines --config (default `default_config`), parses the command line and calls
  `main(config)` under the guarantees of the module doc; its return value is the exit code.
  `errors`: further exception types that `main` raises for a usage problem (a bad field, a
  refused output dir): one line, exit 2. `check(config)`, when given, also runs under --help (a
  documented command with a bad value fails there too)."""
  argv = list(sys.argv)
  want_help = any(a in HELP_FLAGS for a in argv[1:])
  argv = [a for a in argv if a not in HELP_FLAGS]
  sys.argv[:] = argv
  path = _config_path(argv, default_config)
  if not os.path.isfile(path):
    fail(f"--config: no such config file {path!r}")
  try:
    holder = config_flags.DEFINE_config_file(
        "config", default_config, "the experiment config (--help lists its fields)")
  except Exception as e:  # pylint: disable=broad-except
    fail(f"--config: {one_line(e)}")
  jaxcache.define_flags()

  def parse(args):
    try:
      return flags.FLAGS(args)
    except Exception as e:  # pylint: disable=broad-except
      fail(one_line(e))

  def _main(args):
    del args
    try:
      c = holder.value
    except Exception as e:  # pylint: disable=broad-except
      fail(f"--config: {one_line(e)}")
    try:
      if want_help:
        if check is not None:
          check(c)
        print(help_text(doc, c, describe, path))
        return 0
      jaxcache.setup_from_flags()   # compile cache on; absl/orbax/jax quiet unless --verbosity
      return main(c)
    except (UsageError, *errors) as e:
      fail(one_line(e))

  app.run(_main, argv=argv, flags_parser=parse)
