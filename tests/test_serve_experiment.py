"""experiments/serve.py end to end on a tiny config: a rate sweep with a failure and recovery."""

import json
import os

import pytest

from configs import serve_tiny
from dejavu_jax.studies import runner
from dejavu_jax.metrics import read_jsonl


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_experiment_end_to_end(tmp_path):
  c = serve_tiny.get_config()
  summaries = runner.run_experiment(c, str(tmp_path), log=lambda *a: None)
  assert [(s["rate"], s["baseline"]) for s in summaries] == [
      (5.0, True), (20.0, True), (5.0, False), (20.0, False)]   # failure-free baseline first
  summaries = summaries[2:]
  for s in summaries:
    assert s["completed"] == c.num_requests and s["rejected"] == 0
    assert s["failures"] == 1
  files = set(os.listdir(tmp_path))
  assert {"summary.jsonl", "summary.txt", "recoveries.jsonl", "latency_vs_rate.png", "failure_timeline.png",
          "requests_rate5.jsonl", "requests_rate20.jsonl", "requests_failure-free_rate5.jsonl",
          "comparison.md"} <= files
  recs = read_jsonl(tmp_path / "requests_rate5.jsonl")
  assert len(recs) == c.num_requests and all(r.output_len == 6 for r in recs)
  with open(tmp_path / "recoveries.jsonl") as f:
    events = [json.loads(line) for line in f]
  assert len(events) == 2 and all(e["stage"] == 1 for e in events)


def test_mismatched_failure_lists(tmp_path):
  c = serve_tiny.get_config()
  c.fail_times = (0.1, 0.2)
  with pytest.raises(ValueError, match="fail_stages \\[1\\] and fail_times"):
    runner.run_experiment(c, str(tmp_path), log=lambda *a: None)
