"""Host memory policy (stream/hostmem.py): pageable on the CPU backend and reported as such;
under a pinned policy every buffer is page-aligned, mapped once for its lifetime, unmapped when
collected, and a refused mapping falls back to pageable instead of failing; the threaded host copy
(`copyto`) equals numpy's on every view and dtype."""

import gc
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.kv.cache import init_cache
from dejavu_jax.runtime.swapping import Swapping
from dejavu_jax.stream import hostmem
from dejavu_jax.stream.hostlog import HostKVLog
from dejavu_jax.stream.slots import HostSlots


def test_cpu_backend_picks_pageable():
  pol = hostmem.policy(jax.devices()[0])
  assert pol.kind == hostmem.PAGEABLE and "cpu" in pol.reason
  assert hostmem.policy() is pol                 # checked once
  log = HostKVLog(2, 2, 16, 2, 4, np.float32)
  assert log.memory is pol
  assert HostSlots(1, (0, 2), 2, 16, 2, 4, np.float32).memory is pol
  swap = Swapping(lambda: init_cache(2, 2, 16, 2, 4), jax.device_put)
  try:
    assert swap.host_memory is pol
  finally:
    swap.close()


class FakeClient:
  def __init__(self, refuse=False):
    self.mapped, self.refuse = {}, refuse

  def dma_map(self, addr, size):
    if self.refuse:
      raise RuntimeError("out of pinned memory")
    assert addr not in self.mapped
    self.mapped[addr] = size

  def dma_unmap(self, addr):
    del self.mapped[addr]


def test_pinned_policy_maps_page_aligned_buffers_for_their_lifetime():
  client = FakeClient()
  pol = hostmem.HostMemory(hostmem.PINNED, "fake", client)
  log = HostKVLog(2, 3, 16, 2, 4, np.float32, memory=pol)
  addr = log.kv.ctypes.data
  assert addr % 4096 == 0 and client.mapped == {addr: log.kv.nbytes}
  assert log.kv.shape == (2, 2, 3, 16, 2, 4) and not log.kv.any()
  assert pol.pinned_bytes == log.kv.nbytes
  log.kv[1, 1, 2, 15] = 7.0                        # writable, and the whole range is usable
  assert log.kv.sum() == 7.0 * 8
  del log
  gc.collect()
  assert client.mapped == {} and pol.pinned_bytes == 0


def test_refused_mapping_falls_back_to_pageable():
  pol = hostmem.HostMemory(hostmem.PINNED, "fake", FakeClient(refuse=True))
  x = pol.zeros((4, 5), np.int32)
  assert x.shape == (4, 5) and pol.fallbacks == 1 and pol.pinned_bytes == 0


def test_read_prefix_into_a_staging_buffer_equals_a_fresh_read():
  log = HostKVLog(2, 2, 16, 2, 4, np.float32)
  log.kv[:] = np.arange(log.kv.size, dtype=np.float32).reshape(log.kv.shape)
  log.grow(np.array([5, 9]))
  fresh = log.read_prefix(8)
  staging = np.zeros(log.prefix_nbytes(8), np.uint8)
  into = log.read_prefix(8, out=staging)
  np.testing.assert_array_equal(into.data, fresh.data)
  np.testing.assert_array_equal(into.positions, fresh.positions)
  assert np.shares_memory(into.data, staging)
  with pytest.raises(ValueError, match="cannot hold a prefix"):
    log.read_prefix(8, out=np.zeros(16, np.uint8))


def test_pinned_swapping_stages_through_one_reused_buffer():
  """A swap-in under a pinned policy gathers into the reused staging buffer; the cache it
  places equals the log's."""
  client = FakeClient()
  pol = hostmem.HostMemory(hostmem.PINNED, "fake", client)
  swap = Swapping(lambda: init_cache(2, 2, 32, 2, 4), jax.device_put, host_memory=pol)
  try:
    k = jnp.arange(2 * 2 * 32 * 2 * 4, dtype=jnp.float32).reshape(2, 2, 32, 2, 4)
    for mb in range(3):
      swap.install(mb, init_cache(2, 2, 32, 2, 4).replace(
          k=k + mb, v=k - mb, lengths=jnp.array([5, 7], jnp.int32)))
    cache = swap.get(0)                              # evicted by mb 2: swapped back in
    assert swap.stats()["swap_ins"] == 1
    staging = swap._host_staging                     # pylint: disable=protected-access
    assert staging is not None and staging.ctypes.data in client.mapped
    for row, n in enumerate((5, 7)):   # past a row's length the buffer may hold stale data
      np.testing.assert_array_equal(np.asarray(cache.k)[:, row, :n], np.asarray(k)[:, row, :n])
      np.testing.assert_array_equal(np.asarray(cache.v)[:, row, :n], np.asarray(k)[:, row, :n])
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5, 7])
  finally:
    swap.close()


@pytest.mark.parametrize("shape,index", [
    ((2, 6, 3, 40, 2, 8), (slice(None), slice(None), slice(None), slice(0, 17))),   # a log prefix
    ((50_000,), (slice(None),)),                                                    # 1-D
    ((3, 5, 700), (slice(None), slice(1, 4), slice(0, 699))),                       # axis 0 < threads
    ((11, 9, 33), (slice(None, None, -1),)),                                        # reversed view
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_parallel_copyto_equals_numpy(monkeypatch, shape, index, dtype):
  monkeypatch.setattr(hostmem, "_PARALLEL_MIN_BYTES", 0)   # split even these small arrays
  rng = np.random.default_rng(0)
  src = rng.integers(-100, 100, shape).astype(jnp.dtype(dtype))[index]
  for threads in (1, 3, 8):
    dst = np.zeros(src.shape, src.dtype)
    hostmem.copyto(dst, src, threads=threads)
    np.testing.assert_array_equal(dst.view(f"u{dst.itemsize}"),
                                  np.ascontiguousarray(src).view(f"u{dst.itemsize}"))


def test_parallel_copyto_splits_the_work_over_threads(monkeypatch):
  """Two pieces must be copied at the same time: each of the first two copies waits for the
  other (a serial copy breaks the barrier), and the caller's thread copies nothing."""
  monkeypatch.setattr(hostmem, "_PARALLEL_MIN_BYTES", 0)
  seen = set()
  barrier = threading.Barrier(2, timeout=20)
  calls = []
  real = np.copyto

  def spy(a, b, **kw):
    seen.add(threading.get_ident())
    calls.append(1)
    if len(calls) <= 2:
      barrier.wait()
    real(a, b, **kw)
  monkeypatch.setattr(hostmem.np, "copyto", spy)
  src = np.arange(2 * 24 * 64, dtype=np.float32).reshape(2, 24, 64)
  dst = np.zeros_like(src)
  hostmem.copyto(dst, src, threads=4)
  np.testing.assert_array_equal(dst, src)
  assert len(seen) > 1 and threading.get_ident() not in seen


def test_copyto_names_bad_input(monkeypatch):
  with pytest.raises(ValueError, match="equal shapes and dtypes"):
    hostmem.copyto(np.zeros((3,), np.float32), np.zeros((4,), np.float32))
  with pytest.raises(ValueError, match="equal shapes and dtypes"):
    hostmem.copyto(np.zeros((3,), np.float32), np.zeros((3,), np.float64))
  monkeypatch.setenv("DEJAVU_COPY_THREADS", "0")
  with pytest.raises(ValueError, match="DEJAVU_COPY_THREADS"):
    hostmem.copy_threads()
  monkeypatch.setenv("DEJAVU_COPY_THREADS", "3")
  assert hostmem.copy_threads() == 3
