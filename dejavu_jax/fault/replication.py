"""State replication (DéjàVu's third mechanism) and the `replica` recovery built on it.

Ring replication: after every step, stage s streams the KV entries that step wrote (the prompt
block after a prefill, one token per row after a decode step) into a host KV log kept in the
*next* worker's host memory, (s + 1) mod D. The receiving store records an acknowledgement
(microbatch, step) once the entries have landed.

Threads: `Replicator.after_step` runs on the stage worker's thread right after its step, so the
gather is dispatched before the next step of that slot can donate the cache; the device->host
copy and the log write run on the `Streamer`'s threads; acknowledgements are written by those
threads into the receiving `ReplicaStore` (under its lock).

Recovery (`recover_from_replicas`, called by the engine when stage s died): for every microbatch
in flight, the resume step r is the smaller of the last step the successor acknowledged for
stage s and the last step every stage completed (the engine saw its result). The replacement
worker's cache for that slot is read back from the replica, the tokens after step r are dropped
(they are generated again), and the microbatch continues with step r + 1. The replicas the dead
worker held (of stage s - 1) are rebuilt by streaming stage s - 1's caches into the replacement's
store. A microbatch with no usable replica (its prompt not yet replicated or completed, the
successor dead too, or a 1-stage pipeline whose replica lived on the dead worker) falls back to
`restart`.
"""

from __future__ import annotations

import threading

import jax.numpy as jnp

from dejavu_jax.stream.hostlog import HostKVLog
from dejavu_jax.stream.streamer import Streamer


class ReplicaStore:
  """The replicas one worker holds in its host memory: (stage, slot) -> log and last ack."""

  def __init__(self):
    self.logs: dict[tuple[int, int], HostKVLog] = {}
    self._acked: dict[tuple[int, int], tuple[int, int]] = {}
    self._lock = threading.Lock()

  def fresh_log(self, key, cache, layer_base: int) -> HostKVLog:
    """The log of `key`, emptied (a new microbatch took the slot)."""
    with self._lock:
      log = self.logs.get(key)
      if log is None or log.kv.shape[1:] != tuple(cache.k.shape):
        log = self.logs[key] = HostKVLog.like(cache, layer_base=layer_base)
      log.reset()
      self._acked.pop(key, None)
      return log

  def ack(self, key, mb_id: int, step: int) -> None:
    with self._lock:
      prev = self._acked.get(key)
      if prev is None or prev[0] != mb_id or prev[1] < step:
        self._acked[key] = (mb_id, step)

  def acked_step(self, key, mb_id: int) -> int | None:
    with self._lock:
      got = self._acked.get(key)
      return got[1] if got is not None and got[0] == mb_id else None


class Replicator:
  """Streams every stage's new KV entries to its successor's `ReplicaStore` (see module doc)."""

  def __init__(self, workers_of, num_threads: int = 1):
    self._workers_of = workers_of          # () -> the engine's current list of workers
    self.streamer = Streamer(num_threads=num_threads)

  def attach(self, worker) -> None:
    worker.replica_store = ReplicaStore()
    worker.after_step.append(self.after_step)

  def successor(self, s: int):
    workers = self._workers_of()
    return workers[(s + 1) % len(workers)]

  def after_step(self, worker, msg) -> None:
    if not worker.alive:  # a killed worker finishing its last step: a crash streams nothing
      return
    s, slot = worker.index, msg.slot
    worker.slot_step[slot] = (msg.mb_id, msg.step)
    target = self.successor(s)
    store = target.replica_store
    if store is None:   # the successor is dead: nothing to replicate into until it is replaced
      return
    cache = worker.caches[slot]
    key, base = (s, slot), worker.program.start
    on_done = lambda _t, k=key, m=msg.mb_id, st=msg.step: store.ack(k, m, st)  # noqa: E731
    if msg.kind == "prefill":
      log = store.fresh_log(key, cache, base)
      self.streamer.stream_tokens(cache, 0, max(msg.tokens, 1), log, key=(target.index, key),
                                  layer_base=base, on_done=on_done)
    else:
      log = store.logs.get(key)
      if log is None:
        return
      self.streamer.stream_step(cache, jnp.asarray(msg.positions, jnp.int32), log,
                                key=(target.index, key), layer_base=base, on_done=on_done)

  def resync(self, source, target, slots: dict[int, int]) -> None:
    """Streams `source`'s whole caches of `slots` (slot -> mb_id) into `target`'s store, so the
    replicas a dead worker held exist again; acknowledged at the source's last step."""
    for slot, mb_id in slots.items():
      with source.step_lock:
        cache = source.caches[slot]
        key, base = (source.index, slot), source.program.start
        log = target.replica_store.fresh_log(key, cache, base)
        done = source.slot_step.get(slot)
        step = done[1] if done is not None and done[0] == mb_id else None
        ticket = self.streamer.stream_tokens(cache, 0, cache.max_len, log,
                                             key=(target.index, key), layer_base=base)
      ticket.wait()
      if step is not None:
        target.replica_store.ack(key, mb_id, step)

  def close(self) -> None:
    self.streamer.close(wait=True, raise_on_error=False)


def recover_from_replicas(engine, sched, lost, records, dead_stage: int, holder):
  """Restores stage `dead_stage`'s caches from the replicas in `holder`'s store (the successor,
  alive) into the engine's replacement worker and rewinds each microbatch to its resume step.

  Returns (resumed microbatches, microbatches to restart, tokens dropped to be redone).
  """
  new = engine.workers[dead_stage]
  resumed, fallback, dropped = [], [], 0
  for mb in lost:
    key = (dead_stage, mb.slot)
    acked = None if holder is None else holder.replica_store.acked_step(key, mb.mb_id)
    if acked is None or mb.step == 0:
      fallback.append(mb)
      continue
    r = min(acked, mb.step - 1)
    log = holder.replica_store.logs[key]
    restored = log.read()
    with new.step_lock:
      new.caches[mb.slot] = new.program.place_cache(restored)
      # The replica's log restarts from the restored cache, so later appends cannot overflow it.
      fresh = holder.replica_store.fresh_log(key, new.caches[mb.slot], new.program.start)
      engine.replicator.streamer.stream_tokens(
          new.caches[mb.slot], 0, restored.max_len, fresh, key=(holder.index, key),
          layer_base=new.program.start).wait()
    holder.replica_store.ack(key, mb.mb_id, r)
    for i, req in enumerate(mb.requests):
      rec = records[req.request_id]
      if rec.finish is not None:
        continue   # already returned to the client; its later cache entries are never read
      extra = len(mb.generated[i]) - (r + 1)
      if extra > 0:
        del mb.generated[i][r + 1:]
        del rec.tokens[r + 1:]
        del rec.token_times[r + 1:]
        rec.recomputed_tokens += extra
        dropped += extra
      mb.done[i] = False
      mb.positions[i] = len(req.prompt) + r
    mb.step = r + 1
    resumed.append(mb)
  return resumed, fallback, dropped
