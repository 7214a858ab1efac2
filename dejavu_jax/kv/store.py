"""CacheStore: the KV caches one worker holds, keyed by microbatch id, behind a placement policy.

A worker never indexes caches by pipeline slot: the scheduler's slots say how many microbatches
are in flight, the store says where each microbatch's cache lives. That separation is what lets a
swapping policy keep every cache in host logs with only two device buffers, and lets a token
worker receive a cache it did not compute (disaggregation, recovery) without the scheduler
knowing.

The store is owned by one worker thread: every call comes from that thread (steps, loads,
frees), except `live_device_bytes` and `mb_ids`, which are read-only snapshots for stats.

Policy interface (`Placement`), called by the store:
  acquire(mb_id) -> KVCache   a device cache for a new microbatch (contents are stale: a prefill
                              resets lengths and the masking rule hides the rest)
  get(mb_id) -> KVCache       the device cache to run a step on (a swapping policy waits for the
                              swap-in here)
  put(mb_id, cache)           the step's new cache (the old one was donated)
  install(mb_id, cache)       a cache that arrived from elsewhere (a replica, a snapshot, another
                              pipeline), already placed by the worker
  release(mb_id)              the microbatch left this worker; its buffer is reused
Optional (a policy that moves caches off the device, runtime/swapping.py's `Swapping`):
  commit(mb_id, kind, positions, cache) -> Packed | None   after the step: write back what it
                              wrote (the gathered decode delta is returned for the replica)
  prefetch(mb_id, current), predict_next(current, exclude)       start loading the next microbatch
  host_cache(mb_id)           the latest cache as host arrays without moving it on the device
  close()                     stops the policy's threads
`AllOnDevice` is the baseline: a pool of `num_buffers` device caches, one per microbatch in
flight, allocated once (no allocation while serving).
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

import jax

from dejavu_jax.kv.cache import KVCache, cache_nbytes


class Placement(Protocol):
  def acquire(self, mb_id: int) -> KVCache: ...
  def get(self, mb_id: int) -> KVCache: ...
  def put(self, mb_id: int, cache: KVCache) -> None: ...
  def install(self, mb_id: int, cache: KVCache) -> None: ...
  def release(self, mb_id: int) -> None: ...
  def mb_ids(self) -> list[int]: ...
  def live_device_bytes(self) -> int: ...


class StoreFull(RuntimeError):
  """No device buffer is free for a new microbatch (more in flight than the policy holds)."""


class AllOnDevice:
  """Every in-flight microbatch's cache on the device: a pool of preallocated buffers.

  Args:
    new_cache: () -> a placed, empty device cache of the stage's shape.
    num_buffers: microbatches in flight at once (the pipeline depth D).
  """

  def __init__(self, new_cache: Callable[[], KVCache], num_buffers: int):
    if num_buffers < 1:
      raise ValueError(f"num_buffers must be >= 1, got {num_buffers}")
    self._new_cache = new_cache
    self._free: list[KVCache] = [new_cache() for _ in range(num_buffers)]
    self._caches: dict[int, KVCache] = {}
    self._lock = threading.Lock()   # only for the stats readers

  def _take_buffer(self, mb_id: int) -> KVCache:
    if mb_id in self._caches:
      raise ValueError(f"microbatch {mb_id} already has a cache here")
    if not self._free:
      raise StoreFull(f"no free cache buffer for microbatch {mb_id}: "
                      f"{sorted(self._caches)} hold all {len(self._caches)}")
    return self._free.pop()

  def acquire(self, mb_id: int) -> KVCache:
    cache = self._take_buffer(mb_id)
    with self._lock:
      self._caches[mb_id] = cache
    return cache

  def get(self, mb_id: int) -> KVCache:
    try:
      return self._caches[mb_id]
    except KeyError:
      raise KeyError(f"no cache for microbatch {mb_id} here (held: "
                     f"{sorted(self._caches)})") from None

  def put(self, mb_id: int, cache: KVCache) -> None:
    with self._lock:
      self._caches[mb_id] = cache

  def install(self, mb_id: int, cache: KVCache) -> None:
    if mb_id not in self._caches:
      self._take_buffer(mb_id)   # the pool buffer is dropped: `cache` takes its place
    with self._lock:
      self._caches[mb_id] = cache

  def release(self, mb_id: int) -> None:
    with self._lock:
      cache = self._caches.pop(mb_id, None)
    if cache is not None:
      self._free.append(cache)

  def mb_ids(self) -> list[int]:
    with self._lock:
      return sorted(self._caches)

  def live_device_bytes(self) -> int:
    with self._lock:
      return sum(cache_nbytes(c) for c in list(self._caches.values()) + self._free)


class CacheStore:
  """One worker's caches by microbatch id; placement decided by `policy` (see module doc)."""

  def __init__(self, policy: Placement):
    self.policy = policy

  def for_prefill(self, mb_id: int) -> KVCache:
    """A buffer for a new microbatch (a microbatch prefilled again keeps its buffer)."""
    if mb_id in self.policy.mb_ids():
      return self.policy.get(mb_id)
    return self.policy.acquire(mb_id)

  def get(self, mb_id: int) -> KVCache:
    return self.policy.get(mb_id)

  def put(self, mb_id: int, cache: KVCache) -> None:
    self.policy.put(mb_id, cache)

  def install(self, mb_id: int, cache: KVCache) -> None:
    self.policy.install(mb_id, cache)

  def release(self, mb_id: int) -> None:
    self.policy.release(mb_id)

  def mb_ids(self) -> list[int]:
    return self.policy.mb_ids()

  def __contains__(self, mb_id: int) -> bool:
    return mb_id in self.policy.mb_ids()

  def live_device_bytes(self) -> int:
    return self.policy.live_device_bytes()

  # ---- optional policy hooks (no-ops for a policy that keeps every cache on the device) ----
  @property
  def swapping(self) -> bool:
    return hasattr(self.policy, "commit")

  def commit(self, mb_id: int, kind: str, positions, cache: KVCache):
    commit = getattr(self.policy, "commit", None)
    return commit(mb_id, kind, positions, cache) if commit else None

  def prefetch(self, mb_id: int | None, current: int) -> None:
    if hasattr(self.policy, "prefetch"):
      self.policy.prefetch(mb_id, current)

  def predict_next(self, current: int, exclude=()) -> int | None:
    predict = getattr(self.policy, "predict_next", None)
    return predict(current, exclude) if predict else None

  def caches_for_snapshot(self) -> dict[int, KVCache]:
    """mb_id -> cache (device, or host arrays for a policy that keeps them off the device)."""
    host = getattr(self.policy, "host_cache", None)
    return {mb: (host(mb) if host else self.policy.get(mb)) for mb in self.policy.mb_ids()}

  def peak_device_bytes(self) -> int:
    return getattr(self.policy, "peak_device_bytes", self.policy.live_device_bytes())

  def close(self) -> None:
    if hasattr(self.policy, "close"):
      self.policy.close()


def device_bytes(tree) -> int:
  """Bytes of the jax.Arrays in a pytree (what a worker really holds on its devices)."""
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))
