"""The paper's baseline scheduler: D microbatches in flight, a new one injected when one finishes.

Pure bookkeeping (no JAX, no threads), so its invariants are tested on their own: never more than
`depth` microbatches in flight, requests injected in arrival order (FIFO), every admitted request
eventually served. Prompt and token steps of different microbatches share the stages; the engine
sends each microbatch's next step to stage 0 as soon as its previous step leaves the last stage.

Modes:
  paper  all rows of a microbatch share prompt length and output length (a microbatch takes the
         longest run of waiting requests, in order, that match the first one), so they finish
         together, as in the paper's runs;
  mixed  any requests share a microbatch; each row has its own position, and a row's result is
         returned as soon as it finishes (EOS or its max_new_tokens). The microbatch's slot is
         freed when its last row finishes.

The scheduler is the single source of what each request has generated (`RequestState`): the
engine records sampled tokens here, recovery rewinds or requeues here, and the metrics records
are derived from it at the end. A microbatch keeps no tokens of its own: its rows' tokens are
their states' tokens past what they held when it was formed (a continuation's earlier tokens
are in its prompt). Recovery operations:
  rewind(mb, r)          the microbatch resumes after step r (its caches were restored as of r):
                         tokens of its live rows after step r are dropped (to be generated again)
  requeue(mb, mode)      its unfinished requests go back to the front of the queue, "restart"
                         (from the prompt: every generated token is computed again) or
                         "continue" (prompt + tokens so far, re-prefilled as one prompt)
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np


@dataclasses.dataclass
class RequestState:
  """What one admitted request has produced so far (times in seconds on the engine's clock)."""
  request: object                # the request as submitted
  tokens: list = dataclasses.field(default_factory=list)
  token_times: list = dataclasses.field(default_factory=list)
  finish: float | None = None
  recomputed: int = 0            # tokens generated again after a failure

  @property
  def done(self) -> bool:
    return self.finish is not None


@dataclasses.dataclass
class Microbatch:
  mb_id: int
  slot: int
  requests: list                 # the requests in rows 0..n-1 (rows n..B-1 are empty); a
                                 # continuation's prompt holds the tokens generated before
  batch: int                     # B, rows of the microbatch's cache
  positions: np.ndarray          # [B] next write position per row (= tokens in cache)
  done: np.ndarray               # [B] bool; empty rows are done from the start
  states: list                   # per request row: its RequestState
  base: list                     # per request row: its tokens before this microbatch
  step: int = 0                  # completed steps (prefill = 1)

  @property
  def complete(self) -> bool:
    return bool(self.done.all())

  def count(self, row: int) -> int:
    """Tokens row `row` generated in this microbatch."""
    return len(self.states[row].tokens) - self.base[row]

  def last(self, row: int) -> int | None:
    """Row `row`'s latest token in this microbatch, or None."""
    return self.states[row].tokens[-1] if self.count(row) else None

  @property
  def generated(self) -> list[list[int]]:
    """Per request row, the tokens generated in this microbatch (a copy)."""
    return [st.tokens[b:] for st, b in zip(self.states, self.base)]

  @property
  def prompt_bucket_len(self) -> int:
    return max(len(r.prompt) for r in self.requests)


class Scheduler:
  """FIFO admission, `depth` slots, microbatches of up to `microbatch_size` rows."""

  def __init__(self, depth: int, microbatch_size: int, mode: str = "mixed",
               first_mb_id: int = 0):
    if depth < 1 or microbatch_size < 1:
      raise ValueError(f"depth and microbatch_size must be >= 1, got {depth}, {microbatch_size}")
    self.depth, self.microbatch_size, self.mode = depth, microbatch_size, mode
    self.pending: collections.deque = collections.deque()
    self.free_slots = list(range(depth))
    self.in_flight: dict[int, Microbatch] = {}      # mb_id -> microbatch
    self._next_mb = first_mb_id
    self.injected_order: list[int] = []            # request ids in injection order
    self.states: dict[int, RequestState] = {}      # request_id -> what it has produced
    self.rows_of: dict[int, tuple] = {}            # mb_id -> request ids of its rows 0..n-1

  def admit(self, request) -> None:
    if request.request_id in self.states:
      raise ValueError(f"request id {request.request_id} was already admitted")
    self.states[request.request_id] = RequestState(request)
    self.pending.append(request)

  @property
  def next_mb_id(self) -> int:
    return self._next_mb

  @property
  def idle(self) -> bool:
    return not self.pending and not self.in_flight

  def inject(self) -> Microbatch | None:
    """A new microbatch for a free slot, or None (no free slot or nothing waiting)."""
    if not self.free_slots or not self.pending:
      return None
    take = [self.pending.popleft()]
    if self.mode == "paper":
      key = (len(take[0].prompt), take[0].max_new_tokens)
      while (self.pending and len(take) < self.microbatch_size and
             (len(self.pending[0].prompt), self.pending[0].max_new_tokens) == key):
        take.append(self.pending.popleft())
    else:
      while self.pending and len(take) < self.microbatch_size:
        take.append(self.pending.popleft())
    slot = self.free_slots.pop(0)
    b = self.microbatch_size
    positions = np.full(b, -1, np.int32)
    positions[:len(take)] = [len(r.prompt) for r in take]
    done = np.ones(b, bool)
    done[:len(take)] = False
    states = [self.states[r.request_id] for r in take]
    mb = Microbatch(self._next_mb, slot, take, b, positions, done, states,
                    [len(st.tokens) for st in states])
    self._next_mb += 1
    self.in_flight[mb.mb_id] = mb
    self.rows_of[mb.mb_id] = tuple(r.request_id for r in take)
    self.injected_order.extend(r.request_id for r in take)
    return mb

  def on_tokens(self, mb: Microbatch, tokens: np.ndarray, eos_token_id: int | None,
                t: float = 0.0) -> list[int]:
    """Records one step's sampled tokens [B] (produced at time t); returns the rows that
    finished with this step."""
    finished = []
    for i, req in enumerate(mb.requests):
      if mb.done[i]:
        continue
      tok = int(tokens[i])
      state = mb.states[i]
      state.tokens.append(tok)
      state.token_times.append(t)
      if mb.count(i) >= req.max_new_tokens or tok == eos_token_id:
        mb.done[i] = True
        finished.append(i)
        state.finish = t
    mb.step += 1
    return finished

  def advance(self, mb: Microbatch) -> np.ndarray:
    """Positions [B] of the next decode step (-1 for finished and empty rows); moves rows on."""
    pos = np.where(mb.done, -1, mb.positions).astype(np.int32)
    mb.positions = np.where(mb.done, mb.positions, mb.positions + 1)
    return pos

  def release(self, mb: Microbatch) -> None:
    del self.in_flight[mb.mb_id]
    self.free_slots.append(mb.slot)
    self.free_slots.sort()

  # ---- recovery ----
  def rewind(self, mb: Microbatch, step: int) -> int:
    """The microbatch continues after `step` (its caches hold that step): the live rows' tokens
    after it are dropped. Returns the number of tokens dropped (to be generated again)."""
    if not 0 <= step < max(mb.step, 1):
      raise ValueError(f"microbatch {mb.mb_id} cannot resume after step {step}: it completed "
                       f"{mb.step} steps")
    dropped = 0
    for i, req in enumerate(mb.requests):
      state = mb.states[i]
      if state.done:
        continue   # already returned to the client; its later cache entries are never read
      extra = mb.count(i) - (step + 1)
      if extra > 0:
        del state.tokens[len(state.tokens) - extra:]
        del state.token_times[len(state.token_times) - extra:]
        state.recomputed += extra
        dropped += extra
      mb.done[i] = False
      mb.positions[i] = len(req.prompt) + step
    mb.step = step + 1
    return dropped

  def requeue(self, mb: Microbatch, mode: str) -> int:
    """Takes the microbatch out of flight and puts its unfinished requests back at the front of
    the queue: mode "restart" (from the prompt) or "continue" (prompt + tokens so far). Returns
    the tokens that will be generated again."""
    if mode not in ("restart", "continue"):
      raise ValueError(f"unknown requeue mode {mode!r}; expected 'restart' or 'continue'")
    if mb.mb_id in self.in_flight:
      self.release(mb)
    again, recomputed = [], 0
    for req in mb.requests:
      state = self.states[req.request_id]
      if state.done:
        continue
      orig = state.request
      if mode == "restart":
        recomputed += len(state.tokens)
        state.recomputed += len(state.tokens)
        state.tokens.clear()
        state.token_times.clear()
        again.append(orig)
      else:
        again.append(dataclasses.replace(
            orig, prompt=tuple(orig.prompt) + tuple(state.tokens),
            max_new_tokens=orig.max_new_tokens - len(state.tokens)))
    self.pending.extendleft(reversed(again))
    return recomputed
