"""The paper's failure figures (DéjàVu's fault-tolerance section), in the paper's setting.

1. Cumulative latency over time and total runtime of OPT-66B on 4 stages of 2 x A100-80GB
   (tensor 2 per stage), microbatch 1, prompt 500, 1000 new tokens, deterministic arrivals (the
   job's requests submitted at t = 0, so the total runtime is the job's, and every lost step
   shows in it; "fixed" spaces them at `load` x the failure-free capacity instead):
   failure-free vs restart (the whole job: the baseline) vs reprefill vs replica (DéjàVu) vs
   snapshot,
   - "one": stage `fail_stage` fails after its worker's 1200th step (prompt steps counted, as the
     engine's `FailureSpec.after_steps`: with 4 microbatches in flight, ~300 tokens into each);
   - "series": three failures at 600, 1200 and 1800 s (stages 1, 2, 3).
2. "single": end-to-end latency of one GPT2-1.5B request (500 + 500 tokens, 2 stages) whose last
   stage fails at token 250. Its recovery constants are the paper's controller scaled to the
   request (the 1 s / 3 s heartbeat would alone outlast a 1.3 s request, while the paper reports
   that one failure nearly doubles this request's latency): heartbeats every 0.1 s, dead after
   0.3 s (the paper's 1:3), a standby spare that holds the stage's weights and starts in 0.1 s.
Each scenario is also replayed by the paced engine (`paced`: fake program, chunked tokens,
compressed time; dejavu_jax/studies/failstudy.py) beside the simulator on the same workload.

Variants: `get_config("v1")` the settings before issue 23 (Poisson arrivals at 0.25 req/s, 32
requests, one failure at 200 s, three at 100/200/300 s, the GPT2 request failing at its
midpoint in time under the 1 s / 3 s controller, a 5 s start-up and weights over NVMe; no paced
replay); `get_config("tiny")` a seconds-long version for tests.
"""

import ml_collections

placeholder = ml_collections.config_dict.placeholder


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.variant = arg or "paper"
  c.model = "opt_66b"
  c.hardware = "a100_80gb"
  c.gpus_per_machine = 2              # tensor 2 per stage
  c.num_stages = 4
  c.microbatch_size = 1
  c.prompt_len = 500
  c.output_len = 1000
  c.arrivals = "zero"                 # "zero" (all at 0) | "fixed" (1 / rate apart) | "poisson"
  c.load = 1.0                        # fixed/poisson: rate = load x the failure-free capacity ...
  c.rate = placeholder(float)         # ... unless a rate (req/s) is given
  c.num_requests = 16                 # the single-failure run
  c.series_num_requests = 150         # the three-failure run (~1950 s); None: num_requests
  c.seed = 0
  c.strategies = ("restart", "reprefill", "replica", "snapshot")
  c.snapshot_every = 50               # steps of a worker between snapshots
  c.fail_stage = 1
  c.fail_after_steps = 1200           # the single failure: after the stage's 1200th step ...
  c.fail_time = placeholder(float)    # ... or at a time (s); exactly one of the two
  c.series_times = (600.0, 1200.0, 1800.0)   # stages cycle from fail_stage
  # Recovery (seconds): the paper's controller (1 s heartbeats, dead after 3 s), a spare started
  # in 5 s that loads its stage's weights (None: over NVMe at 2 GB/s, 16 s for OPT-66B's 16
  # layers). restart_scope "job": restart = the whole job (the paper's baseline).
  c.heartbeat_s = 1.0
  c.heartbeat_timeout_s = 3.0
  c.replacement_start_s = 5.0
  c.weight_load_s = placeholder(float)
  c.restart_scope = "job"
  # One request, a failure mid-generation.
  c.single_model = "gpt2_xl"
  c.single_stages = 2
  c.single_prompt_len = 500
  c.single_output_len = 500
  c.single_fail_token = 250           # None: at the failure-free run's midpoint in time
  c.single_heartbeat_s = 0.1
  c.single_heartbeat_timeout_s = 0.3
  c.single_replacement_start_s = 0.1
  c.single_weight_load_s = 0.0        # a standby spare (None: over NVMe)
  # The paced engine's replays (failstudy.Replay): c paper decode steps per paced step, wall
  # seconds per modelled second; a scenario not listed is simulated only.
  c.paced = ml_collections.ConfigDict()
  c.paced.scenarios = ("one", "series", "single")
  # ~50 ms of wall time per paced step (a fake step computes in ~2 ms here, 4 stages sharing
  # 2 cores with replication or snapshot writes beside them), 5 to 17 s per run.
  c.paced.one_chunk = 100
  c.paced.one_time_scale = 1 / 25
  c.paced.series_chunk = 500
  c.paced.series_time_scale = 1 / 120
  c.paced.single_chunk = 10
  c.paced.single_time_scale = 3.0
  c.paced.real_prompt_len = 16
  c.paced.heartbeat_s = 0.01          # the engine's own detection, wall seconds
  c.paced.heartbeat_timeout_s = 0.04
  c.paced.target = 0.10               # paced vs simulator, relative error of the total runtime
  if arg == "v1":
    c.arrivals = "poisson"
    c.rate = 0.25
    c.num_requests = 32
    c.series_num_requests = None
    c.fail_after_steps = None
    c.fail_time = 200.0
    c.series_times = (100.0, 200.0, 300.0)
    c.single_fail_token = None
    c.single_heartbeat_s = 1.0
    c.single_heartbeat_timeout_s = 3.0
    c.single_replacement_start_s = 5.0
    c.single_weight_load_s = None
    c.paced.scenarios = ()
  elif arg == "tiny":
    c.model = "opt_1.3b"
    c.num_requests = 8
    c.series_num_requests = 64
    c.output_len = 60
    c.prompt_len = 64
    c.fail_after_steps = 60
    c.series_times = (0.3, 0.9, 1.5)
    c.snapshot_every = 10
    c.replacement_start_s = 0.2
    c.heartbeat_s = 0.1
    c.heartbeat_timeout_s = 0.3
    c.single_model = "gpt2"
    c.single_prompt_len = 64
    c.single_output_len = 64
    c.single_fail_token = 32
    c.single_heartbeat_s = 0.01
    c.single_heartbeat_timeout_s = 0.03
    c.single_replacement_start_s = 0.01
    c.paced.scenarios = ("single",)
    c.paced.single_chunk = 8
    c.paced.single_time_scale = 4.0
  elif arg not in (None, "paper"):
    raise ValueError(f"unknown fig_failures variant {arg!r}: 'paper' (default), 'v1', 'tiny'")
  return c
