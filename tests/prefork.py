"""Runs many `python -m module args...` command lines for the tests at the cost of one Python
start: a fresh interpreter imports the heavy dependencies every main shares (jax, the config
module, absl, ml_collections: ~2 s of each command's few seconds) once, then forks one child per
command. A child is a real process running the module as `__main__` with that argv (runpy, as
`-m` does), its own stdout and stderr file descriptors, no stdin and its exit status, so what a
test sees (exit code, output, files written) is what the command line gives. Nothing in the
preloading process has started a thread or an XLA backend, so forking it is safe."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

# The modules every experiment main imports before its own code runs.
PRELOAD = ("numpy", "jax", "jax.numpy", "absl.app", "absl.flags", "ml_collections",
           "ml_collections.config_flags", "dejavu_jax.config", "dejavu_jax.studies.cli",
           "dejavu_jax.studies.runconfig")

_ZYGOTE = r"""
import atexit, importlib, json, os, runpy, sys, threading, time, traceback
spec = json.load(open(sys.argv[1]))
for name in spec["preload"]:
  importlib.import_module(name)
# A fork is only safe from a single-threaded process without a backend.
assert threading.active_count() == 1, threading.enumerate()

def child(argv, out, err):
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  for fd, path in ((1, out), (2, err)):
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(f, fd)
    os.close(f)
  code = 0
  try:
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
  except SystemExit as e:
    if e.code is None:
      code = 0
    elif isinstance(e.code, int):
      code = e.code
    else:
      print(e.code, file=sys.stderr)
      code = 1
  except BaseException:  # as the interpreter does with an uncaught exception
    traceback.print_exc()
    code = 1
  try:
    atexit._run_exitfuncs()
  finally:
    for s in (sys.stdout, sys.stderr):
      try:
        s.flush()
      except Exception:
        pass
    os._exit(code)

jobs, running, results = list(enumerate(spec["commands"])), {}, {}
while jobs or running:
  while jobs and len(running) < spec["workers"]:
    i, argv = jobs.pop(0)
    out, err = (os.path.join(spec["dir"], f"{i}.{s}") for s in ("out", "err"))
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      child(argv, out, err)
    running[pid] = (i, time.monotonic())
  pid, status = os.waitpid(-1, os.WNOHANG)
  if pid == 0:
    for p, (i, t0) in list(running.items()):
      if time.monotonic() - t0 > spec["timeout"]:
        os.kill(p, 9)
    time.sleep(0.02)
    continue
  i, _ = running.pop(pid)
  results[i] = os.waitstatus_to_exitcode(status)
json.dump([results[i] for i in range(len(spec["commands"]))], open(spec["result"], "w"))
"""


@dataclasses.dataclass
class Result:
  args: list[str]
  returncode: int
  stdout: str
  stderr: str


def run_modules(commands: list[list[str]], cwd: str, timeout: float = 400,
                workers: int = 2) -> list[Result]:
  """Each command is [module, *args], run as `python -m module args` would be, from `cwd`,
  `workers` at a time; a command still running after `timeout` s is killed (return code -9)."""
  with tempfile.TemporaryDirectory(prefix="prefork_") as d:
    spec = dict(commands=[list(c) for c in commands], preload=PRELOAD, workers=workers,
                timeout=timeout, dir=d, result=os.path.join(d, "result.json"))
    with open(os.path.join(d, "spec.json"), "w", encoding="utf-8") as f:
      json.dump(spec, f)
    proc = subprocess.run([sys.executable, "-c", _ZYGOTE, os.path.join(d, "spec.json")],
                          cwd=cwd, capture_output=True, text=True,
                          timeout=timeout * (len(commands) + 1), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"the preloading process failed:\n{proc.stderr[-3000:]}"
    with open(spec["result"], encoding="utf-8") as f:
      codes = json.load(f)

    def read(i, s):
      with open(os.path.join(d, f"{i}.{s}"), encoding="utf-8", errors="replace") as f:
        return f.read()
    return [Result(list(c), code, read(i, "out"), read(i, "err"))
            for i, (c, code) in enumerate(zip(commands, codes))]
