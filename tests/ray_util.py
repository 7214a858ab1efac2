"""Shared by the Ray runtime tests: a Ray session that always shuts down, the check that it left
no Ray process behind, and the check that a killed actor's pid is gone."""

import contextlib
import os
import time

import psutil


def _ray_procs() -> list[psutil.Process]:
  """This process's descendants: the session's GCS, raylet(s), agents and workers."""
  return psutil.Process().children(recursive=True)


def _alive(procs) -> list[str]:
  out = []
  for p in procs:
    try:
      if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
        out.append(f"{p.pid}: {' '.join(p.cmdline())[:100]}")
    except psutil.NoSuchProcess:
      pass
  return out


@contextlib.contextmanager
def checked_shutdown(shutdown):
  """Runs `shutdown` on exit (even when the body failed), then fails if any process the session
  started is still alive 15 s later."""
  try:
    yield
  finally:
    procs = _ray_procs()
    shutdown()
    deadline = time.monotonic() + 15
    while (left := _alive(procs)) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not left, f"Ray processes left behind: {left}"


def pid_gone(pid: int, timeout_s: float = 10.0) -> bool:
  """True once `pid` no longer exists (a SIGKILLed actor is reaped by its raylet)."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    try:
      if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
        continue
    except psutil.NoSuchProcess:
      return True
    time.sleep(0.05)
  return False
