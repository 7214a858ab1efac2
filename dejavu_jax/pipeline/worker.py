"""StageWorker: one pipeline stage as a thread that owns its params and its microbatches' caches.

The threads and queues of a local pipeline, and why each blocks:

1. The engine thread (serving/engine.py) forms microbatches and puts a `StepMsg` (a prefill of a
   new microbatch, or the next decode step of one in flight) into stage 0's inbox. It then blocks
   on the shared `results` queue, with a timeout so arrivals and hangs are noticed.
2. Worker s blocks on its inbox (a `None` message wakes it to stop). For each message it runs its
   `StageProgram` on the cache of the message's slot (donated and replaced), blocks until the step
   is done (so step times are real and, in paced mode, it can sleep to the modeled deadline), then
   hands the output on:
   `device_put` into the next stage's devices and into worker s+1's inbox, or, on the last stage,
   the logits into `results`.
3. Inboxes are FIFO: a stage serves steps in arrival order, which is what makes a prompt step
   delay the token steps queued behind it (the pipeline bubbles DéjàVu attacks).
4. Any exception in a step is put into `results` as a `StepError` naming the stage: the engine
   raises it; nothing is swallowed. `stop()` ends the thread; a stopped worker is dead for good
   (its caches are dropped) and a new `StageWorker` for the same stage replaces it.
5. A heartbeat thread per worker stamps `last_heartbeat` every `heartbeat_s` while the worker is
   alive, busy or not (a long step or compile is not a failure); `kill()` stops both threads
   without warning, as a crash would, and the controller notices the silence.
6. After a recovery the engine raises the epoch: messages of microbatches that were lost, still
   queued in surviving workers' inboxes, are dropped instead of run (a reused slot must not be
   written by a step of the microbatch that held it before).

Nothing here assumes threads beyond `start`/`stop`/`kill`/`put`: a process-based runtime can
offer the same calls.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from dejavu_jax.kv.cache import KVCache


@dataclasses.dataclass
class StepMsg:
  """One step of one microbatch travelling through the stages."""
  kind: str                   # "prefill" | "decode"
  slot: int                   # microbatch slot, [0, D)
  mb_id: int                  # unique microbatch id (a slot is reused by later microbatches)
  step: int                   # 0 for the prefill, then 1, 2, ... for decode steps
  x: Any                      # tokens [B, T] / [B], or hidden states from the previous stage
  positions: np.ndarray       # [B, T] (prefill) or [B] (decode), -1 = do not write
  batch: int                  # rows in use (for the cost model)
  tokens: int                 # prompt length (prefill) or tokens already cached (decode)
  ready_at: float = 0.0       # perf_counter time the step could start here (paced mode)
  epoch: int = 0              # recovery epoch; steps of an older epoch are dropped


@dataclasses.dataclass
class StepResult:
  mb_id: int
  slot: int
  step: int
  logits: Any                 # [B, V] on the last stage's devices
  done_at: float
  epoch: int


@dataclasses.dataclass
class StepError:
  stage: int
  mb_id: int
  error: BaseException
  epoch: int


# (stage_index, kind, layers, batch, tokens) -> modeled seconds of the step.
PaceFn = Callable[[int, str, int, int, int], float]


class StageWorker:
  """Runs stage `program.index` on a thread; see the module docstring."""

  def __init__(self, program, params, num_slots: int, microbatch_size: int, max_len: int,
               results: queue.Queue, pace: PaceFn | None = None, heartbeat_s: float = 0.1):
    self.program = program
    self.index = program.index
    self.params = program.place_params(params)
    self.caches: dict[int, KVCache] = {
        slot: program.new_cache(microbatch_size, max_len) for slot in range(num_slots)}
    self.inbox: queue.Queue = queue.Queue()
    self.results = results
    self.next: "StageWorker | None" = None
    self.pace = pace
    self.heartbeat_s = heartbeat_s
    self.last_heartbeat = time.monotonic()
    self.steps_done = 0
    self.busy_s = 0.0
    self.free_at = 0.0          # paced mode: when this stage's previous step ended (modeled)
    self.min_epoch = 0
    # Held for the whole of a step: whoever reads `caches` from another thread (replication
    # recovery) takes it, so a cache is never read while a step donates it.
    self.step_lock = threading.Lock()
    self.slot_step: dict[int, tuple[int, int]] = {}   # slot -> (mb_id, step) last run here
    self.replica_store = None   # replicas of the previous stage, in this worker's host memory
    self.overruns = 0           # paced steps whose real compute outlasted the modeled time
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name=f"stage-{self.index}", daemon=True)
    self._beat = threading.Thread(target=self._heartbeat, name=f"beat-{self.index}", daemon=True)
    # Hooks run after a step on the worker thread: (worker, msg) -> None (replication uses this).
    self.after_step: list[Callable[["StageWorker", StepMsg], None]] = []

  def start(self) -> "StageWorker":
    self._thread.start()
    self._beat.start()
    return self

  def kill(self) -> None:
    """A crash: the worker stops at once and its device state (params, KV caches) is lost."""
    self._stop.set()
    self.inbox.put(None)
    self.caches.clear()
    self.params = None
    self.replica_store = None

  def put(self, msg: StepMsg) -> None:
    self.inbox.put(msg)

  def stop(self, timeout: float = 10.0) -> None:
    self._stop.set()
    self.inbox.put(None)
    if self._thread.is_alive() and threading.current_thread() is not self._thread:
      self._thread.join(timeout)

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and not self._stop.is_set()

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      self.last_heartbeat = time.monotonic()

  def _loop(self) -> None:
    while not self._stop.is_set():
      msg = self.inbox.get()
      if msg is None or self._stop.is_set():
        break
      if msg.epoch < self.min_epoch:
        continue
      try:
        with self.step_lock:
          self._step(msg)
      except BaseException as e:  # pylint: disable=broad-except
        if not self._stop.is_set():  # a killed worker reports nothing, as a crashed one would
          self.results.put(StepError(self.index, msg.mb_id, e, msg.epoch))

  def _step(self, msg: StepMsg) -> None:
    t0 = time.perf_counter()
    program = self.program
    fn = program.prefill if msg.kind == "prefill" else program.decode
    cache, out = fn(self.params, self.caches[msg.slot], msg.x, msg.positions)
    self.caches[msg.slot] = cache
    jax.block_until_ready(out)
    for hook in self.after_step:
      hook(self, msg)
    end = time.perf_counter()
    if self.pace is not None:
      # A modeled step starts when both its input and this stage are ready, so thread hand-offs
      # and host bookkeeping shorter than the modeled time do not stretch the schedule.
      start = max(msg.ready_at, self.free_at)
      end = start + self.pace(self.index, msg.kind, program.num_layers, msg.batch, msg.tokens)
      late = time.perf_counter()
      if late > end:  # the real step outlasted the model: it ends when it really ended
        self.overruns += 1
        end = late
      _sleep_until(end)
      self.free_at = end
    self.busy_s += time.perf_counter() - t0
    self.steps_done += 1
    if program.last:
      self.results.put(StepResult(msg.mb_id, msg.slot, msg.step, out, end, msg.epoch))
    else:
      nxt = self.next
      nxt.put(dataclasses.replace(msg, x=nxt.program.to_stage(out), ready_at=end))


def _sleep_until(deadline: float) -> None:
  # time.sleep alone overshoots by up to a scheduler tick; finish the last stretch spinning.
  while True:
    left = deadline - time.perf_counter()
    if left <= 0:
      return
    time.sleep(left - 0.0005 if left > 0.002 else 0)
