"""Planner and simulator fidelity: per-microbatch output lengths, the paper's microbatching in
the disaggregated simulator, the overlapped host-to-device load, memory sizes and reserve, the
binding memory constraint, host slots, and the planner CLI's --json."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dejavu_jax import costmodel as cm
from dejavu_jax import planner, sim
from dejavu_jax.config import get_model_config

MODEL = get_model_config("opt_125m")   # 12 layers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cost(y=0.05, t=0.001):
  return cm.TableCostModel(MODEL, prompt=y, token=t)


def test_a100_80gb_is_80_gib():
  assert cm.HARDWARE["a100_80gb"].memory_bytes == 80 * 2**30 == pytest.approx(85.9e9, rel=1e-3)


def test_per_microbatch_output_lengths_and_equal_option():
  wl = planner.Workload(100, 200, 4)
  assert wl.output_dist == "per_microbatch"
  lens = np.array([r.output_len for r in planner.saturated_workload(wl, 4, 50)])
  blocks = lens.reshape(50, 4)
  assert (blocks == blocks[:, :1]).all()                 # rows of a microbatch share it
  assert len(set(blocks[:, 0])) > 10                     # microbatches differ
  assert 100 < lens.mean() < 260
  eq = planner.saturated_workload(planner.Workload(100, 200, 4, "equal"), 4, 50)
  assert {r.output_len for r in eq} == {200}
  with pytest.raises(ValueError, match="output_dist"):
    planner.Workload(100, 200, 4, "sometimes")


def test_host_to_device_load_is_overlapped_not_per_stage():
  """One microbatch, two token stages, a slow host link: the loads run at admission on both
  stages at once, so the finish moves by one load, not by one load per stage."""
  cost = _cost(0.01, 0.001)
  reqs = lambda: sim.saturated_requests(2, 32, 5)  # noqa: E731
  slow = cm.Link("slow", 1e6, 0.0)
  load = cm.swap_in_time(slow, MODEL, 6, 2, 32)
  base = sim.simulate_disaggregated(cost, reqs(), 1, 2, batch_size=2)
  loaded = sim.simulate_disaggregated(cost, reqs(), 1, 2, batch_size=2, host_link=slow)
  delay = loaded.records[0].finish - base.records[0].finish
  assert delay == pytest.approx(load, rel=1e-6)
  assert load > 0.01


def test_disaggregated_simulator_has_paper_microbatching():
  cost = _cost()
  reqs = lambda: [sim.RequestRecord(i, 0.0, 32, 5 + (i % 2)) for i in range(8)]  # noqa: E731
  greedy = sim.simulate_disaggregated(cost, reqs(), 1, 2, batch_size=4)
  paper = sim.simulate_disaggregated(cost, reqs(), 1, 2, batch_size=4, microbatching="paper")
  assert paper.info["microbatching"] == "paper"
  assert len(greedy.mb_finish_times) == 2 and len(paper.mb_finish_times) == 8


def test_host_slots_default_does_not_starve_a_deep_prompt_side():
  cost = _cost(0.05, 0.0001)   # prompt-bound: 3 prompt stages feed 1 token stage
  run = lambda slots: sim.simulate_disaggregated(  # noqa: E731
      cost, sim.saturated_requests(80, 32, 3), 3, 1, batch_size=2, host_slots=slots)
  default = run(None)
  assert default.info["host_slots"] == 4
  old = run(2)   # the former default 2 Dt
  assert default.end_time < old.end_time * 0.9


def test_memory_reserve_and_binding_constraint():
  model = get_model_config("opt_66b", dtype="float16")
  wl = planner.Workload(1000, 250, 8)
  _, tight = planner.plan_report(model, 4, "a100_80gb", wl, batch_sizes=(8,), reserve=0.3)
  _, loose = planner.plan_report(model, 4, "a100_80gb", wl, batch_sizes=(8,), reserve=0.05)
  for s, r in ((tight, 0.3), (loose, 0.05)):
    b = s["memory_binding"]
    assert s["memory_reserve"] == r
    assert b["usable_bytes"] == pytest.approx(2 * 80 * 2**30 * (1 - r))
    assert b["headroom_bytes"] == pytest.approx(b["usable_bytes"] - b["used_bytes"])
    assert b["headroom_bytes"] == min(u["usable_bytes"] - u["used_bytes"] for u in b["all"])
  with pytest.raises(ValueError, match="reserve"):
    planner.plan_report(model, 4, "a100_80gb", wl, reserve=1.0)


@pytest.mark.timeout(120)
def test_planner_cli_json_and_stream_link():
  proc = subprocess.run(
      [sys.executable, "-m", "dejavu_jax.planner", "--model=opt_1.3b", "--machines=2",
       "--prompt_len=256", "--output_len=32", "--batch_sizes=4", "--json",
       "--stream_link=inter_vm_32gbps", "--memory_reserve=0.2"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["stream_link"] == "inter_vm_32gbps" and out["memory_reserve"] == 0.2
  assert out["memory_binding"]["constraint"]


def test_simulated_workload_shares_one_length_per_microbatch():
  reqs = sim.make_requests(2.0, 20, 100, seed=3, per_microbatch=4)
  lens = np.array([r.output_len for r in reqs]).reshape(5, 4)
  assert (lens == lens[:, :1]).all() and len(set(lens[:, 0])) > 1
  per_request = [r.output_len for r in sim.make_requests(2.0, 20, 100, seed=3)]
  assert len(set(per_request[:4])) > 1   # without it, rows of a microbatch differ
