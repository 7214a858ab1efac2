"""experiments/disaggregation.py on its tiny config: every system (baseline, the planner's split)
runs paced and simulated at every rate, tokens identical to `fake_generate`, files written."""

import json

import pytest

from configs import disaggregation_tiny
from experiments import disaggregation


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_disaggregation_experiment_tiny(tmp_path):
  config = disaggregation_tiny.get_config()
  rows = disaggregation.run(config, str(tmp_path))
  lines = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert lines == json.loads(json.dumps(rows))
  systems = {r["system"] for r in rows}
  assert systems == {"colocated D=2", "disaggregated 1+1"}
  for system in systems:
    for source in ("paced", "sim"):
      pts = [r for r in rows if r["system"] == system and r["source"] == source]
      assert sorted(r["rate"] for r in pts) == sorted(config.rates)
      assert all(r["completed"] == config.num_microbatches * config.batch_size for r in pts)
  assert all(r["tokens_identical"] for r in rows if r["source"] == "paced")
  assert (tmp_path / "latency_vs_rate.png").stat().st_size > 0
