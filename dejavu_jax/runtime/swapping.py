"""`Swapping`: a CacheStore placement policy keeping every cache in host memory, two on the device.

DéjàVu's microbatch swapping (DEJAVU.md, "Mechanism 2"). Each in-flight microbatch's cache lives
in a host KV log (`stream.HostKVLog`, used positionally: one block, overwritten in place); the
worker keeps two device buffers. For a step of microbatch i:

  1. `get(i)` waits for i's swap-in (issued earlier as a prefetch; if nobody predicted i, it is
     swapped in now, logged as a "demand" swap-in);
  2. the worker then calls `prefetch(j)` for the microbatch it expects next (its inbox's next
     step, else the least recently stepped microbatch here: the stage's round-robin order), which
     evicts the buffer i does not use and loads j into it on the prefetch thread;
  3. the step runs on i's buffer (donated and replaced: `put`);
  4. `commit(i, ...)` swaps out only what the step wrote (one gathered delta per decode step,
     the written prompt positions for a prefill) on the swap-out streamer; the gathered delta is
     returned so the replication tap can send the same slice to the successor's replica.

Threads and who waits on what:
  * worker thread: every policy call. It waits on a prefetch future in `get`/`acquire`/`install`
    (the only place device buffers change hands), never on the swap-out streamer directly.
  * swap-out streamer thread (`stream.Streamer`, one thread): flushes each gathered delta to host
    and writes it into the microbatch's log (per-microbatch key: in step order).
  * prefetch thread (one): waits for the microbatch's last swap-out ticket (so the log holds its
    latest step), reads the log on the host, and writes it into the evicted buffer (below). It
    returns the device cache; the worker thread assigns it to the buffer slot when it waits. So a
    slot's state is only ever mutated on the worker thread.

A swap-in moves only the used prefix: positions [0, T) where T is the longest row's length
bucketed (`bucket_length`: powers of two, so a few kernels compile once). The prefix is gathered
on the host into one contiguous `Packed` (`HostKVLog.read_prefix`), placed with one
`jax.device_put` (sharded like the buffer), and written into the evicted buffer as one block
(`packing.write_prefix`; the buffer is donated, so the device keeps exactly two buffers). Lengths
are set from the log; positions past a row's length hold stale data (the log's, or past T the
evicted microbatch's). That is safe because every reader masks by position (a query at p sees keys
j <= p, all written: models/layers.py and the fake program's `sees`/`before`), the invariant of
kv/cache.py; the fake program's tokens, which depend on every entry it reads, check it. When T is
the whole length S (or no buffer is free to donate) the log is placed whole instead, the evicted
buffer dropped first. Stats record the bytes each swap-in moved (`last_swap_in_bytes`).

Device memory: the device holds at most two caches plus, during a prefix swap-in, the prefix's
staging copy (T/S of a buffer; its bytes are live until the write into the buffer is done).
`live_device_bytes` counts both; `peak_device_bytes` is the maximum seen; `max_staging_bytes` is
the largest staging copy (never a full buffer: a full-length swap-in places the log whole; with
`staging_limit_bytes`, nothing larger than that limit). The engine's KV budget (kv/budget.py)
reserves two buffers only, so under an exact budget a prefix swap-in's staging copy goes past it
for its duration unless the policy is given the budget's headroom as `staging_limit_bytes`.

An event log (`events`: (kind, mb_id) tuples, kinds "prefetch", "demand", "resident", "step",
"evict") lets tests check that a swap-in is issued before the step that needs it, without timings.
"""

from __future__ import annotations

import concurrent.futures as futures
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.kv.cache import KVCache, cache_nbytes
from dejavu_jax.kv.buckets import bucket_length
from dejavu_jax.stream import hostmem, packing
from dejavu_jax.stream.hostlog import HostKVLog
from dejavu_jax.stream.streamer import Streamer


class _Slot:
  """One device buffer: the microbatch it holds (None: free) and its cache or pending load."""

  def __init__(self, cache: KVCache):
    self.mb: int | None = None
    self.cache: KVCache | None = cache
    self.load: futures.Future | None = None


class Swapping:
  """Host logs for every microbatch, two device buffers (see module doc).

  Args:
    new_cache: () -> a placed, empty device cache of the stage's shape (the two buffers).
    place: (host KVCache of numpy arrays) -> the same cache placed on the stage's devices.
    max_events: bound on the event log kept for tests (oldest dropped).
    prefix_swap_in: move only the used prefix on a swap-in (default); False places the log's
      whole length every time (the former behaviour, kept for comparisons).
    staging_limit_bytes: device bytes a prefix's staging copy may take beside the two buffers
      (a budget's headroom); a larger prefix is placed whole instead. None: no limit.
    host_memory: the host memory policy of the logs and of the swap-in staging buffer
      (stream/hostmem.py; default: the buffers' device's). Under a pinned policy a prefix is
      gathered into one reused pinned staging buffer, so its device_put is a direct DMA.
  """

  num_buffers = 2

  def __init__(self, new_cache: Callable[[], KVCache], place: Callable[[KVCache], KVCache],
               max_events: int = 100_000, prefix_swap_in: bool = True,
               staging_limit_bytes: int | None = None,
               host_memory: hostmem.HostMemory | None = None):
    self._place, self._new_cache = place, new_cache
    self._prefix_swap_in = prefix_swap_in
    self._staging_limit = staging_limit_bytes
    self._slots = [_Slot(new_cache()) for _ in range(self.num_buffers)]
    self._buffer_bytes = cache_nbytes(self._slots[0].cache)
    if host_memory is None:
      host_memory = hostmem.policy(next(iter(self._slots[0].cache.k.devices())))
    self.host_memory = host_memory
    self._host_staging: np.ndarray | None = None   # pinned only (prefetch thread)
    self._staging = 0           # bytes of a prefix swap-in's device staging copy, while live
    self._logs: dict[int, HostKVLog] = {}
    self._tickets: dict[int, object] = {}       # mb_id -> its last swap-out ticket
    self._order: dict[int, None] = {}           # mb_ids, least recently stepped first
    self._out = Streamer(num_threads=1)
    self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix="kv-prefetch")
    self._lock = threading.Lock()               # for the stats readers and the event log
    self.events: list[tuple[str, int]] = []
    self._max_events = max_events
    self.peak_device_bytes = self.live_device_bytes()
    self.demand_swap_ins = 0
    self.blocked_s = 0.0            # worker thread time spent waiting for swap-ins
    self.commit_s = 0.0             # worker thread time spent dispatching swap-outs
    self.last_get_swapped = False   # the last `get` needed a swap-in (paced mode charges it)
    self._loaded: set[int] = set()  # microbatches loaded since their last step here
    self.prefetches = 0
    self.max_staging_bytes = 0
    self.swap_ins = 0                 # swap-ins done (prefix or whole) and the bytes they moved
    self.swap_in_bytes = 0
    self.last_swap_in_bytes = 0

  # ---- helpers (worker thread) ----
  def _log(self, kind: str, mb_id: int) -> None:
    with self._lock:
      self.events.append((kind, mb_id))
      if len(self.events) > self._max_events:
        del self.events[:len(self.events) - self._max_events]

  def _slot_of(self, mb_id: int) -> _Slot | None:
    for slot in self._slots:
      if slot.mb == mb_id:
        return slot
    return None

  def _settle(self, slot: _Slot) -> None:
    """Waits for the slot's pending load (raises its error)."""
    if slot.load is not None:
      fut, slot.load = slot.load, None
      t0 = time.perf_counter()
      try:
        slot.cache = fut.result()
      except BaseException:
        slot.mb, slot.cache = None, self._new_cache()   # the buffer stays usable
        raise
      finally:
        self.blocked_s += time.perf_counter() - t0
      self._account()

  def _account(self) -> None:
    with self._lock:
      self.peak_device_bytes = max(self.peak_device_bytes, self.live_device_bytes())

  def _victim(self, keep: int | None) -> _Slot:
    """A slot to reuse: free first, else the least recently stepped microbatch's, never `keep`'s
    (the microbatch about to compute)."""
    cands = [s for s in self._slots if s.mb is None or s.mb != keep]
    free = [s for s in cands if s.mb is None]
    if free:
      return free[0]
    # A pending prefetch is kept when possible: it is the microbatch expected next.
    rank = {mb: i for i, mb in enumerate(self._order)}
    slot = min(cands, key=lambda s: (s.load is not None, rank.get(s.mb, -1)))
    self._settle(slot)   # a pending load into it finishes before the buffer is dropped
    self._log("evict", slot.mb)
    return slot

  def _read(self, mb_id: int, box: list) -> KVCache:
    """(prefetch thread) The microbatch's latest cache, from its log once its swap-outs landed,
    written into the evicted buffer `box.pop()` (the box: so this thread holds its only ref)."""
    buffer = box.pop() if box else None
    ticket = self._tickets.get(mb_id)
    if ticket is not None:
      ticket.wait()
    log = self._logs[mb_id]
    size = log.kv.shape[3]
    t = bucket_length(max(int(log.lengths.max()), 1), size)
    staging = log.prefix_nbytes(t)
    if (buffer is None or t >= size or not self._prefix_swap_in or
        (self._staging_limit is not None and staging > self._staging_limit)):
      del buffer                         # dropped before the whole log is placed
      kv, lengths = log.read_host()
      cache = self._place(KVCache(k=kv[0], v=kv[1], lengths=lengths))
      self._moved(kv.nbytes + lengths.nbytes)
      return cache
    packed = log.read_prefix(t, out=self._staging_buffer(staging))
    with self._lock:
      self._staging = staging
      self.max_staging_bytes = max(self.max_staging_bytes, staging)
      self.peak_device_bytes = max(self.peak_device_bytes, self.live_device_bytes())
    try:
      data_sh, pos_sh = _packed_shardings(buffer.k.sharding, buffer.lengths.sharding)
      packed = jax.device_put(packed, packed.replace(data=data_sh, positions=pos_sh))
      cache = packing.write_prefix(buffer, packed)   # one block copy; lengths set from the log
      del buffer, packed
      jax.block_until_ready(cache)       # the staging copy is freed once the write has run
    finally:
      with self._lock:
        self._staging = 0
    self._moved(staging)
    return cache

  def _staging_buffer(self, nbytes: int) -> np.ndarray | None:
    """(prefetch thread) The reused pinned host staging buffer, grown to `nbytes`; None under
    a pageable policy (a fresh array per swap-in: on a CPU, device_put may alias it)."""
    if self.host_memory.kind != hostmem.PINNED:
      return None
    if self._host_staging is None or self._host_staging.nbytes < nbytes:
      self._host_staging = None
      self._host_staging = self.host_memory.zeros((nbytes,), np.uint8)
    return self._host_staging

  def _moved(self, nbytes: int) -> None:
    with self._lock:
      self.swap_ins += 1
      self.swap_in_bytes += nbytes
      self.last_swap_in_bytes = nbytes

  def _load_into(self, slot: _Slot, mb_id: int) -> None:
    # The evicted buffer goes to the prefetch thread, which overwrites it (donated) with the
    # microbatch's used prefix; the slot counts as one buffer meanwhile.
    box = [slot.cache] if slot.cache is not None else []
    slot.mb, slot.cache = mb_id, None
    self._loaded.add(mb_id)
    slot.load = self._pool.submit(self._read, mb_id, box)

  def _touch(self, mb_id: int) -> None:
    self._order.pop(mb_id, None)
    self._order[mb_id] = None

  # ---- Placement ----
  def acquire(self, mb_id: int) -> KVCache:
    if mb_id not in self._logs:
      self._logs[mb_id] = None   # created on the first commit (shaped like the cache)
    slot = self._slot_of(mb_id) or self._victim(keep=None)
    self._settle(slot)
    slot.mb = mb_id
    self._touch(mb_id)
    self._log("resident", mb_id)
    return slot.cache

  def get(self, mb_id: int) -> KVCache:
    if mb_id not in self._logs or self._logs[mb_id] is None:
      raise KeyError(f"no cache for microbatch {mb_id} here (held: {self.mb_ids()})")
    slot = self._slot_of(mb_id)
    if slot is None:
      slot = self._victim(keep=None)
      self._load_into(slot, mb_id)
      self.demand_swap_ins += 1
      self._log("demand", mb_id)
    elif slot.load is None:
      self._log("resident", mb_id)
    self._settle(slot)
    self._touch(mb_id)
    self.last_get_swapped = mb_id in self._loaded
    self._loaded.discard(mb_id)
    self._log("step", mb_id)
    return slot.cache

  def prefetch(self, mb_id: int | None, current: int) -> None:
    """Starts loading `mb_id` into the buffer `current` does not use (no-op when it is resident
    or unknown here)."""
    if mb_id is None or mb_id == current or self._logs.get(mb_id) is None:
      return
    if self._slot_of(mb_id) is not None:
      return
    slot = self._victim(keep=current)
    self._load_into(slot, mb_id)
    self.prefetches += 1
    self._log("prefetch", mb_id)
    self._account()

  def predict_next(self, current: int, exclude=()) -> int | None:
    """The microbatch this stage most likely steps next: the least recently stepped one (not
    `current`, nor one in `exclude`: those that ran their final step here)."""
    for mb in self._order:
      if mb != current and mb not in exclude and self._logs.get(mb) is not None:
        return mb
    return None

  def put(self, mb_id: int, cache: KVCache) -> None:
    slot = self._slot_of(mb_id)
    if slot is None:
      raise KeyError(f"microbatch {mb_id} is not resident: its step cannot be stored")
    slot.cache = cache

  def commit(self, mb_id: int, kind: str, positions, cache: KVCache):
    """Swaps out what the step wrote; returns the gathered delta of a decode step (else None)."""
    t0 = time.perf_counter()
    try:
      return self._commit(mb_id, kind, positions, cache)
    finally:
      self.commit_s += time.perf_counter() - t0

  def stats(self) -> dict:
    """Counters for reports: swap-ins prefetched / on demand, worker time blocked / committing."""
    with self._lock:
      return dict(prefetches=self.prefetches, demand_swap_ins=self.demand_swap_ins,
                  blocked_s=self.blocked_s, commit_s=self.commit_s,
                  peak_device_bytes=self.peak_device_bytes, swap_ins=self.swap_ins,
                  swap_in_bytes=self.swap_in_bytes, last_swap_in_bytes=self.last_swap_in_bytes,
                  max_staging_bytes=self.max_staging_bytes)

  def _commit(self, mb_id: int, kind: str, positions, cache: KVCache):
    if kind == "decode" and self._logs.get(mb_id) is not None:
      packed = packing.gather_step(cache, jnp.asarray(positions, jnp.int32))
      self._tickets[mb_id] = self._out.submit(packed, self._logs[mb_id].write, key=mb_id)
      return packed
    positions = np.asarray(positions)
    self._write_block(mb_id, cache, lengths=None, positions=positions)
    return None

  def _write_block(self, mb_id: int, cache: KVCache, lengths=None, positions=None) -> None:
    """Resets the log and writes the cache's written positions (a prefill's, or [0, length))."""
    log = self._logs.get(mb_id)
    if log is None:
      log = self._logs[mb_id] = HostKVLog.like(cache, memory=self.host_memory)
    prev = self._tickets.get(mb_id)
    if prev is not None:
      prev.wait()   # an older delta must not land after the reset
    log.reset()
    if positions is None:
      lengths = np.asarray(lengths)
      size = max(int(lengths.max()), 1)
    else:
      size = positions.shape[1]
    packed = packing.gather(cache, 0, size)
    t = packed.positions.shape[1]
    cols = np.arange(t)[None, :]
    if positions is None:
      pos = np.where(cols < lengths[:, None], cols, -1)
    else:
      pos = np.full((positions.shape[0], t), -1, np.int32)
      pos[:, :positions.shape[1]] = np.where(positions == np.arange(positions.shape[1]),
                                             positions, -1)
    packed = packed.replace(positions=jnp.asarray(pos, jnp.int32))
    self._tickets[mb_id] = self._out.submit(packed, log.write, key=mb_id)

  def install(self, mb_id: int, cache: KVCache) -> None:
    self._write_block(mb_id, cache, lengths=np.asarray(cache.lengths))
    slot = self._slot_of(mb_id) or self._victim(keep=None)
    self._settle(slot)
    slot.mb, slot.cache = mb_id, cache
    self._touch(mb_id)
    self._log("resident", mb_id)
    self._account()

  def host_cache(self, mb_id: int) -> KVCache:
    """The microbatch's latest cache as host numpy arrays (snapshots, replica resyncs)."""
    ticket = self._tickets.get(mb_id)
    if ticket is not None:
      ticket.wait()
    kv, lengths = self._logs[mb_id].read_host()
    return KVCache(k=kv[0], v=kv[1], lengths=lengths)

  def release(self, mb_id: int) -> None:
    slot = self._slot_of(mb_id)
    if slot is not None:
      self._settle(slot)
      slot.mb = None
    with self._lock:
      self._logs.pop(mb_id, None)
    self._tickets.pop(mb_id, None)
    self._order.pop(mb_id, None)

  def mb_ids(self) -> list[int]:
    with self._lock:
      return sorted(mb for mb, log in self._logs.items() if log is not None)

  def live_device_bytes(self) -> int:
    # A slot holds one buffer: its cache, or the load that replaces (overwrites) it; plus a
    # prefix swap-in's staging copy while it is live.
    return sum(self._buffer_bytes for s in self._slots
               if s.cache is not None or s.load is not None) + self._staging

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)
    self._out.close(wait=False, raise_on_error=False)


def _packed_shardings(k_sharding, lengths_sharding):
  """Shardings for a Packed of the buffer's layers and rows: data [2, L, B, T, H, K] split like
  the buffer's k [L, B, S, H, K] (by KV heads on a tensor-parallel stage), positions like its
  lengths (replicated)."""
  if isinstance(k_sharding, jax.sharding.NamedSharding):
    spec = tuple(k_sharding.spec) + (None,) * (5 - len(k_sharding.spec))
    data = jax.sharding.NamedSharding(k_sharding.mesh, jax.sharding.PartitionSpec(None, *spec))
    return data, lengths_sharding
  return k_sharding, lengths_sharding
