"""What a run was, recorded beside its results; its output directory; its warnings; progress bars.

* `prepare_output_dir(path, overwrite)`: a run writes into an empty (or new) directory; a
  non-empty one is refused (`OutputDirError`) unless `overwrite`, which first deletes the result
  files a run writes there (top-level *.jsonl, *.json, *.png, *.txt, *.md; never folders), so no
  file ever mixes two runs.
* `run_info(config, ...)`: the resolved config, the git commit (and whether the tree was dirty),
  the UTC time, the command line, the JAX version and devices; `write_run_info` saves it as
  `run.json`, and runners copy `row_info(...)` into every summary row.
* `warn(log, message)`: a loud warning (an upper-case banner in the log, and absl's warning).
* `progress_bar(total, desc, enabled)`: a tqdm bar (to stderr) for compile, serving and
  simulation, as a `(done, total)` callback.
"""

from __future__ import annotations

import datetime
import glob
import os
import subprocess
import sys

from absl import logging

RESULT_PATTERNS = ("*.jsonl", "*.json", "*.png", "*.txt", "*.md")


class OutputDirError(ValueError):
  """The output directory holds results of another run."""


def prepare_output_dir(path: str, overwrite: bool = False) -> str:
  """Makes `path` ready for a run's results (module doc); returns it."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputDirError(f"output_dir {path!r} is a file, not a directory")
  if os.path.isdir(path) and os.listdir(path):
    if not overwrite:
      raise OutputDirError(
          f"output_dir {path!r} is not empty (results of an earlier run?); pass --overwrite to "
          "replace its results, or choose another --output_dir")
    for pattern in RESULT_PATTERNS:
      for f in glob.glob(os.path.join(path, pattern)):
        if os.path.isfile(f):
          os.remove(f)
  os.makedirs(path, exist_ok=True)
  return path


def git_commit() -> str:
  """HEAD of the checkout this package runs from, with '+dirty' for local changes."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return head + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def config_dict(config) -> dict:
  """A plain, JSON-able dict of an ml_collections config (or a dict)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return {k: config_dict(v) if isinstance(v, dict) else (list(v) if isinstance(v, tuple) else v)
          for k, v in dict(config).items()}


def run_info(config, **extra) -> dict:
  """What this run was (module doc); `extra` adds fields (e.g. the figure's name)."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {
      "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": git_commit(),
      "argv": list(sys.argv),
      "jax": jax.__version__,
      "devices": f"{len(devices)} x {devices[0].platform}",
      **extra,
      "config": config_dict(config),
  }


def write_run_info(out_dir: str, info: dict) -> str:
  from dejavu_jax import metrics  # pylint: disable=g-import-not-at-top
  path = os.path.join(out_dir, "run.json")
  with open(path, "w", encoding="utf-8") as f:
    f.write(metrics.dumps(info) + "\n")
  return path


def row_info(info: dict, **fields) -> dict:
  """The fields every summary row carries: commit, time, resolved config, plus `fields`
  (seed, strategy, pacing, failures, ...)."""
  return {**fields, "commit": info["commit"], "time_utc": info["time_utc"],
          "config": info["config"]}


def warn(log, message: str) -> None:
  """A warning nobody scrolls past: a banner in the run's log and absl's warning."""
  logging.warning(message)
  if log is not None:
    log(f"\n!!! WARNING: {message}\n")


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
  """A tqdm bar as a `(done, total)` callback; call `.close()` when done. Disabled: a no-op."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
             dynamic_ncols=True, mininterval=0.5, leave=True)

  class _Callback:
    def __call__(self, done: int, total_now: int) -> None:
      if total_now != bar.total:
        bar.total = total_now
      if done > bar.n:
        bar.update(done - bar.n)

    def close(self) -> None:
      bar.close()

  return _Callback()
