"""Failure injection through the runtime, on the fake program: crashes at a worker's n-th step,
stalls caught by the progress watchdog, failures during a recovery (the replica's holder dying
while it is being read). Oracle: tokens equal `fake_generate`, every request completes."""

import pytest

from dejavu_jax.fault.inject import FailureSpec
from tests.test_recovery_plans import _reference, _serve


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stage", [0, 3])
def test_crash_at_a_step(stage):
  reqs, res, _ = _serve("replica", [FailureSpec(stage=stage, after_steps=25)])
  assert res.tokens() == _reference(reqs)
  assert [ev.stages for ev in res.recoveries] == [(stage,)]


@pytest.mark.timeout(120)
def test_stall_is_caught_by_the_progress_watchdog():
  """Stage 2 stops making progress for 30 s while it heartbeats: the watchdog (0.5 s) replaces it."""
  reqs, res, _ = _serve("replica,reprefill",
                        [FailureSpec(0.5, 2, kind="stall", stall_s=30.0)],
                        progress_timeout_s=0.5)
  assert res.tokens() == _reference(reqs)
  (ev,) = res.recoveries
  assert ev.stages == (2,) and ev.detection_s >= 0.4


@pytest.mark.timeout(120)
def test_holder_dies_during_recovery():
  """Stage 1 crashes; while its caches are restored from stage 2's replicas, stage 2 dies too.
  The loads from the dead holder fail, the chain falls back, and stage 2's own failure is
  recovered next."""
  reqs, res, _ = _serve("replica,snapshot,reprefill",
                        [FailureSpec(stage=1, after_steps=30),
                         FailureSpec(stage=2, during_recovery=True)])
  assert res.tokens() == _reference(reqs)
  assert {s for ev in res.recoveries for s in ev.stages} == {1, 2}
  assert "replica" not in res.recoveries[0].handled_by


def test_bad_failure_specs_are_named():
  with pytest.raises(ValueError, match="exactly one of time_s, after_steps, during_recovery"):
    FailureSpec(1.0, 0, after_steps=3)
  with pytest.raises(ValueError, match="finite number >= 0, got nan"):
    FailureSpec(float("nan"), 0)
  with pytest.raises(ValueError, match="a stall needs stall_s > 0"):
    FailureSpec(1.0, 0, kind="stall")
  with pytest.raises(ValueError, match="unknown failure kind 'melt'"):
    FailureSpec(1.0, 0, kind="melt")
  with pytest.raises(ValueError, match="after_snapshots must be an int >= 1, got 0"):
    FailureSpec(stage=1, after_snapshots=0)
  with pytest.raises(ValueError, match="exactly one of .*after_snapshots"):
    FailureSpec(1.0, 1, after_snapshots=2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stages", [4])
def test_predecessor_killed_before_first_failure_is_detected(stages):
  """The outside campaign's crash: stage 2 killed at 0.3 s, stage 1 at 0.35 s (before stage 2's
  silence is judged). Replica recovery must re-check who is alive and fall back, never raise."""
  reqs, res, _ = _serve("replica", [FailureSpec(0.3, 2), FailureSpec(0.35, 1)], stages=stages)
  assert res.tokens() == _reference(reqs)
  assert {s for ev in res.recoveries for s in ev.stages} == {1, 2}
