"""The request side of a simulated system: arrivals into a waiting queue, cut into microbatches.

Arrivals are scheduled lazily (one pending event at a time) so that a run with many requests
keeps a small event heap. Microbatches are formed greedily, as in the paper's baseline: when a
pipeline can take one, it gets up to `batch_size` of the requests waiting (never an empty one).
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

from dejavu_jax.sim.engine import EventLoop, Microbatch, form_microbatch
from dejavu_jax.sim.records import RequestRecord


class RequestFeed:
  """Feeds `requests` (sorted by arrival) into `waiting`, calling `on_arrival` after each."""

  def __init__(self, loop: EventLoop, requests: Sequence[RequestRecord], batch_size: int,
               on_arrival: Callable[[], None]):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not requests:
      raise ValueError("no requests to simulate")
    self.loop, self.batch_size, self.on_arrival = loop, batch_size, on_arrival
    self._pending = sorted(requests, key=lambda r: r.arrival)
    self._next = 0
    self.waiting: collections.deque[RequestRecord] = collections.deque()
    self.redo: collections.deque[Microbatch] = collections.deque()  # restarted microbatches
    self._mids = 0
    self._schedule_next()

  def _schedule_next(self) -> None:
    if self._next < len(self._pending):
      self.loop.at(self._pending[self._next].arrival, self._arrive)

  def _arrive(self) -> None:
    now = self.loop.now
    while self._next < len(self._pending) and self._pending[self._next].arrival <= now:
      self.waiting.append(self._pending[self._next])
      self._next += 1
    self._schedule_next()
    self.on_arrival()

  def has_work(self) -> bool:
    return bool(self.redo or self.waiting)

  def take(self) -> Microbatch:
    """The next microbatch: a restarted one first, else up to batch_size waiting requests."""
    if self.redo:
      return self.redo.popleft()
    reqs = [self.waiting.popleft() for _ in range(min(self.batch_size, len(self.waiting)))]
    mb = form_microbatch(self._mids, reqs)
    self._mids += 1
    return mb
