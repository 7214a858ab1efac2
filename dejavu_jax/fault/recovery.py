"""Recovery strategies: what happens to the work in flight when a stage worker dies.

Every strategy first lets the engine replace the dead worker (a new worker for the same stage,
weights from host memory or an orbax checkpoint) and drop the steps still queued for the lost
microbatches (the epoch rises). They differ in how the lost requests come back:

  restart    DéjàVu's baseline: every in-flight request starts again from its prompt; all its
             generated tokens are computed again.
  reprefill  the lost caches are rebuilt by one prefill over prompt + tokens generated so far, and
             generation continues where it stopped: only a prompt step per microbatch is redone.
             The rebuilt keys/values come from a prefill instead of step-by-step decoding, a
             different summation order: tokens match the uninterrupted run except at near-ties.
  replica    DéjàVu: restore the lost stage's caches from the replica its successor holds and
             resume each microbatch at its last replicated step (fault/replication.py; the
             engine runs it, since it restores caches rather than requeueing requests). Work
             with no usable replica falls back to `restart`.

`snapshot` (periodic orbax snapshots of the caches) is not built yet: asking for it is an error
that says so.

A strategy is a function (scheduler, lost microbatches, records) -> recomputed token count that
requeues the lost requests on `scheduler.pending`, registered in STRATEGIES; add one there.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


def _unfinished(mb, records):
  for i, req in enumerate(mb.requests):
    if not mb.done[i] and records[req.request_id].finish is None:
      yield i, req


def restart(sched, lost, records) -> int:
  """Requeue every unfinished request of the lost microbatches from its prompt (at the front)."""
  again, recomputed = [], 0
  for mb in lost:
    for _, req in _unfinished(mb, records):
      rec = records[req.request_id]
      recomputed += len(rec.tokens)
      rec.recomputed_tokens += len(rec.tokens)
      rec.tokens.clear()
      rec.token_times.clear()
      again.append(req)
  sched.pending.extendleft(reversed(again))
  return recomputed


def reprefill(sched, lost, records) -> int:
  """Requeue each unfinished request as its continuation: prompt + generated tokens so far."""
  again = []
  for mb in lost:
    for i, req in _unfinished(mb, records):
      done = mb.generated[i]
      again.append(dataclasses.replace(req, prompt=tuple(req.prompt) + tuple(done),
                                       max_new_tokens=req.max_new_tokens - len(done)))
  sched.pending.extendleft(reversed(again))
  return 0


# "replica" requeues (restarts) only what its replicas cannot restore.
STRATEGIES: dict[str, Callable] = {"restart": restart, "reprefill": reprefill, "replica": restart}
_LATER = ("snapshot",)


def get_strategy(name: str) -> Callable:
  if name in STRATEGIES:
    return STRATEGIES[name]
  if name in _LATER:
    raise ValueError(f"recovery strategy {name!r} is not built yet; available: "
                     f"{sorted(STRATEGIES)}")
  raise ValueError(f"unknown recovery strategy {name!r}; available: {sorted(STRATEGIES)}")

