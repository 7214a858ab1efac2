"""LocalRuntime: the pipeline's workers as threads over the devices of one process.

The threads and queues, and what each blocks on:

1. The engine thread (serving/engine.py) submits steps to stage 0's worker and blocks on the
   runtime's one `events` queue (with a timeout, so arrivals, failures and hangs are noticed).
2. Worker s's thread blocks on its inbox (FIFO: steps, cache loads, frees, replica exports,
   resyncs; `None` wakes it to stop). For a step it takes the microbatch's cache from its
   `CacheStore`, runs its program (the cache is donated and replaced), blocks until the step is
   done (so step times are real and, in paced mode, it can sleep to the modeled deadline), lets
   the replication tap and the snapshotter dispatch their copies, and hands the output on through
   the runtime: into worker s+1's inbox (the *receiver* places it on its own devices), or, on the
   last stage, a `StepResult` into `events`. It emits a `Progress` event per step.
3. Inboxes are FIFO: a stage serves steps in arrival order, which is what makes a prompt step
   delay the token steps queued behind it (the pipeline bubbles DéjàVu attacks), and what orders
   a `free` after the microbatch's last step.
4. Each worker has a heartbeat thread that puts a `Heartbeat` into `events` every `heartbeat_s`
   while the worker lives, busy or not (a long step or compile is not a failure).
5. With replication, each worker's `ReplicationTap` has one streamer thread: it copies the step's
   KV to host and calls the runtime's channel to the successor, which writes the successor's
   `ReplicaStore` (its own lock) and puts an `Ack` into `events`. With snapshots, each worker's
   `Snapshotter` has one thread writing orbax checkpoints.
6. `set_epoch` is out of band (an attribute the worker thread reads before each step): queued
   steps of microbatches lost in a failure are dropped rather than run.
7. `kill` is a crash: the worker's threads stop without a word (a step in progress reports
   nothing), its params, caches and replicas are dropped, and the controller notices the silence.
   `replace` starts a new worker for the stage with fresh threads and empty state.

8. With microbatch swapping (`LocalRuntime(swapping=True)`), the worker's `CacheStore` uses the
   `runtime/swapping.py` policy, which adds two threads per worker: a swap-out streamer (each step's
   written KV into the microbatch's host log) and a prefetch thread (host log -> the free device
   buffer). Before a step the worker thread waits for the microbatch's swap-in (`get`), then
   names the microbatch it expects next: the first decode `Step` queued in its own inbox (peeked
   under the queue's lock, nothing is taken out), else the one it stepped least recently (the
   stage's round-robin order); the policy prefetches it while the step computes. After the step
   the worker commits the step's delta (swap-out) and hands the same gathered delta to the
   replication tap. The prefetch thread waits only for that microbatch's last swap-out.
   In paced mode the worker also keeps the modeled swap link's clock, as the simulator does: a
   swap-in starts when the previous step here started, the microbatch's last swap-out landed and
   the link is free, and the step starts no earlier than it ends.

Any exception in a step becomes a `StepError` naming the stage: nothing is swallowed.

Why one module of this size: a worker's step, its paced clock, its swapping hand-offs and its
inbox messages run on the one worker thread walked through above; split apart, the order of
what that thread does (and what each other thread may touch) would no longer read in one place.

Why one module over 400 lines: the worker thread, its message handlers and the runtime that
spawns, links and replaces workers share one walk through the threads and queues (above).
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.runtime import snapshot as snapshot_lib
from dejavu_jax.runtime.replication import ReplicaStore, ReplicationTap, ReplicaWrite
from dejavu_jax.kv.cache import KVCache
from dejavu_jax.kv.store import AllOnDevice, CacheStore, device_bytes
from dejavu_jax.runtime.swapping import Swapping
from dejavu_jax.runtime.api import (Ack, CacheLoaded, CacheProbe, Heartbeat, Progress,
                                    ReplicaSource, SnapshotSaved, SnapshotSource, Step, StepError,
                                    StepResult, WorkerOptions, WorkerStats, cache_digests,
                                    recovery_lines, ring_holder)

# (stage_index, kind, layers, batch, tokens) -> modeled seconds of the step.
PaceFn = Callable[[int, str, int, int, int], float]


class PeerDead(ConnectionError):
  """The worker a message was sent to is dead (a crash, or not yet replaced)."""


@dataclasses.dataclass
class _Load:
  mb_id: int
  step: int
  cache: Any          # host KVCache (numpy) to place here
  epoch: int


@dataclasses.dataclass
class _Free:
  mb_id: int


@dataclasses.dataclass
class _Export:
  stage: int
  mb_id: int
  step: int
  to: int
  epoch: int


@dataclasses.dataclass
class _Restore:
  mb_id: int
  source: SnapshotSource
  epoch: int


class _Resync:
  pass


class LocalWorker:
  """One stage on a thread (see module doc). Talk to it only through the `Worker` methods."""

  _ids = itertools.count()

  def __init__(self, runtime: "LocalRuntime", program, params, options: WorkerOptions,
               worker_id: int | None = None):
    self.stage = program.index
    # A process runtime hosts one worker per process: it hands out the ids (unique per pipeline).
    self.worker_id = next(LocalWorker._ids) if worker_id is None else worker_id
    self._rt = runtime
    self._program = program
    self._params = program.place_params(params)
    new_cache = lambda: program.new_cache(runtime.microbatch_size, runtime.max_len)  # noqa: E731
    self._store = CacheStore(
        Swapping(new_cache, program.place_cache,
                 staging_limit_bytes=_staging_headroom(runtime, new_cache))
        if runtime.swapping else AllOnDevice(new_cache, runtime.depth))
    self._inbox: queue.Queue = queue.Queue()
    self._epoch = 0
    self._last_step: dict[int, int] = {}       # mb_id -> last step run here
    self.replicas = ReplicaStore() if options.replicate else None
    self._probe_on = options.cache_probe
    self._tap = (ReplicationTap(self.stage, program.start, runtime.channel_to_successor(self))
                 if options.replicate else None)
    self._snap = (snapshot_lib.Snapshotter(options.snapshot_dir, self.stage, self.worker_id,
                                           options.snapshot_every, self._snapshot_saved)
                  if options.snapshot_dir else None)
    self._restored: tuple[int, dict] | None = None   # (snapshot id, its caches), while loading
    self._free_at = 0.0          # paced mode: when this stage's previous step ended (modeled)
    self._started_at = 0.0       # paced swapping: when this stage's previous step started
    self._swap_free_at = 0.0     # paced swapping: when the modeled swap link is free again
    self._swapped_out_at: dict[int, float] = {}   # mb_id -> modeled end of its last swap-out
    self._mb_rows: dict[int, int] = {}            # mb_id -> rows of its prefill (swap sizes)
    self._finished: set[int] = set()              # ran its final step here: not prefetched
    self._steps_done = 0
    self._busy_s = 0.0
    self._overruns = 0
    self._armed: tuple[int, str, float] | None = None   # (steps left, kind, stall_s)
    self.died_at: float | None = None
    self._stall_until = 0.0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name=f"stage-{self.stage}", daemon=True)
    self._beat = threading.Thread(target=self._heartbeat, name=f"beat-{self.stage}",
                                  daemon=True)
    # Test hooks run after a step on the worker thread: (stage, step) -> None.
    self.after_step: list[Callable[[int, Step], None]] = []

  # ---- the Worker interface ----
  def submit(self, step: Step) -> None:
    self._inbox.put(step)

  def set_epoch(self, epoch: int) -> None:
    self._epoch = epoch

  def load_cache(self, mb_id: int, source, epoch: int) -> None:
    if isinstance(source, ReplicaSource):
      self._rt.worker(source.holder).export_replica(self.stage, mb_id, source.step, self.stage,
                                                    epoch)
    elif isinstance(source, SnapshotSource):
      self._inbox.put(_Restore(mb_id, source, epoch))
    else:
      raise TypeError(f"unknown cache source {source!r}")

  def export_replica(self, stage: int, mb_id: int, step: int, to: int, epoch: int) -> None:
    self._inbox.put(_Export(stage, mb_id, step, to, epoch))

  def free(self, mb_id: int) -> None:
    self._inbox.put(_Free(mb_id))

  def resync(self) -> None:
    self._inbox.put(_Resync())

  def reserve_slot(self, mb_id: int) -> bool:
    raise NotImplementedError(f"stage {self.stage}'s worker has no host slots: prompt slots "
                              "belong to the token workers of a disaggregated deployment")

  def load_prompt(self, mb_id: int, epoch: int, start_at: float = 0.0,
                  load_s: float = 0.0) -> None:
    raise NotImplementedError(f"stage {self.stage}'s worker has no host slots: prompt loads "
                              "belong to the token workers of a disaggregated deployment")

  def stats(self) -> WorkerStats:
    held = self._params
    swap = getattr(self._store.policy, "stats", None)   # the swapping policy's counters
    return WorkerStats(
        stage=self.stage, worker_id=self.worker_id, alive=self.alive,
        steps_done=self._steps_done, busy_s=self._busy_s, overruns=self._overruns,
        live_device_bytes=(device_bytes(held) if held is not None else 0) +
        self._store.live_device_bytes(),
        cache_mb_ids=self._store.mb_ids(), inbox=self._inbox.qsize(),
        kv_device_bytes=self._store.live_device_bytes(),
        kv_peak_device_bytes=self._store.peak_device_bytes(),
        snapshot_errors=self._snap.errors if self._snap is not None else 0,
        swap=swap() if swap else {})

  @property
  def swap_events(self) -> list:
    """The swapping policy's event log (tests): (kind, mb_id); [] without swapping."""
    return list(getattr(self._store.policy, "events", []))

  # ---- failure injection (the runtime's) ----
  def arm(self, after_steps: int, kind: str, stall_s: float = 0.0) -> None:
    """Crash (or stall for `stall_s`) right after `after_steps` more steps compute, before the
    last one's output is handed on."""
    self._armed = (after_steps, kind, stall_s)

  def stall(self, seconds: float) -> None:
    """Stop making progress for `seconds` while living (heartbeats go on)."""
    self._stall_until = time.monotonic() + seconds

  # ---- life cycle (the runtime's) ----
  def start(self) -> "LocalWorker":
    self._thread.start()
    self._beat.start()
    return self

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and not self._stop.is_set()

  def kill(self) -> None:
    """A crash: the threads stop without a word; params, caches and replicas are lost."""
    self.died_at = time.perf_counter()   # for the report only: nobody is told
    self._stop.set()
    self._inbox.put(None)
    self.replicas = None
    if self._tap is not None:
      self._tap.close()
    if self._snap is not None:
      self._snap.crash()
    self._store.close()

  def stop(self, timeout: float = 10.0) -> None:
    self._stop.set()
    self._inbox.put(None)
    if self._thread.is_alive() and threading.current_thread() is not self._thread:
      self._thread.join(timeout)
    if self._tap is not None:
      self._tap.close()
    if self._snap is not None:
      self._snap.close()
    self._store.close()

  def receive_replica(self, write: ReplicaWrite) -> int:
    """The runtime's channel lands a predecessor's transfer here (on the sender's streamer
    thread); acknowledged on the event channel once written."""
    store = self.replicas
    if store is None or not self.alive:
      raise PeerDead(f"stage {self.stage} is dead")
    step = store.write(write)
    self._rt.events.put(Ack(self.stage, write.stage, write.mb_id, step, self.worker_id))
    return step

  # ---- threads ----
  def _heartbeat(self) -> None:
    while not self._stop.wait(self._rt.heartbeat_s):
      self._rt.events.put(Heartbeat(self.stage, self.worker_id, time.monotonic()))

  def _loop(self) -> None:
    while not self._stop.is_set():
      msg = self._inbox.get()
      if msg is None or self._stop.is_set():
        break
      while time.monotonic() < self._stall_until and not self._stop.is_set():
        time.sleep(min(0.01, max(0.0, self._stall_until - time.monotonic())))
      try:
        self._handle(msg)
      except BaseException as e:  # pylint: disable=broad-except
        if self._stop.is_set():   # a killed worker reports nothing, as a crashed one would
          break
        if isinstance(msg, Step):
          self._rt.events.put(StepError(self.stage, msg.mb_id, e, msg.epoch))
        elif isinstance(msg, (_Load, _Restore)):
          self._rt.events.put(CacheLoaded(self.stage, msg.mb_id, getattr(msg, "step", -1),
                                          f"{type(e).__name__}: {e}"))
        else:
          self._rt.events.put(StepError(self.stage, getattr(msg, "mb_id", -1), e, self._epoch))

  def _handle(self, msg) -> None:
    if isinstance(msg, Step):
      if msg.epoch >= self._epoch:
        self._step(msg)
    elif isinstance(msg, _Free):
      self._free(msg.mb_id)
    elif isinstance(msg, _Export):
      self._export(msg)
    elif isinstance(msg, _Load):
      self._install(msg.mb_id, msg.step, msg.cache, "replica")
    elif isinstance(msg, _Restore):
      src = msg.source
      if self._restored is None or self._restored[0] != (src.directory, src.snapshot_id):
        self._restored = ((src.directory, src.snapshot_id), snapshot_lib.restore(src.directory, src.snapshot_id))
      cache, step = self._restored[1][msg.mb_id]
      self._install(msg.mb_id, step, cache, "snapshot")
    elif isinstance(msg, _Resync):
      if self._tap is not None:
        caches = self._store.caches_for_snapshot()   # host copies when swapping: no swap-ins
        for mb, cache in caches.items():
          if mb in self._last_step:
            self._tap.send_block(mb, self._last_step[mb], cache)

  def _free(self, mb_id: int) -> None:
    """Everything this worker keeps for `mb_id` goes (idempotent: a prefill's `Step.frees` and
    the engine's `free` both come here)."""
    self._store.release(mb_id)
    self._last_step.pop(mb_id, None)
    if self._tap is not None:
      self._tap.forget(mb_id)
    if self.replicas is not None:
      self.replicas.drop(mb_id)
    self._swapped_out_at.pop(mb_id, None)
    self._mb_rows.pop(mb_id, None)
    self._finished.discard(mb_id)
    self._on_free(mb_id)

  def _on_free(self, mb_id: int) -> None:
    """A subclass's hook on the worker thread when a microbatch leaves (a token worker frees its
    host slot: runtime/disagg.py)."""

  def _after_compute(self, msg: Step, cache) -> None:
    """A subclass's hook on the worker thread after a step computed, before its output is handed
    on (a prompt worker streams the step's KV from here: runtime/disagg.py)."""

  def _prefill_fn(self, msg: Step):
    """The prefill `msg` runs (a subclass's hook: a prompt worker's layer-wise prefill)."""
    del msg
    return self._program.prefill

  def _not_before(self, msg: Step) -> float:
    """Paced mode: a subclass's earliest modeled start of `msg` here beyond its input and this
    stage being ready (a token worker's modeled host-to-device load of a prompt cache)."""
    del msg
    return 0.0

  def _export(self, msg: _Export) -> None:
    try:
      if self.replicas is None:
        raise ValueError(f"stage {self.stage} holds no replicas")
      kv, lengths = self.replicas.read(msg.stage, msg.mb_id, msg.step)
      cache = KVCache(k=kv[0], v=kv[1], lengths=lengths)
    except (KeyError, ValueError) as e:
      self._rt.events.put(CacheLoaded(msg.stage, msg.mb_id, msg.step,
                                      f"replica on stage {self.stage}: {e}"))
      return
    try:
      self._rt.send(msg.to, _Load(msg.mb_id, msg.step, cache, msg.epoch))
    except PeerDead as e:
      self._rt.events.put(CacheLoaded(msg.stage, msg.mb_id, msg.step, str(e)))

  def _install(self, mb_id: int, step: int, host_cache, point: str) -> None:
    cache = self._program.place_cache(host_cache)
    self._store.install(mb_id, cache)
    self._last_step[mb_id] = step
    self._probe(point, mb_id, step, cache)
    if self._tap is not None:   # the successor's replica restarts from the restored cache
      self._tap.send_block(mb_id, step, cache)
    self._rt.events.put(CacheLoaded(self.stage, mb_id, step))

  def _probe(self, point: str, mb_id: int, step: int, cache) -> None:
    """The cache oracle's digest of the cache this worker holds for `mb_id` (api.CacheProbe),
    on the worker thread, before anything else may touch the buffer."""
    if self._probe_on:
      self._rt.events.put(CacheProbe(self.stage, mb_id, step, point, cache_digests(cache)))

  def _snapshot_saved(self, path: str, sid: int, steps: dict) -> None:
    if self.alive:
      self._rt.events.put(SnapshotSaved(self.stage, path, sid, steps))

  def _next_mb(self, current: int) -> int | None:
    """The microbatch this worker expects to step next (module doc, item 8)."""
    with self._inbox.mutex:
      for m in self._inbox.queue:
        if isinstance(m, Step) and m.kind == "decode" and m.epoch >= self._epoch and \
            m.mb_id != current:
          return m.mb_id
    return self._store.predict_next(current, exclude=self._finished)

  def _step(self, msg: Step) -> None:
    t0 = time.perf_counter()
    program, store = self._program, self._store
    swapped_in = False
    for gone in msg.frees:
      self._free(gone)
    if msg.kind == "prefill":
      cache = store.for_prefill(msg.mb_id)
      fn = self._prefill_fn(msg)
      self._mb_rows[msg.mb_id] = msg.batch
    else:
      cache = store.get(msg.mb_id)
      swapped_in = getattr(store.policy, "last_get_swapped", False)
      if swapped_in:
        self._probe("swap_in", msg.mb_id, msg.step - 1, cache)
      fn = program.decode
    if store.swapping:
      if msg.final:
        self._finished.add(msg.mb_id)
      else:   # a recovery may rewind a microbatch that looked finished
        self._finished.discard(msg.mb_id)
      store.prefetch(self._next_mb(msg.mb_id), msg.mb_id)
    cache, out = fn(self._params, cache, program.to_stage(msg.x), msg.positions)
    store.put(msg.mb_id, cache)
    jax.block_until_ready(out)
    if self._armed is not None:
      left, kind, stall_s = self._armed
      if left <= 1:
        self._armed = None
        if kind == "crash":
          self.kill()
        else:
          self.stall(stall_s)
      else:
        self._armed = (left - 1, kind, stall_s)
    if self._stop.is_set():
      return   # killed during the step: a crash streams and reports nothing
    self._last_step[msg.mb_id] = msg.step
    self._probe("step", msg.mb_id, msg.step, cache)
    self._after_compute(msg, cache)
    delta = store.commit(msg.mb_id, msg.kind, msg.positions, cache)   # swap-out (if swapping)
    if self._tap is not None:
      self._tap.after_step(msg.mb_id, msg.step, cache, msg.positions, msg.kind, msg.tokens,
                           delta=delta)
    if self._snap is not None:
      self._snap.after_step(lambda: {mb: (c, self._last_step[mb])
                                     for mb, c in store.caches_for_snapshot().items()
                                     if mb in self._last_step})
    for hook in self.after_step:
      hook(self.stage, msg)
    end = time.perf_counter()
    pace = self._rt.pace
    if pace is not None:
      # A modeled step starts when both its input and this stage are ready, so thread hand-offs
      # and host bookkeeping shorter than the modeled time do not stretch the schedule.
      start = max(msg.ready_at, self._free_at, self._not_before(msg))
      rows = self._mb_rows.get(msg.mb_id, msg.batch)
      if store.swapping and swapped_in:
        # The simulator's swap link (sim/pipeline.py): the prefetch starts when the previous step
        # here started, the microbatch's last swap-out landed and the link is free.
        begin = max(self._started_at, self._swapped_out_at.get(msg.mb_id, 0.0),
                    self._swap_free_at)
        self._swap_free_at = begin + pace(self.stage, "swap_in", program.num_layers, rows,
                                          msg.tokens)
        start = max(start, self._swap_free_at)
      self._started_at = start
      end = start + pace(self.stage, msg.kind, program.num_layers, msg.batch, msg.tokens)
      if store.swapping:
        self._swapped_out_at[msg.mb_id] = end + pace(self.stage, "swap_out",
                                                     program.num_layers, rows, msg.tokens)
      late = time.perf_counter()
      if late > end:  # the real step outlasted the model: it ends when it really ended
        self._overruns += 1
        end = late
      _sleep_until(end)
      self._free_at = end
    self._busy_s += time.perf_counter() - t0
    self._steps_done += 1
    self._rt.events.put(Progress(self.stage, msg.mb_id, msg.step, msg.epoch))
    if program.last:
      tokens = _argmax_tokens(out) if msg.greedy else None
      self._rt.events.put(StepResult(self.stage, msg.mb_id, msg.step,
                                     None if msg.greedy else out, end, msg.epoch, tokens=tokens))
    else:
      self._rt.forward(self.stage, dataclasses.replace(msg, x=out, ready_at=end))


@jax.jit
def _argmax_tokens(logits):
  # jnp.argmax's first-max tie rule is numpy's, which the engine's host sampling uses.
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _staging_headroom(runtime, new_cache) -> int | None:
  """Device bytes a swap-in's prefix copy may take beside a swapping worker's two buffers: what
  the KV budget leaves (None: no budget, no limit). A prefix that does not fit is swapped in
  whole, straight into the evicted buffer, so the budget is never exceeded."""
  budget = getattr(runtime, "kv_budget_bytes", None)
  if budget is None:
    return None
  shapes = jax.eval_shape(new_cache)
  buffer = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(shapes))
  return max(0, budget - 2 * buffer)


class LocalRuntime:
  """The workers of one pipeline as threads of this process (see module doc).

  Args:
    programs: one stage program per stage (`pipeline/stage.StageProgram`, or the fake one).
    params_for: (stage) -> the params a (new) worker of that stage places (host or checkpoint).
    depth: microbatches in flight (each worker's device cache buffers).
    microbatch_size, max_len: the cache shape per microbatch.
    pace: paced mode's step durations, or None.
    heartbeat_s: heartbeat period.
    swapping: each worker keeps every cache in host logs and two device buffers
      (runtime/swapping.py) instead of `depth` device buffers.
  """

  def __init__(self, programs, params_for: Callable[[int], Any], depth: int,
               microbatch_size: int, max_len: int, pace: PaceFn | None = None,
               heartbeat_s: float = 1.0, swapping: bool = False,
               kv_budget_bytes: int | None = None):
    if heartbeat_s <= 0:
      raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")
    self.programs, self.params_for = list(programs), params_for
    self.num_stages = len(self.programs)
    self.depth, self.microbatch_size, self.max_len = depth, microbatch_size, max_len
    self.pace, self.heartbeat_s = pace, heartbeat_s
    self.swapping, self.kv_budget_bytes = swapping, kv_budget_bytes
    self.events: queue.Queue = queue.Queue()
    self.options = WorkerOptions()
    self.worker_class = LocalWorker   # a subclass may run other workers (disaggregation)
    self._workers: list[LocalWorker] = []
    self._lock = threading.Lock()
    self._link_faults: dict[int, Callable[[ReplicaWrite], bool]] = {}

  def start(self, options: WorkerOptions) -> None:
    self.options = options
    self._workers = [self._spawn(s) for s in range(self.num_stages)]

  def _spawn(self, s: int) -> LocalWorker:
    return self.worker_class(self, self.programs[s], self.params_for(s), self.options).start()

  def worker(self, stage: int) -> LocalWorker:
    return self._workers[stage]

  def alive(self, stage: int) -> bool:
    return self._workers[stage].alive

  def vouches_alive(self, stage: int) -> bool:
    """A thread of this process that has not stopped lives: its silence is starvation."""
    return self._workers[stage].alive

  def notified_dead(self) -> list[int]:
    """None: a crashed thread says nothing; heartbeat silence detects it (as in the paper)."""
    return []

  def counters(self) -> dict:
    return {"dropped_events": 0}   # events travel in-process: none is ever lost

  def report(self, result=None) -> list[str]:
    """Each recovery's timeline (api.recovery_lines), for experiment logs."""
    return recovery_lines(result)

  def kill(self, stage: int) -> None:
    self._workers[stage].kill()

  def stall(self, stage: int, seconds: float) -> None:
    self._workers[stage].stall(seconds)

  def died_at(self, stage: int) -> float | None:
    """perf_counter time the stage's current worker crashed, if it did (reports only)."""
    return self._workers[stage].died_at

  def disarm(self) -> None:
    """Cancels every injected failure that has not fired (the end of a run)."""
    for w in self._workers:
      w._armed = None  # pylint: disable=protected-access

  def arm(self, stage: int, after_steps: int, kind: str = "crash", stall_s: float = 0.0) -> None:
    """Stage `stage`'s current worker fails right after `after_steps` more steps."""
    self._workers[stage].arm(after_steps, kind, stall_s)

  def replace(self, stage: int) -> LocalWorker:
    """A fresh worker for `stage` (empty caches and replicas); the old one is stopped."""
    self._workers[stage].stop(timeout=0)
    w = self._spawn(stage)
    with self._lock:
      self._workers[stage] = w
    return w

  def close(self) -> None:
    for w in self._workers:
      w.stop()

  # ---- channels ----
  def forward(self, stage: int, step: Step) -> None:
    """Activations of `stage` to the next stage (host-side hand-off; the receiver places them)."""
    self._workers[stage + 1].submit(step)

  def send(self, stage: int, msg) -> None:
    w = self._workers[stage]
    if not w.alive:
      raise PeerDead(f"stage {stage} is dead")
    w._inbox.put(msg)  # pylint: disable=protected-access

  def channel_to_successor(self, sender: LocalWorker) -> Callable[[ReplicaWrite], int]:
    def send(write: ReplicaWrite) -> int:
      fault = self._link_faults.get(write.stage)
      if fault is not None and fault(write):
        raise ConnectionError(f"injected transport failure: stage {write.stage} -> successor, "
                              f"microbatch {write.mb_id} step {write.step}")
      with self._lock:
        target = self._workers[ring_holder(sender.stage, self.num_stages)]
      return target.receive_replica(write)
    return send

  def inject_link_fault(self, stage: int, fails: Callable[[ReplicaWrite], bool] | None) -> None:
    """Makes stage `stage`'s replication transfers fail where `fails(write)` (None: heal)."""
    if fails is None:
      self._link_faults.pop(stage, None)
    else:
      self._link_faults[stage] = fails


def _sleep_until(deadline: float) -> None:
  # time.sleep alone overshoots by up to a scheduler tick; finish the last stretch spinning.
  while True:
    left = deadline - time.perf_counter()
    if left <= 0:
      return
    time.sleep(left - 0.0005 if left > 0.002 else 0)

