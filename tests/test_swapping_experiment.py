"""End to end: `experiments/swapping.py` on its tiny config writes its files, with both systems
(no swapping at B, swapping at 2B under one budget), tokens equal to the oracle, within budget."""

import json
import os

import pytest

from configs import swapping_tiny
from experiments import swapping


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_swapping_experiment_tiny(tmp_path):
  rows = swapping.run(swapping_tiny.get_config(), str(tmp_path), log=lambda *a: None)
  for name in ("rows.jsonl", "summary.txt", "rate_opt66b_a100.png", "context_sweep.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  with open(tmp_path / "rows.jsonl") as f:
    assert [json.loads(line) for line in f] == rows
  rate = [r for r in rows if r["kind"] == "rate"]
  assert {r["swapping"] for r in rate} == {False, True}
  by = {r["swapping"]: r for r in rate}
  assert by[True]["batch"] == 2 * by[False]["batch"] == 4
  assert all(r["tokens_identical"] and r["within_budget"] for r in rate)
  sweep = [r for r in rows if r["kind"] == "context_sweep"]
  # A short prompt: the swap-in hides and swapping pays; a long one: it does not.
  short, long = sorted(sweep, key=lambda r: r["prompt_len"])
  assert short["swap_hides"] and short["gain"] > 1 and short["auto_choice"]
  assert not long["swap_hides"] and long["gain"] < 1 and not long["auto_choice"]
