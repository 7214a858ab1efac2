"""The async streamer: background threads that finish KV transfers while the caller computes.

This module owns `Streamer`, `Ticket` and the streamer's errors. A transfer is a payload (a
`Packed` slice, usually just gathered on the device) and a `deliver` function that lands it
(writes it into a host KV log, copies it to another device's inbox, ...). The caller's thread
only dispatches; everything that blocks happens on a streamer thread.

How a transfer flows, and why each step blocks where it does:

1. `submit` (caller's thread). The payload's device->host copy is started (non-blocking
   `start_flush`); a payload that a later step will donate is copied first (`donated=True`), so
   the donation cannot recycle memory a streamer thread still reads. The slices that
   `stream_step` / `stream_tokens` gather are fresh buffers already, so they need no copy.
2. Backpressure (caller's thread). `submit` waits while the bytes queued but not yet delivered
   plus the new payload's exceed `max_bytes`, or `max_items` transfers are queued. Memory held by
   pending transfers is therefore bounded; a producer faster than the transport slows down instead
   of growing the queue. (One payload larger than the budget is admitted alone, so it cannot
   wait forever.)
3. Routing (caller's thread). The transfer gets the next sequence number of its key (by default
   (destination, microbatch)) and goes to the FIFO of worker thread hash(key) % num_threads. One
   key always maps to one thread, so transfers of a key are delivered in submission order even
   with several producers and several threads; different keys proceed in parallel.
4. Delivery (worker thread). The thread pops its FIFO, calls `deliver(payload)` (which blocks on
   the device copy and the host write, releasing the GIL for both), and completes the ticket
   with deliver's return value, or with its exception. A failure poisons its key: later
   transfers of the key fail with `StreamError` (the delta they carry would land after a hole)
   until `clear_error(key)`.
5. Completion (any thread). `Ticket.wait` returns the result or raises the transfer's error;
   `on_done` callbacks run on the worker thread (e.g. an acknowledgement to the controller).
6. Shutdown (caller's thread). `close(wait=True)` delivers everything queued, `close(wait=False)`
   cancels what has not started (each such ticket raises `StreamClosed`); either way it joins the
   threads and returns a `ShutdownReport` counting the completed transfers and naming the failed or
   cancelled, and raises `StreamError` for failures no waiter has seen, so none is swallowed.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from concurrent import futures
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp

from dejavu_jax.kv.cache import KVCache
from dejavu_jax.stream import packing as gather_lib
from dejavu_jax.stream import transport
from dejavu_jax.stream.hostlog import HostKVLog


class StreamError(RuntimeError):
  """A transfer failed (or an earlier transfer of its key did)."""


class StreamClosed(StreamError):
  """The streamer was closed before the transfer ran, or a submit came after close."""


class Ticket:
  """Completion of one transfer. `wait` returns deliver's result or raises its error."""

  def __init__(self, key: Hashable, seq: int, nbytes: int):
    self.key, self.seq, self.nbytes = key, seq, nbytes
    self._future = futures.Future()
    self.observed = False  # True once a waiter has seen the outcome

  def wait(self, timeout: float | None = None) -> Any:
    """Blocks until delivered; returns deliver's result, raises its error (or TimeoutError)."""
    try:
      result = self._future.result(timeout)
    except futures.TimeoutError:
      raise TimeoutError(f"transfer {self.key}#{self.seq} not done after {timeout} s") from None
    except BaseException:
      self.observed = True
      raise
    self.observed = True
    return result

  def done(self) -> bool:
    return self._future.done()

  def exception(self) -> BaseException | None:
    """The transfer's error once done (None when it succeeded); marks it observed."""
    if not self._future.done():
      return None
    self.observed = True
    return self._future.exception()

  def __repr__(self):
    state = "done" if self.done() else "pending"
    return f"Ticket({self.key!r}#{self.seq}, {self.nbytes} B, {state})"


@dataclasses.dataclass
class ShutdownReport:
  completed: int             # successful transfers are counted, not kept (a streamer may run for
                              # millions of steps: replication submits one per stage per step)
  failed: list[tuple[Ticket, BaseException]]
  cancelled: list[Ticket]


@dataclasses.dataclass
class _Item:
  ticket: Ticket
  payload: Any
  deliver: Callable[[Any], Any]
  on_done: Callable[[Ticket], None] | None


def _nbytes(payload) -> int:
  return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(payload))


class Streamer:
  """Background transfer threads with bounded memory and per-key ordering.

  Args:
    num_threads: worker threads (keys are spread over them; one key stays on one thread).
    max_bytes: bound on the bytes of transfers submitted but not yet delivered.
    max_items: bound on the number of such transfers.
    flush_method: how payloads leave the device ("auto", "async", "pinned"; see transport.py).
  """

  def __init__(self, num_threads: int = 2, max_bytes: int = 1 << 30, max_items: int = 1024,
               flush_method: str = "auto"):
    if num_threads < 1 or max_bytes < 1 or max_items < 1:
      raise ValueError("num_threads, max_bytes and max_items must be positive")
    self.max_bytes, self.max_items, self.flush_method = max_bytes, max_items, flush_method
    self._cv = threading.Condition()
    self._fifos = [collections.deque() for _ in range(num_threads)]
    self._seq: dict[Hashable, int] = collections.defaultdict(int)
    self._poisoned: dict[Hashable, BaseException] = {}
    # Unfinished and failed tickets only: a successful one is dropped when it completes.
    self._tickets: dict[int, Ticket] = {}
    self._completed = 0
    self._pending_bytes = 0
    self._pending_items = 0
    self.peak_bytes = 0   # the most bytes ever pending at once (backpressure's witness)
    self._closing = False
    self._cancel = False
    self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                      name=f"kv-streamer-{i}") for i in range(num_threads)]
    for t in self._threads:
      t.start()

  # ---- producing ----
  def submit(self, payload, deliver: Callable[[Any], Any], key: Hashable = None, *,
             donated: bool = False, on_done: Callable[[Ticket], None] | None = None,
             timeout: float | None = None) -> Ticket:
    """Queues `deliver(payload)` on a streamer thread; returns its ticket.

    Args:
      payload: a pytree of arrays (usually a Packed).
      deliver: lands the payload; runs on a streamer thread; its return value is the result.
      key: ordering key; transfers of one key are delivered in submission order.
      donated: the payload's device buffers will be donated by a later step: copy them now.
      on_done: called with the ticket once it completes (on the streamer thread).
      timeout: seconds to wait for queue space before raising TimeoutError.
    """
    if donated:
      payload = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, payload)
    payload = jax.tree.map(lambda x: transport.start_flush(x, self.flush_method)
                           if isinstance(x, jax.Array) else x, payload)
    nbytes = _nbytes(payload)
    deadline = None if timeout is None else time.monotonic() + timeout
    with self._cv:
      while not self._closing and self._pending_items and (
          self._pending_bytes + nbytes > self.max_bytes or self._pending_items >= self.max_items):
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
          raise TimeoutError(f"no queue space for {nbytes} B after {timeout} s")
        self._cv.wait(left)
      if self._closing:
        raise StreamClosed("submit after close")
      seq = self._seq[key]
      self._seq[key] = seq + 1
      ticket = Ticket(key, seq, nbytes)
      self._tickets[id(ticket)] = ticket
      self._pending_bytes += nbytes
      self._pending_items += 1
      self.peak_bytes = max(self.peak_bytes, self._pending_bytes)
      self._fifos[hash(key) % len(self._fifos)].append(_Item(ticket, payload, deliver, on_done))
      self._cv.notify_all()
    return ticket

  # ---- one-liners for the engine ----
  def stream_step(self, cache: KVCache, positions, log: HostKVLog, key: Hashable = None, *,
                  layers=None, rows=None, layer_base: int = 0, **kw) -> Ticket:
    """Appends one decode step's delta (the entries at `positions` [Bs]) to a host log.

    The result of the ticket is the log's step number (what replication acknowledges).
    """
    packed = gather_lib.gather_step(cache, positions, layers, rows, layer_base=layer_base)
    return self.submit(packed, log.append, key, **kw)

  def stream_tokens(self, cache: KVCache, start, size: int, log: HostKVLog,
                    key: Hashable = None, *, layers=None, rows=None, layer_base: int = 0,
                    **kw) -> Ticket:
    """Writes positions [start, start + size) (a prompt block, or some layers of it) to a log."""
    packed = gather_lib.gather(cache, start, size, layers, rows, layer_base=layer_base)
    return self.submit(packed, log.write, key, **kw)

  # ---- errors and shutdown ----
  def clear_error(self, key: Hashable) -> None:
    """Lets transfers of `key` run again after a failure (e.g. once recovery re-sent the log)."""
    with self._cv:
      self._poisoned.pop(key, None)

  def pending(self) -> tuple[int, int]:
    """(transfers, bytes) submitted and not yet delivered."""
    with self._cv:
      return self._pending_items, self._pending_bytes

  def drain(self, timeout: float | None = None) -> None:
    """Waits until every transfer submitted so far is done (errors stay on their tickets)."""
    with self._cv:
      tickets = list(self._tickets.values())
    futures.wait([t._future for t in tickets], timeout)

  def close(self, wait: bool = True, timeout: float | None = None,
            raise_on_error: bool = True) -> ShutdownReport:
    """Stops the streamer; see step 6 of the module docstring."""
    with self._cv:
      self._closing = True
      self._cancel = not wait
      self._cv.notify_all()
    for t in self._threads:
      t.join(timeout)
    if any(t.is_alive() for t in self._threads):
      raise StreamError(f"streamer threads still running after {timeout} s")
    with self._cv:
      for fifo in self._fifos:   # Only reachable when a thread died; be exhaustive anyway.
        while fifo:
          self._finish(fifo.popleft(), exc=StreamClosed("streamer closed"))
      tickets = list(self._tickets.values())
      completed = self._completed
    report = ShutdownReport(completed, [], [])
    unseen = []
    for t in tickets:
      exc = t._future.exception()
      if exc is None:
        report.completed += 1   # finished between the snapshot above and now
      elif isinstance(exc, StreamClosed):
        report.cancelled.append(t)
      else:
        if not t.observed:
          unseen.append((t, exc))
        report.failed.append((t, exc))
    if unseen and raise_on_error:
      raise StreamError(f"{len(unseen)} transfer(s) failed and nobody waited on them: "
                        + "; ".join(f"{t!r}: {e!r}" for t, e in unseen[:5])) from unseen[0][1]
    return report

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close(wait=exc[0] is None, raise_on_error=exc[0] is None)

  # ---- worker threads ----
  def _run(self, index: int) -> None:
    fifo = self._fifos[index]
    while True:
      with self._cv:
        while not fifo and not self._closing:
          self._cv.wait()
        if not fifo:
          return
        item = fifo.popleft()
        cancel = self._cancel
        poisoned = self._poisoned.get(item.ticket.key)
      if cancel:
        self._finish(item, exc=StreamClosed("streamer closed before the transfer ran"))
        continue
      if poisoned is not None:
        err = StreamError(f"an earlier transfer of {item.ticket.key!r} failed")
        err.__cause__ = poisoned
        self._finish(item, exc=err)
        continue
      try:
        result = item.deliver(item.payload)
      except BaseException as e:  # Every error goes to the ticket, whatever its type.
        with self._cv:
          self._poisoned.setdefault(item.ticket.key, e)
        self._finish(item, exc=e)
      else:
        self._finish(item, result=result)

  def _finish(self, item: _Item, result=None, exc: BaseException | None = None) -> None:
    item.payload = None  # Drop the buffers before the budget is released.
    with self._cv:
      self._pending_bytes -= item.ticket.nbytes
      self._pending_items -= 1
      self._cv.notify_all()
    if exc is None:
      item.ticket._future.set_result(result)
      with self._cv:
        self._tickets.pop(id(item.ticket), None)
        self._completed += 1
    else:
      item.ticket._future.set_exception(exc)
    if item.on_done is not None:
      try:
        item.on_done(item.ticket)
      except Exception as e:  # A failing callback must not kill the thread; keep it visible.
        item.ticket.callback_error = e
