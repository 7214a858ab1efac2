"""HostSlots: a token worker's bounded host memory for prompt caches streamed from elsewhere.

In prompt-token disaggregation a prompt pipeline computes a microbatch's prompt cache and streams
it, layer range by layer range, into the host memory of the token workers that own those layers.
Host memory is finite, so each token worker has a fixed number of slots, preallocated once (one
`HostKVLog` of the worker's layers per slot):

  reserve(mb)        the microbatch asks for a slot before anything is streamed for it; False
                     when every slot is held (the caller waits: backpressure on the prompt side)
  write(mb, p, len)  a packet of global layers lands (any sub-range: a layer-wise prompt worker
                     sends one packet per layer, two prompt stages may feed one worker); True
                     the first time the slot holds every layer of the worker (the prompt cache
                     is complete here, whatever order the layers came in)
  read(mb)           the complete cache on the host (what the worker loads to its device)
  release(mb)        the slot is free again (the cache went to the device, or the microbatch
                     was lost)

Writes for a microbatch that holds no slot are dropped and reported (False): after a failure, a
prompt worker may still stream a microbatch that was requeued under a new id. Thread-safe: the
prompt side's senders write while the token worker's threads load and release.
"""

from __future__ import annotations

import threading

import numpy as np

from dejavu_jax.kv.cache import KVCache
from dejavu_jax.stream import hostmem
from dejavu_jax.stream.hostlog import HostKVLog
from dejavu_jax.stream.packing import Packed, Range


class HostSlots:
  """`num_slots` preallocated host caches of layers `layers` (global), shape [B, S, H, K], in
  host memory of the policy `memory` (stream/hostmem.py; default: the default device's)."""

  def __init__(self, num_slots: int, layers: Range, batch: int, max_len: int, num_heads: int,
               head_dim: int, dtype, memory: hostmem.HostMemory | None = None):
    if num_slots < 1:
      raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    self.layers = (int(layers[0]), int(layers[1]))
    n = self.layers[1] - self.layers[0]
    self.memory = hostmem.policy() if memory is None else memory
    self._logs = [HostKVLog(n, batch, max_len, num_heads, head_dim, dtype,
                            layer_base=self.layers[0], memory=self.memory)
                  for _ in range(num_slots)]
    self._free = list(range(num_slots))
    self._held: dict[int, int] = {}            # mb_id -> slot index
    self._landed: dict[int, set] = {}          # mb_id -> global layers written
    self._lengths: dict[int, np.ndarray] = {}  # mb_id -> row lengths of the prompt cache
    self._lock = threading.Lock()

  @property
  def num_slots(self) -> int:
    return len(self._logs)

  def held(self) -> list[int]:
    with self._lock:
      return sorted(self._held)

  def reserve(self, mb_id: int) -> bool:
    with self._lock:
      if mb_id in self._held:
        raise ValueError(f"microbatch {mb_id} already holds slot {self._held[mb_id]}")
      if not self._free:
        return False
      i = self._free.pop(0)
      self._logs[i].reset()
      self._held[mb_id] = i
      self._landed[mb_id] = set()
      return True

  def write(self, mb_id: int, packed: Packed, lengths) -> bool:
    """Lands one packet; True when this write completed the slot (every layer here landed)."""
    with self._lock:
      i = self._held.get(mb_id)
      if i is None:
        return False
      done_before = self._complete(mb_id)
      self._logs[i].write(packed)   # checks the packet's layers lie inside this worker's
      self._landed[mb_id].update(range(*packed.layers))
      self._lengths[mb_id] = np.asarray(lengths, np.int32)
      return not done_before and self._complete(mb_id)

  def _complete(self, mb_id: int) -> bool:
    return len(self._landed.get(mb_id, ())) == self.layers[1] - self.layers[0]

  def complete(self, mb_id: int) -> bool:
    with self._lock:
      return self._complete(mb_id)

  def read(self, mb_id: int) -> KVCache:
    """The complete prompt cache as numpy arrays (a copy: the slot may be reused at once)."""
    with self._lock:
      if mb_id not in self._held:
        raise KeyError(f"microbatch {mb_id} holds no host slot here (held: {sorted(self._held)})")
      if not self._complete(mb_id):
        missing = sorted(set(range(*self.layers)) - self._landed[mb_id])
        raise ValueError(f"microbatch {mb_id}'s prompt cache is incomplete: layers {missing} "
                         "have not landed")
      kv, _ = self._logs[self._held[mb_id]].read_host()
      lengths = self._lengths[mb_id]
    return KVCache(k=kv[0], v=kv[1], lengths=lengths.copy())

  def release(self, mb_id: int) -> bool:
    """Frees the microbatch's slot; False if it held none."""
    with self._lock:
      i = self._held.pop(mb_id, None)
      self._landed.pop(mb_id, None)
      self._lengths.pop(mb_id, None)
      if i is None:
        return False
      self._free.append(i)
      self._free.sort()
      return True
