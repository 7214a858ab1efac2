"""The simulate experiment runs end to end on the tiny config and writes results and plots."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_simulate_experiment_tiny(tmp_path):
  out = tmp_path / "sim"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.simulate", "--config=configs/simulate_tiny.py",
       f"--output_dir={out}", "--config.num_requests=30"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
  kinds = {r["kind"] for r in rows}
  assert kinds == {"rate_sweep", "failure", "planner"}
  sweep = [r for r in rows if r["kind"] == "rate_sweep"]
  assert all(r["num_requests"] == 30 for r in sweep)
  # Both systems are in the data the plot draws (the baseline was once overwritten by the
  # colocated simulator's own "system" name and vanished from the plot).
  assert {r["system"] for r in sweep} == {"baseline", "disaggregated"}
  assert not any("ttft_p50" in r or "mean_itl_ms" in r for r in sweep)  # one set of units
  failures = [r for r in rows if r["kind"] == "failure"]
  assert {r["strategy"] for r in failures} == {"restart", "replica", "snapshot", "reprefill"}
  assert all(len(r["recoveries"]) == 1 for r in failures)
  assert (out / "latency_vs_rate.png").stat().st_size > 0
  assert (out / "failure_timeline.png").stat().st_size > 0
