"""The planner's table and the simulated makespan: baseline (colocated D = machines), baseline
with data-parallel replicas (the best colocated plan), and the planner's disaggregated split.

`get_config("tiny")` is a seconds-long version for tests.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  # "model:hardware:machines"
  c.rows = ("opt_13b:v100_16gb:4", "opt_30b:a100_80gb:2", "opt_66b:a100_80gb:4",
            "opt_30b:v100_16gb:8", "bloom_176b:a100_80gb:8")
  c.gpus_per_machine = 2
  c.prompt_len = 1000
  c.output_len = 250
  c.batch_size = 8
  c.batch_sizes = (4, 8, 16)
  c.makespan_requests = 256          # all waiting at t=0; makespan = last finish
  if arg == "tiny":
    c.rows = ("opt_1.3b:a100_80gb:2",)
    c.prompt_len = 128
    c.output_len = 20
    c.batch_sizes = (8,)
    c.makespan_requests = 32
  return c
