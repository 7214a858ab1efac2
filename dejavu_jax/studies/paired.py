"""Paired benchmark rounds under several thread settings, one worker process per setting.

XLA:CPU reads its threading flags once, when the backend starts, so single-threaded and
multi-threaded runs of the same code need separate processes. This module owns that harness:

  * `run_paired(script, args, runs, modes)` (the driver) starts one worker per mode (`script
    --worker=<mode> args...`; a single-threaded worker gets `SINGLE_XLA_FLAGS` and
    OMP_NUM_THREADS=1 in its environment, the script sets torch to one thread, and the process is
    pinned to one CPU (`single_cpu`): XLA:CPU's own thread pool, which runs YNNPACK dots and
    independent thunks, has one thread per schedulable CPU whatever the flags say, so without
    the pin a "single-threaded" XLA step used ~1.8 cores (measured: process CPU time 88 ms for
    a 48 ms batch-8 OPT-125M matmul chain, benchmarks/decode_matmul.py)), lets each
    set up (load, build), then asks them for rounds in turn, round 0 as a warm-up, alternating
    which mode goes first, so drifts in the machine's load hit every mode alike. It returns
    each mode's round records and the 1-minute load average before every round.
  * `serve_rounds(one_round)` (the worker) answers each request with one round's record (a JSON
    object on a line of its own, prefixed so that other prints do not confuse the driver).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable, Sequence

MODES = ("single", "multi")
SINGLE_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
_READY, _ROUND = "@@paired-ready", "@@paired-round "


def worker_env(mode: str) -> dict:
  """The environment of a worker in `mode`."""
  if mode not in MODES:
    raise ValueError(f"unknown thread mode {mode!r}; expected one of {MODES}")
  env = dict(os.environ)
  if mode == "single":
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SINGLE_XLA_FLAGS}".strip()
    env["OMP_NUM_THREADS"] = "1"
  return env


def single_cpu() -> int:
  """The CPU a single-threaded worker is pinned to: the highest this process may run on."""
  return max(os.sched_getaffinity(0))


def _pin_to(cpu: int):
  return lambda: os.sched_setaffinity(0, {cpu})


class _Worker:
  def __init__(self, script: str, mode: str, args: Sequence[str]):
    self.mode = mode
    pin = _pin_to(single_cpu()) if mode == "single" else None
    self.proc = subprocess.Popen([sys.executable, script, f"--worker={mode}", *args],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=worker_env(mode), preexec_fn=pin)
    self._expect(_READY)

  def _expect(self, prefix: str) -> str:
    for line in self.proc.stdout:
      if line.startswith(prefix):
        return line[len(prefix):]
      sys.stdout.write(f"[{self.mode}] {line}")
    raise RuntimeError(f"the {self.mode}-threaded worker exited (code {self.proc.wait()}) "
                       f"before answering {prefix!r}")

  def round(self) -> dict:
    self.proc.stdin.write("round\n")
    self.proc.stdin.flush()
    return json.loads(self._expect(_ROUND))

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()


def run_paired(script: str, args: Sequence[str], runs: int,
               modes: Sequence[str] = MODES) -> tuple[dict, list]:
  """({mode: [record of each timed round]}, [load average before each timed round])."""
  workers = []
  try:
    for mode in modes:
      workers.append(_Worker(script, mode, args))
    records = {m: [] for m in modes}
    loads = []
    for rnd in range(runs + 1):   # round 0 warms up (and compiles); not recorded
      order = workers if rnd % 2 == 0 else workers[::-1]
      if rnd:
        loads.append(round(os.getloadavg()[0], 2))
      for w in order:
        rec = w.round()
        if rnd:
          records[w.mode].append(rec)
    return records, loads
  finally:
    for w in workers:
      w.close()


def serve_rounds(one_round: Callable[[], dict]) -> None:
  """The worker's loop: announce readiness, then one round's record per request until "quit"."""
  print(_READY, flush=True)
  for line in sys.stdin:
    if line.strip() == "quit":
      return
    print(_ROUND + json.dumps(one_round()), flush=True)
