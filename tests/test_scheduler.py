"""Scheduler invariants, driven by a simulated pipeline loop (no model)."""

import random

import numpy as np
import pytest

from dejavu_jax.pipeline.scheduler import Scheduler
from dejavu_jax.workload import Request


def _drive(sched, requests, seed=0):
  """Admits requests over time and completes in-flight microbatches in random order."""
  rng = random.Random(seed)
  pending = list(requests)
  max_in_flight, served = 0, []
  while pending or not sched.idle:
    for _ in range(rng.randint(0, 3)):
      if pending:
        sched.admit(pending.pop(0))
    while (mb := sched.inject()) is not None:
      pass
    max_in_flight = max(max_in_flight, len(sched.in_flight))
    if sched.in_flight:
      mb = rng.choice(list(sched.in_flight.values()))
      finished = sched.on_tokens(mb, np.zeros(mb.batch, np.int32), eos_token_id=None)
      served += [mb.requests[i].request_id for i in finished]
      if mb.complete:
        sched.release(mb)
      else:
        sched.advance(mb)
  return max_in_flight, served


@pytest.mark.parametrize("depth,mb_size,mode", [(1, 1, "mixed"), (2, 3, "mixed"),
                                                 (4, 8, "paper"), (3, 2, "paper")])
def test_invariants(depth, mb_size, mode):
  rng = np.random.default_rng(depth)
  reqs = [Request(i, 0.0, (3,) * int(rng.integers(1, 3)), int(rng.integers(1, 4)))
          for i in range(60)]
  sched = Scheduler(depth, mb_size, mode)
  max_in_flight, served = _drive(sched, reqs)
  assert max_in_flight <= depth
  assert sorted(served) == list(range(60))                  # no starvation, nothing lost
  assert sched.injected_order == list(range(60))            # FIFO injection
  assert sorted(sched.free_slots) == list(range(depth))


def test_paper_mode_groups_equal_lengths():
  reqs = [Request(i, 0.0, (3,) * (4 if i < 5 else 7), 6 if i < 5 else 9) for i in range(10)]
  sched = Scheduler(depth=4, microbatch_size=4, mode="paper")
  for r in reqs:
    sched.admit(r)
  mbs = []
  while (mb := sched.inject()) is not None:
    mbs.append([r.request_id for r in mb.requests])
  assert mbs == [[0, 1, 2, 3], [4], [5, 6, 7, 8], [9]]


def test_mixed_rows_finish_independently():
  sched = Scheduler(depth=1, microbatch_size=3, mode="mixed")
  for i, n in enumerate([1, 3]):
    sched.admit(Request(i, 0.0, (3, 4), n))
  mb = sched.inject()
  assert mb.done.tolist() == [False, False, True]            # the third row is empty
  assert sched.on_tokens(mb, np.array([9, 9, 9]), None) == [0]
  assert sched.advance(mb).tolist() == [-1, 2, -1]
  assert sched.on_tokens(mb, np.array([9, 9, 9]), eos_token_id=9) == [1]   # EOS
  assert mb.complete


def test_bad_sizes():
  with pytest.raises(ValueError, match="depth and microbatch_size"):
    Scheduler(0, 4)
