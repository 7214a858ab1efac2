"""Online mode of the engine: requests submitted while it runs, tokens streamed as they are sampled.

The engine has one loop (`PipelineEngine.run_loop`); what changes between replay and online mode
is where requests come from, a *source*:

  `ReplaySource`  `serve(requests)`: a workload known up front, each request arriving at its time,
                  the loop running in the caller's thread until everything is served;
  `OnlineLoop`    `engine.start()`: the same loop on a background thread, fed by
                  `engine.submit(prompt_ids, max_new_tokens)` from any thread, until `stop()`.

So scheduling, admission control (`max_pending`: a request arriving at a full queue is rejected
"queue full"), failure injection, detection, recovery and metrics are the replay mode's, line for
line. Online additions, all executed ON the loop thread (the scheduler is never touched by
another thread): cancellation (a queued request leaves the queue; a running row is marked done,
so its microbatch's slot frees when its in-flight step returns), `kill(stage)` (the injector's
crash, a real SIGKILL on the Ray runtime), and `call(fn)` (read the loop's state safely: counts,
summaries, metrics).

A `RequestHandle` yields the request's tokens as they are sampled. A recovery may rewind a
request (tokens after the restored step are generated again); a handle emits each position once,
so a stream never repeats or retracts a token. The regenerated tokens are the same ones under
greedy decoding (the engine's guarantee); a mismatch is counted (`divergences`) and logged.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import Callable, Sequence

from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.workload import Request

log = logging.getLogger("dejavu_jax.online")

FINAL = ("finished", "cancelled", "rejected", "error")


class ReplaySource:
  """The requests of a replayed workload, each arriving at its time (seconds since serving
  started): what `run_loop` admits in `serve`."""

  def __init__(self, requests: Sequence[Request]):
    self.requests, self.total, self._next = requests, len(requests), 0

  def more(self) -> bool:
    return self._next < len(self.requests)

  def arrived(self, now: float) -> list[Request]:
    out = []
    while self._next < len(self.requests) and self.requests[self._next].arrival <= now:
      out.append(self.requests[self._next])
      self._next += 1
    return out

  def wait(self, now: float) -> float:
    """How long the loop may wait for events before the next arrival is due."""
    if self._next >= len(self.requests):
      return 0.05
    return max(0.0, min(self.requests[self._next].arrival - now, 0.05))

  def idle_wait(self, now: float) -> None:
    time.sleep(self.wait(now))

  def service(self, engine, st) -> None:
    pass

  def admitted(self, req) -> None:
    pass

  def rejected(self, req, reason: str) -> None:
    pass


class _Wake:
  """Put on the runtime's event channel to end the loop's wait at once (the engine ignores it)."""


_WAKE = _Wake()


class RequestHandle:
  """One online request: iterate it for its tokens (blocking); `status` ends in one of
  "finished", "cancelled", "rejected", "error" (`reason` says why for the last three)."""

  def __init__(self, loop: "OnlineLoop | None", request_id: int, prompt_len: int,
               max_new_tokens: int):
    self._loop, self.request_id = loop, request_id
    self.prompt_len, self.max_new_tokens = prompt_len, max_new_tokens
    self.status, self.reason = "queued", None
    self.tokens: list[int] = []
    self.submitted_at = time.perf_counter()
    self.token_times: list[float] = []       # perf_counter when each token was handed out
    self._cv = threading.Condition()
    self._listeners: list[Callable] = []

  # ---- the client's side ----
  @property
  def done(self) -> bool:
    return self.status in FINAL

  def cancel(self) -> None:
    """Cancels the request (no-op once it ended); its slot frees as soon as the loop sees it."""
    if not self.done and self._loop is not None:
      self._loop._cancel(self)   # pylint: disable=protected-access

  def wait_admitted(self, timeout: float | None = None) -> str:
    """Waits until the request left the submission queue (admitted, or ended); its status."""
    with self._cv:
      self._cv.wait_for(lambda: self.status != "queued", timeout)
      return self.status

  def wait(self, timeout: float | None = None) -> str:
    """Waits for the end; the final status."""
    with self._cv:
      self._cv.wait_for(lambda: self.done, timeout)
      return self.status

  def __iter__(self):
    i = 0
    while True:
      with self._cv:
        self._cv.wait_for(lambda: len(self.tokens) > i or self.done)
        new, ended = self.tokens[i:], self.done
      yield from new
      i += len(new)
      if ended and i >= len(self.tokens):
        return

  def subscribe(self, fn: Callable[[str, object], None]) -> None:
    """Calls fn(kind, value) for what happened so far and then, from the loop thread, for each
    event: ("status", status) and ("tokens", [new ids]). fn must not block."""
    with self._cv:
      if self.tokens:
        fn("tokens", list(self.tokens))
      if self.status != "queued":
        fn("status", self.status)
      self._listeners.append(fn)

  # ---- the loop's side ----
  def _set(self, status: str, reason: str | None = None) -> None:
    with self._cv:
      if self.done:
        return
      self.status, self.reason = status, reason
      self._cv.notify_all()
      for fn in self._listeners:
        fn("status", status)

  def _emit(self, new: list[int]) -> None:
    with self._cv:
      now = time.perf_counter()
      self.tokens.extend(new)
      self.token_times.extend([now] * len(new))
      self._cv.notify_all()
      for fn in self._listeners:
        fn("tokens", list(new))


class OnlineLoop:
  """The engine's loop on a background thread, fed by `submit` (module doc). Built and started
  by `PipelineEngine.start()`; the engine serves nothing else until `stop()`."""

  def __init__(self, engine, failures: Sequence[FailureSpec] = ()):
    self.engine = engine
    self.total = 0
    self._lock = threading.Lock()
    self._inbox: collections.deque = collections.deque()
    self._cancels: collections.deque = collections.deque()
    self._calls: collections.deque = collections.deque()
    self._handles: dict[int, RequestHandle] = {}
    self._next_id = 0
    self._stopping = False
    self._wake_ev = threading.Event()
    self._seen_recoveries = 0
    self._kills: dict[int, float] = {}
    self.cancelled: set[int] = set()
    self.divergences = 0
    self.error: str | None = None
    self.result = None
    # Live figures for a metrics endpoint (written on the loop thread).
    self.counts = collections.Counter()
    self.ttft_s: list[float] = []
    self.tpot_s: list[float] = []
    self.tokens_out = 0
    self.token_log: collections.deque = collections.deque(maxlen=4096)   # (perf_counter, n)
    self.started_at = time.perf_counter()
    engine.prompt_path.check_failures(engine, failures)
    self.st = engine.begin_serve(failures, {})
    self.st.listener = self._on_microbatch
    self._thread = threading.Thread(target=self._run, name="dejavu-online", daemon=True)
    self._thread.start()

  @property
  def running(self) -> bool:
    return self._thread.is_alive() and self.error is None

  # ---- any thread ----
  def submit(self, prompt_ids: Sequence[int], max_new_tokens: int) -> RequestHandle:
    """Queues a request; its handle is "rejected" at once when the request is invalid (the
    reason names the field) or the loop is not running."""
    with self._lock:
      rid = self._next_id
      self._next_id += 1
      req = Request(rid, 0.0, prompt_ids, max_new_tokens)
      handle = RequestHandle(self, rid, len(prompt_ids) if hasattr(prompt_ids, "__len__") else 0,
                             max_new_tokens)
      reason = self.engine.validate(req)
      if reason is None and (self._stopping or not self.running):
        reason = f"request {rid}: the engine is not serving ({self.error or 'stopped'})"
      if reason is not None:
        self.counts["rejected_invalid" if "not serving" not in reason else "rejected_down"] += 1
        handle._set("rejected", reason)   # pylint: disable=protected-access
        return handle
      req = Request(rid, self.st.now(), tuple(int(t) for t in prompt_ids), int(max_new_tokens))
      self._handles[rid] = handle
      self._inbox.append(req)
      self.total += 1
    self._wake()
    return handle

  def call(self, fn: Callable, timeout: float | None = 30.0):
    """fn(engine, state) run on the loop thread between two steps of the loop; its result."""
    fut = concurrent.futures.Future()
    if threading.current_thread() is self._thread:
      return fn(self.engine, self.st)
    if not self._thread.is_alive():
      fut.set_result(fn(self.engine, self.st))
      return fut.result()
    self._calls.append((fn, fut))
    self._wake()
    return fut.result(timeout)

  def kill(self, stage: int) -> None:
    """Crashes `stage`'s worker now (the injector's crash: a thread on the local runtime, a
    SIGKILL of the actor process on Ray); the controller detects it and the strategy recovers."""
    def do(engine, st):
      spec = FailureSpec(time_s=st.now(), stage=int(stage))
      engine.prompt_path.check_failures(engine, [spec])
      log.warning("kill: stage %d killed at %.3f s (%s runtime)", stage, st.now(),
                  engine.serve_cfg.cluster.runtime)
      self._kills[int(stage)] = st.now()
      st.injector.fire(spec)
      self.counts["kills"] += 1
    self.call(do)

  def stop(self, drain: bool = True, timeout: float | None = None):
    """Stops accepting requests; with `drain` the ones admitted finish first, else they are
    cancelled. Returns the `ServeResult` of everything served online (cancelled requests
    left out of its records and summary)."""
    with self._lock:
      self._stopping = True
      pending = list(self._handles.values())
    if not drain:
      for h in pending:
        h.cancel()
    self._wake()
    self._thread.join(timeout)
    return self.result

  # ---- the loop's source protocol (loop thread) ----
  def more(self) -> bool:
    return not self._stopping or bool(self._inbox) or bool(self._cancels) or bool(self._calls)

  def arrived(self, now: float) -> list[Request]:
    out = []
    while self._inbox:
      req = self._inbox.popleft()
      h = self._handles.get(req.request_id)
      if h is None or h.done:   # cancelled while queued
        continue
      out.append(req)
    return out

  def wait(self, now: float) -> float:
    return 0.05

  def idle_wait(self, now: float) -> None:
    if self._wake_ev.wait(0.05):
      self._wake_ev.clear()
    self.st.last_progress = time.perf_counter()   # an idle engine is not a hung one

  def admitted(self, req) -> None:
    self.counts["admitted"] += 1
    self._handles[req.request_id]._set("running")   # pylint: disable=protected-access

  def rejected(self, req, reason: str) -> None:
    self.counts["rejected_queue_full"] += 1
    h = self._handles.pop(req.request_id)
    h._set("rejected", reason)   # pylint: disable=protected-access

  def service(self, engine, st) -> None:
    """Cancellations, calls and the log of recoveries, between two turns of the loop."""
    while self._cancels:
      self._do_cancel(st, self._cancels.popleft())
    while self._calls:
      fn, fut = self._calls.popleft()
      try:
        fut.set_result(fn(engine, st))
      except Exception as e:  # pylint: disable=broad-except
        fut.set_exception(e)
    while self._seen_recoveries < len(st.recoveries):
      ev = st.recoveries[self._seen_recoveries]
      self._seen_recoveries += 1
      self.counts["recoveries"] += 1
      for strategy, n in ev.handled_by.items():
        self.counts[f"recovered_by:{strategy}"] += n
      log.warning("detected: stage(s) %s dead at %.3f s (failed at %.3f s, %.3f s to detect)",
                  list(ev.stages), ev.detected_at, ev.failed_at, ev.detection_s)
      log.warning("resumed: at %.3f s (%.3f s after the failure), %s, %d tokens to redo "
                  "(recovery %s)", ev.recovered_at, ev.recovery_s,
                  ", ".join(f"{n} microbatch(es) by {k}" for k, n in ev.handled_by.items())
                  or "nothing in flight", ev.recomputed_tokens, ev.strategy)

  # ---- internals ----
  def _wake(self) -> None:
    self._wake_ev.set()                    # an idle loop waits here,
    self.engine.runtime.events.put(_WAKE)  # a busy one on the runtime's event channel

  def _cancel(self, handle: RequestHandle) -> None:
    self._cancels.append(handle.request_id)
    self._wake()

  def _do_cancel(self, st, rid: int) -> None:
    h = self._handles.pop(rid, None)
    if h is None or h.done:
      return
    self.cancelled.add(rid)
    self.counts["cancelled"] += 1
    state = st.sched.states.get(rid)
    if state is not None and not state.done:
      for r in list(st.sched.pending):
        if r.request_id == rid:
          st.sched.pending.remove(r)
      for mb in st.sched.in_flight.values():
        for i, r in enumerate(mb.requests):
          if r.request_id == rid:
            mb.done[i] = True   # its slot frees when the step in flight returns
      state.finish = st.now()
    h._set("cancelled", "cancelled by the client")   # pylint: disable=protected-access

  def _on_microbatch(self, mb) -> None:
    """After a step's tokens were recorded: each row's new tokens to its handle."""
    for state in mb.states:
      h = self._handles.get(state.request.request_id)
      if h is None:
        continue
      toks = state.tokens
      n = len(h.tokens)
      if len(toks) > n:
        if toks[:n] != h.tokens:
          self.divergences += 1
          log.error("request %d: tokens after a recovery differ from those already streamed",
                    h.request_id)
        self.tokens_out += len(toks) - n
        self.token_log.append((time.perf_counter(), len(toks) - n))
        h._emit(toks[n:])   # pylint: disable=protected-access
      if state.done:
        self._finished(h, state)

  def _finished(self, h: RequestHandle, state) -> None:
    self._handles.pop(h.request_id, None)
    self.counts["finished"] += 1
    if state.token_times:
      self.ttft_s.append(state.token_times[0] - state.request.arrival)
      if len(state.tokens) > 1:
        self.tpot_s.append((state.finish - state.token_times[0]) / (len(state.tokens) - 1))
    h._set("finished")   # pylint: disable=protected-access

  def _run(self) -> None:
    error, cause = self.engine.run_loop(self.st, self)
    self.error = error
    if error is not None:
      log.error("the online loop stopped: %s", error)
    for h in list(self._handles.values()):
      h._set("error", error or "the engine stopped")   # pylint: disable=protected-access
    self._handles.clear()
    while self._calls:
      fn, fut = self._calls.popleft()
      fut.set_exception(RuntimeError(f"the engine is not serving ({error or 'stopped'})"))
    self.result = self.engine.finish_serve(self.st, error, cause, raise_on_error=False,
                                           exclude=frozenset(self.cancelled))
    self.engine.online = None
