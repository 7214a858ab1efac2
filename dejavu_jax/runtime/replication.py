"""State replication (DéjàVu's third mechanism): every step's KV into the successor's host memory.

Two halves, both living inside workers (so a process runtime runs them in the actor that owns
the data):

* `ReplicationTap` (the sender, in worker s): after each step it streams what the step wrote
  into worker (s + 1) mod D's `ReplicaStore`, through the runtime's channel, on its own
  background streamer thread (the gather is dispatched on the worker thread before the next step
  can donate the cache; the device->host copy and the send run on the streamer thread).
* `ReplicaStore` (the receiver, in worker s + 1): one host KV log per (stage, microbatch), and an
  `Ack` event on the runtime's channel for each write that really landed.

What is acknowledged is exactly what is in the log, by construction:
1. A delta is sent only when it extends the log contiguously (this step is the microbatch's last
   sent step + 1). Anything else (a prefill, a microbatch rewound by a recovery, a microbatch
   whose earlier transfer failed, a successor that was replaced) sends the *whole* cache as a
   new block, under a new generation number.
2. The receiver applies a delta only if its generation is the log's and its step is the log's
   next; it acknowledges only after the write. A block resets the log at its step.
3. A failed transfer is never acknowledged, and marks its microbatch for a whole-cache resend at
   its next step; until that resend lands, no later delta of it is acknowledged (the streamer
   poisons the generation's key, and the receiver rejects out-of-order steps).
So the acknowledged step of (stage, microbatch) is one the log can be read at, and recovery's
resume step reflects only what is really in the replica.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from dejavu_jax.kv.cache import KVCache
from dejavu_jax.stream import packing
from dejavu_jax.stream.hostlog import HostKVLog
from dejavu_jax.stream.packing import Packed
from dejavu_jax.stream.streamer import Streamer


class ReplicaGap(RuntimeError):
  """A delta that does not extend its log (an earlier one was lost, or a newer block came)."""


@dataclasses.dataclass
class ReplicaWrite:
  """One transfer from stage `stage` to its successor (what travels on the runtime's channel)."""
  stage: int
  mb_id: int
  gen: int                    # sync generation; a block starts a new one
  step: int                   # the microbatch step this write brings the log to
  block: bool                 # True: the whole cache (the log restarts at `step`)
  packed: Packed              # host (numpy) slice
  shape: tuple                # the sender's cache shape [L, B, S, H, K] (to size a new log)
  dtype: Any
  layer_base: int


class ReplicaStore:
  """The replicas one worker holds in host memory: (stage, mb_id) -> log (see module doc)."""

  def __init__(self):
    self._logs: dict[tuple[int, int], tuple[HostKVLog, int, int]] = {}   # -> (log, base, gen)
    # Microbatches that left the pipeline: a transfer still in flight for one must not re-create
    # its log (ids are never reused, so this only grows by one int per microbatch).
    self._dropped: set[int] = set()
    self._lock = threading.Lock()

  def write(self, w: ReplicaWrite) -> int:
    """Lands one transfer; returns the step now acknowledged. Raises ReplicaGap."""
    key = (w.stage, w.mb_id)
    with self._lock:
      if w.mb_id in self._dropped:
        raise ReplicaGap(f"microbatch {w.mb_id} already left the pipeline")
      if w.block:
        got = self._logs.get(key)
        log = got[0] if got is not None else None
        if log is None or log.kv.shape[1:] != (w.shape[0], w.shape[1], w.shape[2], w.shape[3],
                                               w.shape[4]):
          log = HostKVLog(*w.shape, w.dtype, layer_base=w.layer_base)
        log.reset()
        self._logs[key] = (log, w.step, w.gen)
      else:
        got = self._logs.get(key)
        if got is None:
          raise ReplicaGap(f"delta of stage {w.stage} microbatch {w.mb_id} step {w.step} "
                           "before its block")
        log, base, gen = got
        if gen != w.gen or w.step != base + log.step + 1:
          raise ReplicaGap(f"delta of stage {w.stage} microbatch {w.mb_id} step {w.step} "
                           f"(gen {w.gen}) does not extend the log at step {base + log.step} "
                           f"(gen {gen})")
    # The write itself runs outside the store's lock (the log has its own).
    if w.block:
      log.write(w.packed)
    else:
      log.append(w.packed)
    return w.step

  def read(self, stage: int, mb_id: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(kv [2, L, B, S, H, K], lengths [B]) of the replica as of `step`. Raises KeyError or
    ValueError when the log does not hold that step."""
    with self._lock:
      got = self._logs.get((stage, mb_id))
    if got is None:
      raise KeyError(f"no replica of stage {stage} microbatch {mb_id} here")
    log, base, _ = got
    if not base <= step <= base + log.step:
      raise ValueError(f"the replica of stage {stage} microbatch {mb_id} holds steps "
                       f"{base}..{base + log.step}, not {step}")
    return log.read_host(step - base)

  def drop(self, mb_id: int) -> None:
    with self._lock:
      self._dropped.add(mb_id)
      for key in [k for k in self._logs if k[1] == mb_id]:
        del self._logs[key]

  def keys(self) -> list[tuple[int, int]]:
    with self._lock:
      return sorted(self._logs)

  @property
  def nbytes(self) -> int:
    with self._lock:
      return sum(log.nbytes for log, _, _ in self._logs.values())


class ReplicationTap:
  """Sender half, owned by one worker (see module doc). All calls come from the worker thread,
  except `_on_done`, which runs on the streamer thread.

  Args:
    stage: the worker's stage.
    layer_base: the stage's first global layer.
    send: (ReplicaWrite) -> step acknowledged; the runtime's channel to the successor (raises
      when the successor is dead or the transfer fails).
  """

  def __init__(self, stage: int, layer_base: int, send: Callable[[ReplicaWrite], int]):
    self.stage, self.layer_base, self._send = stage, layer_base, send
    self.streamer = Streamer(num_threads=1)
    self._lock = threading.Lock()
    self._last: dict[int, int] = {}        # mb_id -> last step sent (in the current generation)
    self._gen: dict[int, int] = {}         # mb_id -> current generation
    self._broken: set[int] = set()         # a transfer failed: resend the whole cache
    self._next_gen = 0
    self.failed_transfers = 0

  def after_step(self, mb_id: int, step: int, cache: KVCache, positions, kind: str,
                 tokens: int, delta: Packed | None = None) -> None:
    """Streams what step `step` of `mb_id` wrote (dispatched before the cache is donated).
    `delta`: that step's delta already gathered (a swapping worker's swap-out), sent as is."""
    with self._lock:
      contiguous = (kind == "decode" and mb_id not in self._broken and
                    self._last.get(mb_id) == step - 1)
    if contiguous:
      if delta is not None:   # the swap-out's slice names the stage's local layers
        packed = delta.replace(layers=(delta.layers[0] + self.layer_base,
                                       delta.layers[1] + self.layer_base))
      else:
        packed = packing.gather_step(cache, jnp.asarray(positions, jnp.int32),
                                     layer_base=self.layer_base)
      self._submit(mb_id, step, packed, cache, block=False)
    else:
      size = max(tokens, 1) if kind == "prefill" else cache.max_len
      self.send_block(mb_id, step, cache, size)

  def send_block(self, mb_id: int, step: int, cache: KVCache, size: int | None = None) -> None:
    """Sends positions [0, size) (default: all) of the cache as a new block at `step`."""
    with self._lock:
      self._gen[mb_id] = self._next_gen
      self._next_gen += 1
      self._broken.discard(mb_id)
    if isinstance(cache.k, np.ndarray):   # a host cache (a swapping worker's log): no device
      kv = np.stack([cache.k, cache.v])   # [2, L, B, S, H, K]
      b, s = kv.shape[2], kv.shape[3]
      cols = np.arange(s, dtype=np.int32)[None, :]
      lengths = np.asarray(cache.lengths)[:, None]
      packed = Packed(data=kv, positions=np.where(cols < lengths, cols, -1).astype(np.int32),
                      layers=(self.layer_base, self.layer_base + kv.shape[1]), rows=(0, b))
    else:
      packed = packing.gather(cache, 0, size or cache.max_len, layer_base=self.layer_base)
      # Only each row's used prefix: the positions past a row's length (a shorter prompt's
      # bucket padding, a reused buffer's stale tail) would otherwise land in the replica as
      # used, and a restore from it would claim them (found by the cache oracle).
      pos = packed.positions
      packed = packed.replace(positions=jnp.where(pos < cache.lengths[:, None], pos, -1))
    self._submit(mb_id, step, packed, cache, block=True)

  def _submit(self, mb_id: int, step: int, packed: Packed, cache: KVCache, block: bool) -> None:
    with self._lock:
      gen = self._gen[mb_id]
      self._last[mb_id] = step
    write = dict(stage=self.stage, mb_id=mb_id, gen=gen, step=step, block=block,
                 shape=tuple(cache.k.shape), dtype=cache.k.dtype, layer_base=self.layer_base)

    def deliver(p):
      return self._send(ReplicaWrite(packed=p, **write))

    self.streamer.submit(packed, deliver, key=(mb_id, gen),
                         on_done=lambda t, m=mb_id, g=gen: self._on_done(t, m, g))

  def _on_done(self, ticket, mb_id: int, gen: int) -> None:
    if ticket.exception() is None:
      return
    with self._lock:
      self.failed_transfers += 1
      if self._gen.get(mb_id) == gen:
        self._broken.add(mb_id)   # the next step resends the whole cache, in a new generation
    self.streamer.clear_error((mb_id, gen))   # the generation is abandoned; forget its poison

  def forget(self, mb_id: int) -> None:
    with self._lock:
      self._last.pop(mb_id, None)
      self._gen.pop(mb_id, None)
      self._broken.discard(mb_id)

  def close(self) -> None:
    # Failed transfers were already counted and resent: they are not errors of the run.
    self.streamer.close(wait=False, raise_on_error=False)
