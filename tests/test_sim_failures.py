"""The simulator recovers through the engine's strategy objects, with the engine's semantics."""

import math

import pytest

from dejavu_jax import costmodel as cm
from dejavu_jax import sim
from dejavu_jax.config import get_model_config
from dejavu_jax.fault import strategies as fault_strategies
from dejavu_jax.runtime.api import Ack
from dejavu_jax.sim import Failure, RecoveryConfig, saturated_requests, simulate_colocated
from dejavu_jax.sim.failures import plan_recovery

MODEL = get_model_config("opt_125m")
FAST = cm.Link("fast", 1e18, 0.0)


def _cost():
  return cm.TableCostModel(MODEL, prompt=0.02, token=0.005)


def _rec(strategy, **kw):
  base = dict(strategy=strategy, replica_link=FAST, snapshot_link=FAST, snapshot_every=2,
              weight_load_s=0.5, replacement_start_s=1.0)
  return RecoveryConfig(**(base | kw))


def _run(strategy, failures, n=16, out=41, **kw):
  return simulate_colocated(_cost(), saturated_requests(n, 16, out), 4, batch_size=1,
                            failures=failures, recovery=_rec(strategy, **kw))


def test_strategy_names_come_from_the_engines_registry():
  assert set(sim.STRATEGIES) == set(fault_strategies.STRATEGIES)
  with pytest.raises(ValueError, match="unknown recovery strategy"):
    RecoveryConfig(strategy="replica,pray")
  assert RecoveryConfig(strategy="replica,snapshot,reprefill").strategy


def test_the_sim_reads_the_engines_chain_plan():
  view = fault_strategies.FailureView((1,), 4, {7: 5, 8: 0})
  chain = fault_strategies.get_strategy("replica,reprefill")
  chain.observe(Ack(2, 1, 7, 3, 0))
  resumes, requeue = plan_recovery(chain, view)
  assert [(m, s, b) for m, s, _, b in resumes] == [(7, 3, "replica")]
  assert requeue == {8: ("continue", "reprefill")}


def test_restart_requeues_only_the_lost_requests():
  # One microbatch per request; stage 1 dies mid-run. Requests that finished before the failure
  # keep their times; only the ones in flight are redone from their prompts.
  free = _run("restart", [])
  t = sorted(r.finish for r in free.records)[len(free.records) // 2] + 0.01
  res = _run("restart", [Failure(t, 1)])
  (rec,) = res.recoveries
  assert rec["scope"] == "requests" and rec["handled_by"] == {"restart": 4}
  before = [r for r in free.records if r.finish < t]
  assert before
  by = {r.rid: r for r in res.records}
  for r in before:
    assert by[r.rid].finish == r.finish
  assert rec["lost_tokens"] == rec["progress_steps"] > 0   # batch 1: a step is a token
  assert res.summary["num_unfinished"] == 0
  job = _run("restart", [Failure(t, 1)], restart_scope="job")
  assert job.recoveries[0]["scope"] == "job"


def test_replica_chain_falls_back_when_the_holder_died_too():
  # Stages 1 and 2 die together: stage 1's replica lived on stage 2, so the chain hands those
  # microbatches to the snapshot strategy; what no snapshot covers is re-prefilled.
  res = _run("replica,snapshot,reprefill", [Failure(1.0, 1), Failure(1.0, 2)])
  (rec,) = res.recoveries
  assert rec["stages"] == (1, 2)
  assert "replica" not in rec["handled_by"]
  assert set(rec["handled_by"]) <= {"snapshot", "reprefill"}
  assert sum(rec["handled_by"].values()) == rec["inflight_microbatches"]
  assert rec["restore_s"] >= 0 and res.summary["num_unfinished"] == 0
  one = _run("replica,snapshot,reprefill", [Failure(1.0, 1)]).recoveries[0]
  assert one["handled_by"] == {"replica": one["inflight_microbatches"]}
  assert one["lost_steps"] == 0


def test_snapshot_resumes_from_the_last_complete_snapshot():
  slow = cm.Link("slow_disk", 1e18, 0.3)   # a snapshot takes 0.3 s to complete
  res = _run("snapshot", [Failure(2.0, 1)], snapshot_link=slow)
  (rec,) = res.recoveries
  assert rec["handled_by"].get("snapshot", 0) > 0
  assert rec["lost_steps"] > 0          # steps after the last complete snapshot are redone
  assert rec["restore_s"] == pytest.approx(0.3)   # one read of the dead stage's snapshot
  assert res.summary["num_unfinished"] == 0
  # Never written before the failure: nothing to restore, the chain's restart takes over.
  never = _run("snapshot", [Failure(0.05, 1)], snapshot_link=slow).recoveries[0]
  assert set(never["handled_by"]) == {"restart"}


def test_failure_by_step_count_and_reprefill_continuations():
  res = _run("reprefill", [Failure(stage=2, after_steps=30)])
  (rec,) = res.recoveries
  assert rec["handled_by"] == {"reprefill": rec["inflight_microbatches"]}
  assert rec["lost_tokens"] == 0 and res.summary["num_unfinished"] == 0
  # Three failures of distinct stages, each after the previous recovery: three recoveries.
  three = _run("replica", [Failure(stage=1, after_steps=20), Failure(stage=3, after_steps=400),
                           Failure(stage=0, after_steps=800)], n=32)
  assert [r["stages"] for r in three.recoveries] == [(1,), (3,), (0,)]
  assert all(math.isfinite(r["resumed_at"]) for r in three.recoveries)
  with pytest.raises(ValueError, match="exactly one"):
    Failure(1.0, 1, after_steps=3)
