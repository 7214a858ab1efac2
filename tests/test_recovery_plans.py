"""Recovery as plans, on the fake stage program (tokens computable by hand, steps in milliseconds):
replica, snapshot and the fallback chain after single and adjacent-double failures, and a
replication link that fails mid-run. Oracle: every request's tokens equal `fake_generate`."""

import time

import numpy as np
import pytest

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.controller import FailureSpec
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request

CFG = tiny_config("opt", num_layers=4, max_positions=128)


def _workload(n=12, seed=0):
  rng = np.random.default_rng(seed)
  return [Request(i, 0.02 * i, tuple(int(t) for t in rng.integers(3, 128, int(rng.integers(2, 12)))),
                  int(rng.integers(20, 40))) for i in range(n)]


# Four microbatches of three that all start at t=0 and live ~2 s: a failure at 1 s finds them in
# flight, after a snapshot with all of them in it has completed (an orbax save takes 0.1-0.5 s
# here, with four workers saving at once on a loaded 2-core machine).
LONG = [Request(i, 0.0, (3 + i, 7, 11 + i), 120) for i in range(12)]
LATE = 1.0


def _reference(reqs):
  return {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens)[0] for r in reqs}


def _serve(recovery, failures, stages=4, link_fault=None, snapshot_every=8, reqs=None,
           max_len=64, progress_timeout_s=30.0):
  # Paced: every stage step lasts 4 ms (token) / 8 ms (prompt), so the failures land mid-run.
  cost = TableCostModel(CFG, prompt=0.008 * stages / 4, token=0.004 * stages / 4)
  serve = ServeConfig(num_stages=stages, microbatch_size=3, max_len=max_len, heartbeat_s=0.03,
                      heartbeat_timeout_s=0.3, recovery=recovery, program="fake",
                      pacing="paced", snapshot_every=snapshot_every,
                      progress_timeout_s=progress_timeout_s)
  reqs = reqs or _workload()
  with PipelineEngine(CFG, None, serve, cost_model=cost) as eng:
    eng.warmup()
    if link_fault is not None:
      eng.runtime.inject_link_fault(*link_fault)
    res = eng.serve(reqs, failures=failures)
    # The last frees are sent as serve() returns: let the workers take them (a leak would stay).
    deadline = time.monotonic() + 5
    while (any(st.inbox or st.cache_mb_ids for st in eng.worker_stats()) and
           time.monotonic() < deadline):
      time.sleep(0.01)
    stats = eng.worker_stats()
  return reqs, res, stats


@pytest.mark.timeout(120)
# (restart and reprefill: tests/test_fault.py on the real model, and the campaign test.)
@pytest.mark.parametrize("recovery,stage", [("replica", 1), ("replica", 0), ("replica", 3),
                                            ("snapshot", 2), ("snapshot", 0)])
def test_single_failure_identical(recovery, stage):
  long = dict(reqs=LONG, max_len=128) if recovery == "snapshot" else {}
  failure = (FailureSpec(stage=stage, after_snapshots=2) if long else FailureSpec(0.5, stage))
  reqs, res, stats = _serve(recovery, [failure], **long)
  assert res.tokens() == _reference(reqs)
  (ev,) = res.recoveries
  assert ev.stages == (stage,) and ev.lost_microbatches >= 1
  if recovery in ("replica", "snapshot"):
    # Restored from state; only a microbatch newer than its replica or snapshot is requeued.
    assert ev.handled_by.get(recovery, 0) >= 1
    assert ev.restored_microbatches == ev.handled_by[recovery]
  assert sum(r.recomputed_tokens for r in res.records) == ev.recomputed_tokens
  # Every microbatch left the pipeline: no worker still holds a cache.
  assert all(st.cache_mb_ids == [] for st in stats), (
      [(st.stage, st.cache_mb_ids) for st in stats], res.recoveries)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stages,dead", [(4, (1, 2)), (3, (2, 0))])
def test_adjacent_double_failure_falls_down_the_chain(stages, dead):
  """Both stages die at once: the first one's replica lived on the second, so it cannot come
  from a replica; the chain restores it from the snapshot instead."""
  # Right after the pipeline's second complete snapshot (not at a time: a save can take over
  # a second on a loaded machine, and then no snapshot would exist yet).
  reqs, res, _ = _serve("replica,snapshot,reprefill",
                        [FailureSpec(stage=s, after_snapshots=2) for s in dead],
                        stages, reqs=LONG, max_len=128)
  assert res.tokens() == _reference(reqs)
  (ev,) = res.recoveries
  assert set(ev.stages) == set(dead)
  # The replica cannot serve (its holder died too); the snapshot restores every microbatch in
  # flight (all were in the pipeline before its first snapshot).
  assert set(ev.handled_by) == {"snapshot"} and ev.handled_by["snapshot"] == min(stages, 4), ev


@pytest.mark.timeout(120)
def test_adjacent_double_without_snapshot_reprefills():
  reqs, res, _ = _serve("replica,reprefill", [FailureSpec(0.5, 1), FailureSpec(0.5, 2)])
  assert res.tokens() == _reference(reqs)
  assert set(res.recoveries[0].handled_by) == {"reprefill"}


@pytest.mark.timeout(120)
def test_failures_in_turn_and_during_replacement():
  reqs, res, _ = _serve("replica,snapshot,restart",
                        [FailureSpec(0.3, 1), FailureSpec(0.45, 2), FailureSpec(0.7, 0)])
  assert res.tokens() == _reference(reqs)
  assert len(res.recoveries) >= 2


@pytest.mark.timeout(120)
def test_failed_replication_transfers_are_never_acknowledged():
  """Stage 1's link to its replica fails for every transfer past step 6: what the replica really
  holds stops there. Stage 1 then dies with all four microbatches well past step 6. Recovery must
  resume every one of them from what landed, at step 6. (Were a failed transfer acknowledged, the
  plan would ask the replica for steps it does not hold: the holder refuses and the microbatch
  falls back to a restart; without that check the log's holes would change the tokens.)"""
  reqs, res, _ = _serve("replica", [FailureSpec(LATE, 1)], reqs=LONG, max_len=128,
                        link_fault=(1, lambda w: w.step > 6))
  assert res.tokens() == _reference(reqs)
  (ev,) = res.recoveries
  assert ev.handled_by == {"replica": 4}
  # Every row resumed after step 6 while past it: each generates at least one token again.
  assert ev.recomputed_tokens >= len(reqs)


@pytest.mark.timeout(120)
def test_dead_link_falls_back():
  """No transfer of stage 1 ever lands: nothing is acknowledged, recovery falls back."""
  reqs, res, _ = _serve("replica,reprefill", [FailureSpec(0.5, 1)],
                        link_fault=(1, lambda w: True))
  assert res.tokens() == _reference(reqs)
  assert set(res.recoveries[0].handled_by) == {"reprefill"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("recovery", ["replica", "snapshot"])
def test_adjacent_double_failure_each_strategy_alone(recovery):
  """Alone, a strategy restores what it can and the appended `restart` takes the rest: stage
  1's replica lived on stage 2, so replica restores nothing; snapshots survive both."""
  # Snapshot: right after the pipeline's second complete snapshot (a save's duration varies
  # with the load); replica keeps no snapshots, so its failures come at a time.
  when = (dict(after_snapshots=2) if recovery == "snapshot" else dict(time_s=LATE))
  reqs, res, _ = _serve(recovery, [FailureSpec(stage=1, **when), FailureSpec(stage=2, **when)],
                        reqs=LONG, max_len=128)
  assert res.tokens() == _reference(reqs)
  ev = res.recoveries[0]   # both stages in the first recovery (no other failure was injected)
  assert set(ev.stages) == {1, 2}, res.recoveries
  if recovery == "replica":
    assert set(ev.handled_by) == {"restart"}
  else:
    assert set(ev.handled_by) <= {"snapshot", "restart"} and ev.handled_by.get("snapshot", 0) >= 1


@pytest.mark.timeout(180)
def test_replica_one_step_ahead_of_the_pipeline_is_used():
  """The pattern an outside campaign found (D=3, microbatches of one request): stage 2 crashes
  after 5 steps, stage 1 after 10. After the first recovery stage 1 re-sends its replicas to the
  new stage 2 as blocks at the last step it ran, which can be one step ahead of what the
  pipeline completed; when stage 1 then dies, that replica ("holds steps k..k") is used, not
  refused: every recovery is the replica's and the tokens are identical."""
  cost = TableCostModel(CFG, prompt=0.006, token=0.003)
  serve = ServeConfig(num_stages=3, microbatch_size=1, max_len=64, heartbeat_s=0.03,
                      heartbeat_timeout_s=0.3, recovery="replica", program="fake",
                      pacing="paced", progress_timeout_s=30.0)
  reqs = [Request(i, 0.0, (3 + i, 7, 11 + i), 40) for i in range(3)]
  with PipelineEngine(CFG, None, serve, cost_model=cost) as eng:
    eng.warmup()
    res = eng.serve(reqs, failures=[FailureSpec(stage=2, after_steps=5),
                                    FailureSpec(stage=1, after_steps=10)])
  assert res.tokens() == _reference(reqs)
  assert [ev.stages for ev in res.recoveries] == [(2,), (1,)], res.recoveries
  for ev in res.recoveries:
    assert set(ev.handled_by) == {"replica"} and ev.load_errors == [], ev
