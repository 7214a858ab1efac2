"""The discrete-event core: a time-ordered event loop and the microbatch state it moves around.

Events are `(time, seq, fn, args)` on a heap; `seq` keeps same-time events in scheduling order,
which makes every run deterministic. Nothing here knows about pipelines.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Callable

from dejavu_jax.sim.records import RequestRecord


class EventLoop:
  """Runs callbacks in time order; `now` is the time of the event being run."""

  def __init__(self):
    self.now = 0.0
    self._heap: list = []
    self._seq = 0
    self.events_run = 0

  def at(self, time: float, fn: Callable, *args) -> None:
    """Schedules `fn(*args)` at `time` (never in the past)."""
    if time < self.now - 1e-12:
      raise RuntimeError(f"event scheduled in the past: {time} < {self.now}")
    heapq.heappush(self._heap, (max(time, self.now), self._seq, fn, args))
    self._seq += 1

  def run(self, until: float = math.inf) -> None:
    while self._heap and self._heap[0][0] <= until:
      self.now, _, fn, args = heapq.heappop(self._heap)
      self.events_run += 1
      fn(*args)


@dataclasses.dataclass(eq=False)
class Microbatch:
  """Requests that run their steps together (the paper's microbatch of 8).

  Step 0 is the prompt step (it yields each request's first token); step k >= 1 is a token step
  with `prompt_len + k - 1` tokens already cached. A request with output length n is done when
  step n - 1 completes; the microbatch runs `num_steps` = the longest output length. A requeued
  continuation (the engine's reprefill requeue) carries `offsets`: tokens its requests had already
  generated, so its prompt is the original prompt plus them and it owes the rest.

  Attributes:
    mid: microbatch id (admission order).
    requests: its requests.
    prompt_len: tokens per prompt (the longest, prompts are padded).
    num_steps: steps to run.
    done: steps completed on every stage.
    reprefill: the next step is a prefill over the prompt and the tokens generated so far
      (a disaggregated token pipeline's continuation, which stays in its slot).
    offsets: per request, tokens generated before this microbatch (continuations; 0 else).
    last_at: per stage, the last step this microbatch ran there (-1: none), what a snapshot of
      that stage records for it.
    data_ready: per stage, when its cache for this microbatch was last written back (swapping).
  """

  mid: int
  requests: list[RequestRecord]
  prompt_len: int
  num_steps: int
  done: int = 0
  reprefill: bool = False
  offsets: tuple[int, ...] = ()
  last_at: list[int] = dataclasses.field(default_factory=list)
  data_ready: list[float] = dataclasses.field(default_factory=list)

  @property
  def batch(self) -> int:
    return len(self.requests)

  @property
  def step(self) -> int:
    """The next step to run."""
    return self.done

  def live_rows(self) -> int:
    """Requests still generating when the next step runs (a request of n tokens ends at n - 1)."""
    return sum(1 for r, o in zip(self.requests, self.offsets_or_zeros())
               if r.output_len - o > self.done)

  def offsets_or_zeros(self) -> tuple[int, ...]:
    return self.offsets or (0,) * len(self.requests)

  def context(self) -> int:
    """Tokens already cached when the next (token) step runs."""
    return self.prompt_len + self.done - 1

  def step_tokens(self) -> int:
    """Prompt positions processed by the next step when it is a prefill."""
    return self.prompt_len + (self.done if self.reprefill else 0)

  def is_prefill(self) -> bool:
    return self.done == 0 or self.reprefill

  def reset_stage_state(self, num_stages: int) -> None:
    self.last_at = [-1] * num_stages
    self.data_ready = [0.0] * num_stages


def form_microbatch(mid: int, requests: list[RequestRecord],
                    offsets: tuple[int, ...] = ()) -> Microbatch:
  offs = offsets or (0,) * len(requests)
  return Microbatch(mid, requests, max(r.prompt_len + o for r, o in zip(requests, offs)),
                    max(r.output_len - o for r, o in zip(requests, offs)),
                    offsets=tuple(offsets) if any(offs) else ())


def record_step(mb: Microbatch, step: int, now: float) -> None:
  """Marks step `step` of `mb` complete at `now`: first tokens and finished requests."""
  for r, o in zip(mb.requests, mb.offsets_or_zeros()):
    if step == 0 and math.isnan(r.first_token):
      r.first_token = now
    # A request already finished keeps its time even if a restart regenerates its tokens.
    if step + 1 + o >= r.output_len and math.isnan(r.finish):
      r.finish = now
  mb.done = step + 1
  mb.reprefill = False
