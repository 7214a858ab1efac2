"""Disaggregation from the simulator: normalized latency vs request rate, the colocated baseline
vs every memory-feasible prompt/token split, at OPT-66B and BLOOM-176B scale.

Rates are fractions of the baseline's saturated throughput (the planner's simulation), so every
model gets a sweep from light load to past saturation. `get_config("tiny")`: seconds, for tests.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.scenarios = ("opt_66b:a100_80gb:4", "bloom_176b:a100_80gb:8")   # model:hardware:machines
  c.gpus_per_machine = 2
  c.prompt_len = 1000
  c.batch_size = 8
  c.output_median = 150.0            # lognormal stand-in for the LMSys lengths
  c.output_max = 950
  c.num_requests = 200
  c.seed = 0
  c.load = (0.1, 0.2, 0.3, 0.45, 0.6)  # x the baseline's saturated throughput (equal lengths)
  if arg == "tiny":
    c.scenarios = ("opt_1.3b:a100_80gb:4",)
    c.prompt_len = 128
    c.output_median = 20.0
    c.output_max = 60
    c.num_requests = 40
    c.load = (0.5, 1.0)
  return c
