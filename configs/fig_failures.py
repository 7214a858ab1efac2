"""The paper's failure figures, simulated (OPT-66B does not fit this machine).

1. Cumulative latency over time of OPT-66B on 4 A100 stages (microbatch 1, prompt 500, 1000
   new tokens): failure-free vs restart vs replica vs snapshot vs reprefill, with one failure
   and with a series of failures.
2. End-to-end latency of one GPT2-1.5B request (500 + 500 tokens) with one failure
   mid-generation, per strategy.

`get_config("tiny")` is a seconds-long version for tests.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.model = "opt_66b"
  c.hardware = "a100_80gb"
  c.gpus_per_machine = 2
  c.num_stages = 4
  c.microbatch_size = 1
  c.prompt_len = 500
  c.output_len = 1000
  c.rate = 0.25                       # req/s (open loop, Poisson)
  c.num_requests = 32
  c.seed = 0
  c.strategies = ("restart", "replica", "snapshot", "reprefill")
  c.snapshot_every = 50               # steps between snapshots
  c.fail_stage = 1
  c.fail_time = 200.0                 # one failure (s), mid-generation of the requests in flight
  c.series_times = (100.0, 200.0, 300.0)   # a series of failures (s); stages cycle from fail_stage
  # Recovery parameters (seconds). restart_scope "job": restart = the whole job restarts (every
  # stage replaced, weights reloaded), as a serving system without per-stage recovery does.
  c.heartbeat_s = 1.0
  c.heartbeat_timeout_s = 3.0
  c.replacement_start_s = 5.0
  c.weight_load_s = ml_collections.config_dict.placeholder(float)   # None: over NVMe, 2 GB/s
  c.restart_scope = "job"
  # One request, failure mid-generation.
  c.single_model = "gpt2_xl"
  c.single_stages = 2
  c.single_prompt_len = 500
  c.single_output_len = 500
  if arg == "tiny":
    c.model = "opt_1.3b"
    c.num_requests = 8
    c.output_len = 60
    c.prompt_len = 64
    c.rate = 4.0
    c.fail_time = 1.0
    c.series_times = (0.5, 1.0, 1.5)
    c.snapshot_every = 10
    c.replacement_start_s = 0.2
    c.heartbeat_s = 0.1
    c.heartbeat_timeout_s = 0.3
    c.single_model = "gpt2"
    c.single_prompt_len = 64
    c.single_output_len = 64
  return c
