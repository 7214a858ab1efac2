"""The shm transport's segment files without a Ray session (runtime/ray_shm.py): a receiver's
mapping unlinks the name and replaces its sender's older segment; `sweep` removes only what a
dead sender left. The transport end to end (replica writes, prompt packets, SIGKILLs) is in
tests/test_ray_disagg.py and tests/test_ray_runtime.py."""

import mmap
import os
import subprocess
import sys

import numpy as np

from dejavu_jax.runtime import ray_shm


def _segment(pid: int, n: int, data: np.ndarray) -> tuple:
  """A segment as a sender writes it; returns its ticket."""
  path = os.path.join(ray_shm.SharedMemoryTransport.DIR, f"{ray_shm.PREFIX}{pid}_{n}")
  fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
  try:
    os.ftruncate(fd, 1 << 20)
    with mmap.mmap(fd, 1 << 20) as m:
      np.copyto(np.ndarray(data.shape, data.dtype, buffer=m), data)
  finally:
    os.close(fd)
  return (path, 1 << 20, data.shape, str(data.dtype))


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_reader_maps_once_unlinks_and_replaces_the_senders_older_segment():
  pid = _dead_pid()   # a name no live process uses
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  reader = ray_shm.ShmReader()
  try:
    t0 = _segment(pid, 0, a)
    assert np.array_equal(reader.view(t0), a)
    assert not os.path.exists(t0[0])   # mapped by the receiver: the name is gone
    assert np.array_equal(reader.view(t0), a)   # the mapping serves later messages
    t1 = _segment(pid, 1, 2 * a)
    assert np.array_equal(reader.view(t1), 2 * a) and not os.path.exists(t1[0])
    assert list(reader._maps) == [t1[0]]  # pylint: disable=protected-access
  finally:
    reader.close()


def test_sweep_removes_only_dead_senders_segments():
  dead, live = _dead_pid(), os.getpid()
  x = np.ones(4, np.int32)
  paths = [_segment(dead, 0, x)[0], _segment(dead, 7, x)[0], _segment(live, 0, x)[0]]
  try:
    assert sorted(ray_shm.sweep([dead, live])) == sorted(paths[:2])
    assert [os.path.exists(p) for p in paths] == [False, False, True]
  finally:
    for p in paths:
      if os.path.exists(p):
        os.unlink(p)
