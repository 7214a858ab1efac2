"""The request side of a simulated system: arrivals into a waiting queue, cut into microbatches.

Arrivals are scheduled lazily (one pending event at a time) so that a run with many requests
keeps a small event heap. When a pipeline can take a microbatch it gets one (never an empty one),
formed as the engine's `pipeline.scheduler.Scheduler` forms it:

  greedy  up to `batch_size` of the requests waiting, in arrival order (the engine's "mixed"
          mode, and the paper's baseline);
  paper   the longest run of waiting requests, in arrival order and at most `batch_size`, that
          share the first one's (prompt length, output length): the engine's "paper" mode, where
          all rows of a microbatch finish together. A request that arrives just after a group was
          cut starts the next microbatch instead of joining the running one.

`requeue` is the engine scheduler's `requeue`: a recovery puts a lost microbatch's unfinished
requests back at the front of the queue, from their prompts ("restart") or as continuations
("continue": prompt + tokens so far, owing the rest), to be cut into microbatches again.
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

from dejavu_jax.sim.engine import EventLoop, Microbatch, form_microbatch
from dejavu_jax.sim.records import RequestRecord

MICROBATCHING = ("greedy", "paper")


class RequestFeed:
  """Feeds `requests` (sorted by arrival) into `waiting`, calling `on_arrival` after each."""

  def __init__(self, loop: EventLoop, requests: Sequence[RequestRecord], batch_size: int,
               on_arrival: Callable[[], None], microbatching: str = "greedy"):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if microbatching not in MICROBATCHING:
      raise ValueError(f"unknown microbatching {microbatching!r}; expected one of "
                       f"{', '.join(MICROBATCHING)}")
    self.microbatching = microbatching
    if not requests:
      raise ValueError("no requests to simulate")
    self.loop, self.batch_size, self.on_arrival = loop, batch_size, on_arrival
    self._pending = sorted(requests, key=lambda r: r.arrival)
    self._next = 0
    self.waiting: collections.deque[RequestRecord] = collections.deque()
    self.redo: collections.deque[Microbatch] = collections.deque()  # restarted microbatches
    self.offsets: dict[int, int] = {}   # rid -> tokens a waiting continuation already has
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
    key = self._key(self.waiting[0])
    reqs = [self.waiting.popleft()]
    while self.waiting and len(reqs) < self.batch_size and (
        self.microbatching == "greedy" or self._key(self.waiting[0]) == key):
      reqs.append(self.waiting.popleft())
    mb = form_microbatch(self._mids, reqs, tuple(self.offsets.pop(r.rid, 0) for r in reqs))
    self._mids += 1
    return mb

  def _key(self, r: RequestRecord) -> tuple[int, int]:
    o = self.offsets.get(r.rid, 0)
    return r.prompt_len + o, r.output_len - o

  def requeue(self, mb: Microbatch, mode: str) -> int:
    """`mb`'s unfinished requests back at the front of the queue (module doc), in the engine's
    order; returns the tokens that will be generated again."""
    if mode not in ("restart", "continue"):
      raise ValueError(f"unknown requeue mode {mode!r}; expected 'restart' or 'continue'")
    again, recomputed = [], 0
    for r, o in zip(mb.requests, mb.offsets_or_zeros()):
      if r.done:
        continue
      if mode == "restart":
        recomputed += o + mb.done
        r.first_token = float("nan")   # the engine forgets the lost tokens' times too
      else:
        self.offsets[r.rid] = o + mb.done
      again.append(r)
    self.waiting.extendleft(reversed(again))
    return recomputed
