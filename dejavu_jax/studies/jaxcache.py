"""What every entry point does first: JAX's persistent compilation cache on, third-party logging
quiet.

    from dejavu_jax.studies import jaxcache
    _CACHE = jaxcache.define_flags()          # --compile_cache=DIR|off, at module level of a main
    ...
    def main(argv):
      jaxcache.setup_from_flags()             # cache on, absl/orbax/jax loggers at WARNING

Compiling the stage programs (every prompt bucket, the decode step) takes minutes on a loaded
CPU machine and is the same work every run; with the cache a second run loads the executables
from disk. The cache lives in `~/.cache/dejavu_jax/jax_cache` (under `$XDG_CACHE_HOME` when
set), or where `$DEJAVU_JAX_CACHE_DIR` says; "off" there or in `--compile_cache` disables it.
Benchmarks call `enable_compilation_cache()` alone.
"""

from __future__ import annotations

import logging as pylogging
import os

ENV_VAR = "DEJAVU_JAX_CACHE_DIR"
OFF = ("off", "none", "0", "false", "no")

# Python loggers that flood stderr at INFO: orbax logs every save/restore step (over a thousand
# lines for one snapshot-recovering run), jax logs cache hits and compiles.
NOISY_LOGGERS = ("absl", "orbax", "orbax.checkpoint", "jax", "jax._src", "etils", "tensorstore")


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dejavu_jax", "jax_cache")


def resolve_cache_dir(path: str | None = None) -> str | None:
  """The directory to use, or None when disabled: `path` ("" = not given), else the env var,
  else the default."""
  if path is None or path == "":
    path = os.environ.get(ENV_VAR, "") or default_cache_dir()
  if path.strip().lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(path))


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turns JAX's persistent compilation cache on (see module doc); returns its directory, or
  None when disabled. Safe to call more than once."""
  import jax  # pylint: disable=g-import-not-at-top
  cache_dir = resolve_cache_dir(path)
  if cache_dir is None:
    return None
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  # The default (1 s) skips most stage programs on a fast machine, and the small ones add up:
  # a decode step compiles in under a second but there is one per stage and per bucket.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return cache_dir


def quiet_logging(verbose: bool = False, set_absl: bool = True) -> None:
  """absl, orbax and jax loggers at WARNING (INFO when `verbose`); XLA's C++ log at errors.
  `set_absl=False` leaves absl's verbosity as --verbosity set it."""
  level = pylogging.INFO if verbose else pylogging.WARNING
  if set_absl:
    try:
      from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
      absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
      pass
  for name in NOISY_LOGGERS:
    pylogging.getLogger(name).setLevel(level)
  if not verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def define_flags():
  """Defines `--compile_cache` (a directory, "off", or "" for the default); call once at module
  level of an absl main."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if "compile_cache" in flags.FLAGS:
    return flags.FLAGS["compile_cache"]
  return flags.DEFINE_string(
      "compile_cache", "",
      f"JAX persistent compilation cache directory; 'off' disables it; default "
      f"${ENV_VAR} or ~/.cache/dejavu_jax/jax_cache")


def setup_from_flags() -> str | None:
  """For an absl main: quiet logging unless `--verbosity`/`-v` was given, and the cache of
  `--compile_cache` (when defined). Returns the cache directory (None: off)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fl = flags.FLAGS
  asked = "verbosity" in fl and bool(fl["verbosity"].present)
  quiet_logging(asked and fl.verbosity >= 0, set_absl=not asked)
  path = fl.compile_cache if "compile_cache" in fl else None
  return enable_compilation_cache(path)
