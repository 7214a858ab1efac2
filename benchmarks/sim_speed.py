"""How long the simulator and the CPU measurement take: the wall times unit tests no longer assert.

  python benchmarks/sim_speed.py [--runs=3] [--requests=1000]

1. sim_paper_scale_s: `sim.simulate_colocated` of OPT-66B (float16, A100-80GB roofline, 2 GPUs
   per machine) over 4 stages, microbatch 8, --requests requests of 1000 prompt tokens arriving
   at 0.5 requests/s (the run `tests/test_sim.py::test_paper_scale_run` checks for correctness).
   The simulator backs the planner's sweeps and paper-scale experiments; target < 10 s.
2. measure_cpu_s: `costmodel.measure_cpu()`, run whenever the hardware "this_cpu" is named;
   target < 1 s.

Each figure is the median of --runs runs (other jobs share this machine's cores). The last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dejavu_jax import costmodel as cm  # noqa: E402
from dejavu_jax.config import get_model_config  # noqa: E402
from dejavu_jax.sim import make_requests, simulate_colocated  # noqa: E402

SIM_TARGET_S, MEASURE_CPU_TARGET_S = 10.0, 1.0


def median_time(fn, runs: int) -> float:
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--requests", type=int, default=1000)
  args = parser.parse_args()

  cost = cm.roofline(get_model_config("opt_66b", dtype="float16"), "a100_80gb",
                     gpus_per_machine=2)
  reqs = make_requests(0.5, args.requests, prompt_len=1000, seed=0)

  def simulate():
    res = simulate_colocated(cost, reqs, 4, batch_size=8)
    assert res.summary["num_requests"] == args.requests

  sim_s = median_time(simulate, args.runs)
  print(f"simulate_colocated, {args.requests} requests: {sim_s:.3f} s", flush=True)
  cpu_s = median_time(cm.measure_cpu, args.runs)
  print(f"measure_cpu: {cpu_s:.3f} s", flush=True)
  # The simulator's own wall time is measured (what it simulates is not reported here).
  kind = {k: "measured" for k in ("sim_paper_scale_s", "sim_within_target", "measure_cpu_s",
                                  "measure_cpu_within_target")}
  print(json.dumps(dict(
      runs=args.runs, requests=args.requests,
      sim_paper_scale_s=sim_s, sim_target_s=SIM_TARGET_S, sim_within_target=sim_s < SIM_TARGET_S,
      measure_cpu_s=cpu_s, measure_cpu_target_s=MEASURE_CPU_TARGET_S,
      measure_cpu_within_target=cpu_s < MEASURE_CPU_TARGET_S, kind=kind)))


if __name__ == "__main__":
  main()
