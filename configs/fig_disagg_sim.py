"""Fig 8 from the simulator: "DéjàVu Dp-Dt vs Baseline-D", normalized latency against request
rate, OPT-66B on 4 and BLOOM-176B on 8 machines of 2 x A100-80GB, plus a sensitivity panel over
the prompt -> token link bandwidth (which split pays at which bandwidth).

Variants (`--config=configs/fig_disagg_sim.py:VARIANT`):
  paper (default): the paper's setting (dejavu_jax/studies/paper.py): prompt 1000, microbatch 8,
    LMSys lengths clamped to [2, 950], one length per microbatch; the baseline of depth D vs the
    planner's split; rates geometric from `min(loads)` x the lower capacity to `max(loads)` x the
    higher, capacities simulated on the same workload; headline: throughput at equal median
    normalized latency.
  legacy: the earlier default: one length per request (lognormal, median 150), loads as
    fractions of a capacity computed with equal lengths, every memory-feasible split.
  tiny: seconds, for tests.
"""

import ml_collections


def get_config(arg=None):
  variant = arg or "paper"
  if variant not in ("paper", "legacy", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: paper, legacy or tiny")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.scenarios = ("opt_66b:a100_80gb:4", "bloom_176b:a100_80gb:8")   # model:hardware:machines
  c.hardware = "a100_80gb"           # the machines of every scenario (checked)
  c.gpus_per_machine = 2
  c.prompt_len = 1000
  c.batch_size = 8
  c.output_mean = 214.5              # the LMSys-Chat-1M fit (dejavu_jax/workload.py)
  c.output_median = 150.0            # legacy only (per-request lognormal)
  c.output_min = 2
  c.output_max = 950
  c.lengths = "per_microbatch"       # | "per_request" (legacy)
  c.capacity = "same_workload"       # | "equal_lengths" (legacy)
  c.systems = "planner"              # baseline + the planner's split | "feasible": every split
  c.num_requests = 400
  c.seed = 0
  c.loads = (0.3, 0.5, 0.7, 0.85, 1.0, 1.15, 1.3)   # rates span min x low cap .. max x high cap
  c.slo_factor = 2.0                 # latency bound = this x the highest light-load p50
  c.sensitivity_gbps = (10.0, 20.0, 40.0, 100.0, 400.0)
  # The prompt -> token link measured by benchmarks/transport.py, one more sensitivity point:
  # "auto" = costmodel.DEFAULT_LINK_TABLE when it exists, a path (must exist), "none".
  c.links_table = "auto"
  if variant == "legacy":
    c.lengths = "per_request"
    c.capacity = "equal_lengths"
    c.systems = "feasible"
    c.num_requests = 200
    c.loads = (0.1, 0.2, 0.3, 0.45, 0.6)
    c.sensitivity_gbps = ()
  if variant == "tiny":
    c.scenarios = ("opt_1.3b:a100_80gb:4",)
    c.prompt_len = 128
    c.output_mean = 20.0
    c.output_max = 89
    c.num_requests = 48
    c.loads = (0.5, 1.2)
    c.sensitivity_gbps = (10.0, 100.0)
    c.links_table = "none"   # the tests do not depend on what results/ holds
  return c
