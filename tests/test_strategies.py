"""The recovery strategies' one semantics, without JAX: `Chain` is a strategy whose plan covers
every microbatch exactly once (by the first strategy not excluded), `handled_by` and `resync`
follow the ring (`ring_holder`), a replica one step ahead of the pipeline is used, and the
disaggregated prompt path's `RedoPrompts` is a strategy like the others."""

import subprocess
import sys

import pytest

from dejavu_jax.fault import strategies as st
from dejavu_jax.runtime.api import Ack, ReplicaSource, SnapshotSaved, SnapshotSource


def test_strategies_import_no_jax():
  """The simulator imports the strategies; that must not pull in JAX or a runtime."""
  code = ("import sys; import dejavu_jax.fault.strategies; "
          "bad = [m for m in sys.modules if m == 'jax' or m.startswith('jax.') or "
          "m in ('dejavu_jax.runtime.local', 'dejavu_jax.runtime.ray')]; "
          "print(bad); sys.exit(1 if bad else 0)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr


def test_ring_holder_is_the_successor():
  assert [st.ring_holder(s, 4) for s in range(4)] == [1, 2, 3, 0]


def _acked(chain, stage, mb, step, holder=None):
  chain.observe(Ack(st.ring_holder(stage, 3) if holder is None else holder, stage, mb, step, 0))


def test_chain_is_a_strategy_and_covers_each_microbatch_once():
  chain = st.get_strategy("replica,snapshot,reprefill", snapshot_dir="/tmp/unused")
  assert isinstance(chain, st.Chain) and chain.name == "replica,snapshot,reprefill"
  _acked(chain, 1, 10, 4)
  chain.observe(SnapshotSaved(1, "/snap", 3, {11: 2}))
  view = st.FailureView((1,), 3, {10: 5, 11: 5, 12: 4, 13: 0})
  plan = chain.plan(view)
  assert isinstance(plan, st.RecoveryPlan)
  assert plan.handled_by == {10: "replica", 11: "snapshot", 12: "reprefill", 13: "reprefill"}
  assert [(r.mb_id, r.step, r.by) for r in plan.resume] == [(10, 4, "replica"),
                                                            (11, 2, "snapshot")]
  assert plan.resume[0].sources == {1: ReplicaSource(2, 4)}
  assert plan.resume[1].sources == {1: SnapshotSource("/snap", 3, 2)}
  assert plan.requeue == {12: "continue", 13: "continue"}
  assert sorted(plan.covers()) == sorted(view.completed)
  assert plan.resync == (0,)   # stage 0's replicas lived on the dead stage 1


def test_exclude_replans_without_the_failed_strategy():
  chain = st.get_strategy("replica,snapshot", snapshot_dir="/tmp/unused")
  _acked(chain, 1, 10, 4)
  chain.observe(SnapshotSaved(1, "/snap", 3, {10: 2}))
  view = st.FailureView((1,), 3, {10: 5})
  assert chain.plan(view).handled_by == {10: "replica"}
  again = chain.plan(st.FailureView((1,), 3, {10: 5}, exclude=frozenset({"replica"})))
  assert again.handled_by == {10: "snapshot"}
  last = chain.plan(st.FailureView((1,), 3, {10: 5}, exclude=frozenset({"replica", "snapshot"})))
  assert last.handled_by == {10: "restart"} and last.requeue == {10: "restart"}


def test_adjacent_double_failure_has_no_replica_and_resyncs_the_live_owner():
  chain = st.get_strategy("replica")
  _acked(chain, 1, 10, 4)
  view = st.FailureView((1, 2), 4, {10: 5})
  chain.forget(view)
  plan = chain.plan(view)
  assert plan.handled_by == {10: "restart"}
  assert plan.resync == (0,)   # stage 0's holder (1) died; 1's holder (2) died with it


def test_replica_one_step_ahead_of_the_pipeline_is_used():
  """The dead stage ran (and replicated) step k while the pipeline completed only k steps
  (0..k-1): the replica holds k..k. The plan loads it as it is and resumes after step k-1."""
  chain = st.get_strategy("replica")
  _acked(chain, 1, 10, 6)
  plan = chain.plan(st.FailureView((1,), 3, {10: 6}))
  (r,) = plan.resume
  assert (r.mb_id, r.step, r.by) == (10, 5, "replica")
  assert r.sources == {1: ReplicaSource(2, 6)}
  assert plan.handled_by == {10: "replica"}


def test_redo_prompts_is_a_strategy():
  redo = st.RedoPrompts()
  plan = redo.plan(st.FailureView((0,), 2, {3: 0, 4: 0}))
  assert plan.requeue == {3: "restart", 4: "restart"}
  assert plan.handled_by == {3: "redo prompts", 4: "redo prompts"}


@pytest.mark.parametrize("spec", ["nope", "restart,replica"])
def test_bad_chains_are_named(spec):
  with pytest.raises(ValueError):
    st.get_strategy(spec)
