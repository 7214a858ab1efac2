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
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np


@dataclasses.dataclass
class Microbatch:
  mb_id: int
  slot: int
  requests: list                 # the requests in rows 0..n-1 (rows n..B-1 are empty)
  batch: int                     # B, rows of the slot's cache
  positions: np.ndarray          # [B] next write position per row (= tokens in cache)
  done: np.ndarray               # [B] bool; empty rows are done from the start
  generated: list                # per request: list of generated token ids
  step: int = 0                  # completed steps (prefill = 1)

  @property
  def complete(self) -> bool:
    return bool(self.done.all())

  @property
  def prompt_bucket_len(self) -> int:
    return max(len(r.prompt) for r in self.requests)


class Scheduler:
  """FIFO admission, `depth` slots, microbatches of up to `microbatch_size` rows."""

  def __init__(self, depth: int, microbatch_size: int, mode: str = "mixed"):
    if depth < 1 or microbatch_size < 1:
      raise ValueError(f"depth and microbatch_size must be >= 1, got {depth}, {microbatch_size}")
    self.depth, self.microbatch_size, self.mode = depth, microbatch_size, mode
    self.pending: collections.deque = collections.deque()
    self.free_slots = list(range(depth))
    self.in_flight: dict[int, Microbatch] = {}      # mb_id -> microbatch
    self._next_mb = 0
    self.injected_order: list[int] = []            # request ids in injection order

  def admit(self, request) -> None:
    self.pending.append(request)

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
    mb = Microbatch(self._next_mb, slot, take, b, positions, done, [[] for _ in take])
    self._next_mb += 1
    self.in_flight[mb.mb_id] = mb
    self.injected_order.extend(r.request_id for r in take)
    return mb

  def on_tokens(self, mb: Microbatch, tokens: np.ndarray, eos_token_id: int | None) -> list[int]:
    """Records one step's sampled tokens [B]; returns the rows that finished with this step."""
    finished = []
    for i, req in enumerate(mb.requests):
      if mb.done[i]:
        continue
      tok = int(tokens[i])
      mb.generated[i].append(tok)
      if len(mb.generated[i]) >= req.max_new_tokens or tok == eos_token_id:
        mb.done[i] = True
        finished.append(i)
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

  def resume(self, mb: Microbatch) -> None:
    """Puts a microbatch rewound by a recovery back in flight, in its old slot."""
    self.free_slots.remove(mb.slot)
    self.in_flight[mb.mb_id] = mb

  def drop_in_flight(self) -> list[Microbatch]:
    """Removes every in-flight microbatch (a failure lost them) and frees their slots; returns
    them, rows and generated tokens intact, for the recovery strategy."""
    lost = list(self.in_flight.values())
    for mb in lost:
      self.release(mb)
    return lost
