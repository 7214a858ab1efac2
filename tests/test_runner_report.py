"""What the serve runner writes about its runs (issue 21): failures placed by step by default,
validity warnings kept with the numbers, one line per run, the comparison's caveats in the file."""

import types

import pytest

from configs import serve, serve_tiny
from dejavu_jax.fault.controller import RecoveryEvent
from dejavu_jax.studies import runner


def _res(recoveries, wall=2.0):
  return types.SimpleNamespace(recoveries=recoveries, wall_s=wall)


def test_failures_are_placed_by_steps_by_default():
  (f,) = runner.failures_of(serve.get_config())
  assert f.after_steps is not None and f.time_s is None and f.stage == 1
  assert runner._failure_cell(f) == [1, f"after {f.after_steps} steps"]
  c = serve.get_config()
  c.fail_after_steps, c.fail_times = (), (4.0,)   # wall clock, as an option
  (f,) = runner.failures_of(c)
  assert f.time_s == 4.0 and runner._failure_cell(f) == [1, 4.0]
  (f,) = runner.failures_of(serve_tiny.get_config())
  assert f.time_s == 0.05


def test_run_warnings_name_what_is_wrong():
  fails = runner.failures_of(serve.get_config())
  idle = RecoveryEvent(stage=1, strategy="replica", failed_at=0.4, detected_at=0.9,
                       lost_requests=0)
  busy = RecoveryEvent(stage=1, strategy="replica", failed_at=0.4, detected_at=0.9,
                       lost_requests=3, restored_microbatches=1)
  (w,) = runner._run_warnings(_res([idle]), fails, {})
  assert "hit no generated work" in w
  assert runner._run_warnings(_res([busy]), fails, {}) == []
  (w,) = runner._run_warnings(_res([]), fails, {})
  assert "never fired" in w
  (w,) = runner._run_warnings(_res([busy]), [], {})   # a "failure-free" run that recovered
  assert "1 recoveries but 0 failure(s) injected" in w
  (w,) = runner._run_warnings(_res([busy]), fails, {"paced_overruns": 5})
  assert "NOT a paced result" in w


def _row(strategy, seed, warnings=()):
  return {"strategy": strategy, "seed": seed, "rate": 2.0, "completed": 12,
          "request_throughput": 1.5, "norm_latency_p50_s_per_tok": 0.01,
          "norm_latency_p99_s_per_tok": 0.02, "mean_e2el_ms": 900.0,
          "total_recomputed_tokens": 0, "warnings": list(warnings)}


def test_runs_table_is_one_line_per_run_and_the_comparison_counts_warnings():
  rows = [_row("failure-free", 0), _row("replica", 0, ["the failure hit no work"]),
          _row("replica", 1)]
  table = runner.runs_table(rows).splitlines()
  assert len(table) == 2 + len(rows)   # header, rule, one line per run
  assert table[3].startswith("replica") and table[3].rstrip().endswith("1")
  md = runner.comparison_table(rows)
  assert "| failure-free | 2 | 1 |" in md and "1 of 2 runs" in md
  (few, warned) = runner._comparison_warnings(rows, seeds=(0, 1))
  assert "only 2 seed(s)" in few and "1 of 3 runs" in warned
  assert runner._comparison_warnings([_row("replica", s) for s in range(3)], (0, 1, 2)) == []
  line = runner.run_line(rows[1], "replica_seed0_rate2")
  assert "\n" not in line and "1 WARNING" in line


def test_no_failing_stage_means_no_failure_whatever_the_trigger_defaults(tmp_path, monkeypatch):
  class Built(Exception):
    pass

  def build(c):
    assert not c.fail_after_steps and not c.fail_times
    raise Built
  monkeypatch.setattr(runner, "build_model", build)
  c = serve_tiny.get_config()
  c.program, c.fail_stages, c.fail_after_steps = "fake", (), (40,)   # the serve.py default
  with pytest.raises(Built):   # validated: the trigger lists pair with no stage
    runner.run_experiment(c, str(tmp_path / "o"), log=None)
