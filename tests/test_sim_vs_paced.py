"""The simulator predicts the paced engine: same requests, same cost model, within 10%.

One small scenario of `benchmarks/sim_vs_paced.py` (D = 2, B = 4, a rate near saturation, where
scheduling semantics matter most); the benchmark's docstring says what still differs and why.
"""

import pytest

from benchmarks import sim_vs_paced as bench


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sim_matches_paced_engine():
  scenario = bench.Scenario(stages=2, batch=4, load=0.8, span_s=2.0)
  out = bench.run_grid([scenario], log=lambda _: None)
  (row,) = out["scenarios"]
  assert row["num_requests"] >= bench.Scenario.min_requests
  assert out["max_rel_error_throughput"] <= 0.10, row
  assert out["max_rel_error_p50_latency"] <= 0.10, row


def test_sim_forms_the_engines_paper_microbatches():
  """Same waiting requests: the simulator's paper-mode feed cuts the engine scheduler's groups."""
  from dejavu_jax import sim
  from dejavu_jax.pipeline.scheduler import Scheduler
  from dejavu_jax.workload import Request
  from dejavu_jax.sim.engine import EventLoop
  from dejavu_jax.sim.feed import RequestFeed

  lens = [5, 5, 5, 3, 3, 5, 5, 5, 5, 5, 2]
  reqs = [Request(i, 0.0, (4,) * (6 if i == 7 else 3), n) for i, n in enumerate(lens)]
  sched = Scheduler(depth=len(reqs), microbatch_size=4, mode="paper")
  for r in reqs:
    sched.admit(r)
  engine_groups = []
  while (mb := sched.inject()) is not None:
    engine_groups.append([r.request_id for r in mb.requests])
  loop = EventLoop()
  feed = RequestFeed(loop, sim.from_serving(reqs), 4, lambda: None, microbatching="paper")
  loop.run()
  sim_groups = []
  while feed.has_work():
    sim_groups.append([r.rid for r in feed.take().requests])
  assert sim_groups == engine_groups == [[0, 1, 2], [3, 4], [5, 6], [7], [8, 9], [10]]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sim_matches_paced_engine_under_failures():
  """Every strategy under three crashes of distinct stages (placed by step count; the first is
  the one-failure case, which `benchmarks/sim_vs_paced.py --failures` also runs alone): the
  simulator, planning through the engine's strategy objects, predicts the paced engine's
  makespan and mean latency within 10%, and the same strategies handle the microbatches."""
  out = bench.run_failure_grid(bench.failure_grid(counts=(3,)), log=lambda _: None)
  assert out["label"] == "modelled"
  rows = out["failure_scenarios"]
  assert {(r["strategy"], r["failures"]) for r in rows} == {
      (s, 3) for s in ("restart", "reprefill", "replica", "snapshot")}
  for r in rows:
    assert r["engine_failures"] == r["sim_failures"] == r["failures"], r
    assert r["engine_unfinished"] == r["sim_unfinished"] == 0, r
    assert set(r["sim_handled_by"]) == set(r["engine_handled_by"]), r
    assert r["rel_error_makespan"] <= 0.10, r
    assert r["rel_error_mean_latency"] <= 0.10, r
