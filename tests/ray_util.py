"""Shared by the Ray runtime tests: a Ray session that always shuts down (`ray_session`, a module
fixture: import it into a test module to use it), the check that it left
no Ray process behind, the check that a killed actor's pid is gone, and the session's listening
TCP sockets, and the shared-memory segments its processes left in /dev/shm."""

import contextlib
import ipaddress
import os
import re
import time

import psutil
import pytest


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


def session_pids() -> set[int]:
  """The pids of the session's processes now (this process's descendants)."""
  return {p.pid for p in _ray_procs()}


def shm_segments(pids) -> list[str]:
  """The shm transport's segments (runtime/ray_shm.py) in /dev/shm that processes `pids` made
  and that still have a name."""
  from dejavu_jax.runtime import ray_shm  # pylint: disable=g-import-not-at-top
  pids = set(pids)
  names = (re.fullmatch(re.escape(ray_shm.PREFIX) + r"(\d+)_\d+", f)
           for f in os.listdir(ray_shm.SharedMemoryTransport.DIR))
  return sorted(m.group(0) for m in names if m and int(m.group(1)) in pids)


def tcp_listeners() -> list[tuple[int, str, str, int]]:
  """(pid, process name, ip, port) of every listening TCP socket of this process and its
  descendants (the driver's own gRPC server, the session's GCS, raylets, agents and actors)."""
  out = []
  for p in [psutil.Process()] + _ray_procs():
    try:
      name = p.name()
      out += [(p.pid, name, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="tcp")
              if c.status == psutil.CONN_LISTEN]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
      pass
  return out


def is_loopback(ip: str) -> bool:
  """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (gRPC's sockets: ::ffff:127.0.0.1)."""
  addr = ipaddress.ip_address(ip.split("%")[0])
  return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and
                                  addr.ipv4_mapped.is_loopback)


@pytest.fixture(scope="module")
def ray_session():
  """One local Ray session (8 CPUs) for a test module, checked to leave no process behind."""
  import ray  # pylint: disable=g-import-not-at-top
  from dejavu_jax.runtime.ray import init_ray  # pylint: disable=g-import-not-at-top
  init_ray(num_cpus=8)
  with checked_shutdown(ray.shutdown):
    yield
