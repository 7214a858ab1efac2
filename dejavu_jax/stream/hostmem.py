"""Host memory for KV logs, prompt slots and swap staging: pinned where the device can DMA it.

This module owns the choice, made once per device client (`policy`), between

  "pinned_host"  numpy arrays whose pages are registered with the device runtime for DMA
                 (`client.dma_map`, PJRT's DmaMap: cudaHostRegister on a GPU), so host<->device
                 copies from and into them run at the link's pinned speed without a staging copy;
                 chosen when the device is not a CPU, has the "pinned_host" memory kind and its
                 client accepts a probe mapping;
  "pageable"     plain numpy (a CPU backend: "device" memory is host memory already, and its
                 client has no DmaMap).

`copyto(dst, src)` is the host copy of those paths (a swap-in's gather of the used prefix into
the staging buffer): split over threads, since one thread's memcpy (~12 GB/s measured on an H200
host) is what bounded a swap-in, not the pinned link (~47 GB/s).

`zeros(shape, dtype, memory)` allocates under a policy: a page-aligned buffer, mapped for its
lifetime (unmapped when the array is collected). A mapping that fails (pinned memory exhausted)
falls back to pageable for that buffer and is counted (`HostMemory.fallbacks`), never fatal.
The run summary reports the kind (`host_memory_kind`).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import weakref

import jax
import numpy as np

PINNED, PAGEABLE = "pinned_host", "pageable"
_PAGE = 4096


class HostMemory:
  """A host memory policy: `kind` (PINNED or PAGEABLE), why it was chosen, and the client that
  maps pinned buffers."""

  def __init__(self, kind: str, reason: str, client=None):
    if kind not in (PINNED, PAGEABLE):
      raise ValueError(f"unknown host memory kind {kind!r}; expected {PINNED!r} or {PAGEABLE!r}")
    if kind == PINNED and client is None:
      raise ValueError("pinned host memory needs the device client that maps it")
    self.kind, self.reason, self.client = kind, reason, client
    self.fallbacks = 0       # pinned allocations that fell back to pageable
    self.pinned_bytes = 0    # bytes currently mapped
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"HostMemory({self.kind!r}, {self.reason!r})"

  def zeros(self, shape, dtype) -> np.ndarray:
    """A zeroed host array under this policy (see the module doc)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if self.kind == PAGEABLE or n == 0:
      return np.zeros(shape, dtype)
    raw = np.zeros(n + _PAGE, np.uint8)
    off = (-raw.ctypes.data) % _PAGE
    addr = raw.ctypes.data + off
    try:
      self.client.dma_map(addr, n)
    except Exception:  # pylint: disable=broad-except
      with self._lock:
        self.fallbacks += 1
      return np.zeros(shape, dtype)
    with self._lock:
      self.pinned_bytes += n
    weakref.finalize(raw, self._unmap, addr, n)
    return raw[off:off + n].view(dtype).reshape(shape)

  def _unmap(self, addr: int, n: int) -> None:
    try:
      self.client.dma_unmap(addr)
    finally:
      with self._lock:
        self.pinned_bytes -= n


_POLICIES: dict = {}
_POLICIES_LOCK = threading.Lock()


def choose(device: jax.Device) -> HostMemory:
  """Checks what `device` offers (no caching; `policy` caches)."""
  if device.platform == "cpu":
    return HostMemory(PAGEABLE, "cpu backend: device memory is host memory")
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception:  # pylint: disable=broad-except  (backends without the memories API)
    kinds = set()
  if PINNED not in kinds:
    return HostMemory(PAGEABLE, f"{device.platform} has no pinned_host memory kind")
  client = device.client
  if not hasattr(client, "dma_map"):
    return HostMemory(PAGEABLE, "this jaxlib has no dma_map")
  probe = np.zeros(2 * _PAGE, np.uint8)
  addr = probe.ctypes.data + (-probe.ctypes.data) % _PAGE
  try:
    client.dma_map(addr, _PAGE)
    client.dma_unmap(addr)
  except Exception as e:  # pylint: disable=broad-except
    return HostMemory(PAGEABLE, f"dma_map refused: {type(e).__name__}: {e}"[:200])
  return HostMemory(PINNED, f"{device.platform} ({device.device_kind}) maps host buffers for DMA",
                    client)


def policy(device: jax.Device | None = None) -> HostMemory:
  """The policy of `device`'s client (default: the default device), checked once."""
  device = jax.devices()[0] if device is None else device
  key = (device.platform, id(device.client))
  with _POLICIES_LOCK:
    if key not in _POLICIES:
      _POLICIES[key] = choose(device)
    return _POLICIES[key]


def zeros(shape, dtype, memory: HostMemory | None = None) -> np.ndarray:
  """`memory.zeros` (default: the default device's policy)."""
  return (policy() if memory is None else memory).zeros(shape, dtype)


# Below this a copy is not worth the threads' hand-off.
_PARALLEL_MIN_BYTES = 8 << 20
_COPY_POOL: list = []
_COPY_POOL_LOCK = threading.Lock()


def copy_threads() -> int:
  """Threads of `copyto` (DEJAVU_COPY_THREADS overrides; default min(8, CPUs))."""
  env = os.environ.get("DEJAVU_COPY_THREADS")
  if env:
    n = int(env)
    if n < 1:
      raise ValueError(f"DEJAVU_COPY_THREADS must be >= 1, got {env!r}")
    return n
  return max(1, min(8, os.cpu_count() or 1))


def _pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
  with _COPY_POOL_LOCK:
    if not _COPY_POOL or _COPY_POOL[0]._max_workers != n:   # pylint: disable=protected-access
      _COPY_POOL[:] = [concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="hostcopy")]
    return _COPY_POOL[0]


def copyto(dst: np.ndarray, src: np.ndarray, threads: int | None = None) -> None:
  """`np.copyto(dst, src)` for same-shape, same-dtype arrays (src may be any strided view),
  split along the leading axes over `threads` threads (default `copy_threads()`). NumPy drops the
  GIL inside a plain copy, so the pieces run in parallel; a same-size unsigned-int view keeps
  extension dtypes (bfloat16) on that plain path."""
  if dst.shape != src.shape or dst.dtype != src.dtype:
    raise ValueError(f"copyto needs equal shapes and dtypes, got {dst.shape} {dst.dtype} <- "
                     f"{src.shape} {src.dtype}")
  n = copy_threads() if threads is None else threads
  if n <= 1 or src.nbytes < _PARALLEL_MIN_BYTES or src.ndim == 0:
    np.copyto(dst, src)
    return
  if src.dtype.itemsize in (1, 2, 4, 8) and src.dtype.kind not in "biuf":
    raw = np.dtype(f"u{src.dtype.itemsize}")
    dst, src = dst.view(raw), src.view(raw)
  # about n pieces of contiguous index ranges: along axis 0, or, where axis 0 is shorter than n
  # (a KV log's prefix is [2, L, B, T, H, K]), along axis 1 of each of its entries
  if src.ndim == 1 or src.shape[0] >= n:
    jobs = [(dst[a:b], src[a:b]) for a, b in _ranges(src.shape[0], n)]
  else:
    per = -(-n // src.shape[0])
    jobs = [(dst[i, a:b], src[i, a:b])
            for i in range(src.shape[0]) for a, b in _ranges(src.shape[1], per)]
  chunks = [jobs[i::n] for i in range(n)]

  def run(chunk):
    for a, b in chunk:
      np.copyto(a, b)
  list(_pool(n).map(run, [c for c in chunks if c]))


def _ranges(length: int, parts: int) -> list[tuple[int, int]]:
  """`length` split into min(parts, length) contiguous, near-equal [start, stop) ranges."""
  parts = max(1, min(parts, length))
  bounds = [length * i // parts for i in range(parts + 1)]
  return list(zip(bounds[:-1], bounds[1:]))
