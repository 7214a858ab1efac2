"""The planner and the appendix's cost/makespan comparison on a trace: Baseline (colocated over
every machine), Baseline-DP (the best colocated plan with data-parallel replicas) and DéjàVu
(the planner's best prompt/token split), with the planner's recommendation both with and
without data-parallel replicas.

Variants (`--config=configs/fig_planner.py:VARIANT`):
  paper (default): prompt 1000, microbatch 8, LMSys lengths (mean 214.5 -> the planner's
    output_len 214, clamped to [2, 950], one per microbatch) for planning and for the trace; the
    trace: `trace_requests` Poisson arrivals at `trace_load` x the Baseline's capacity.
  legacy: the earlier default: output 250 for the planner, makespan of 256 requests all waiting
    at t=0 with equal lengths, more clusters.
  tiny: seconds, for tests.
"""

import ml_collections


def get_config(arg=None):
  variant = arg or "paper"
  if variant not in ("paper", "legacy", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: paper, legacy or tiny")
  c = ml_collections.ConfigDict()
  c.variant = variant
  # "model:hardware:machines"
  c.rows = ("opt_66b:a100_80gb:4", "bloom_176b:a100_80gb:8")
  c.hardware = "a100_80gb"
  c.gpus_per_machine = 2
  c.prompt_len = 1000
  c.output_mean = 214.5              # the LMSys fit; the planner plans for round(mean)
  c.output_max = 950
  c.lengths = "per_microbatch"       # | "equal" (legacy)
  c.batch_size = 8
  c.batch_sizes = (4, 8, 16)
  c.trace = "poisson"                # | "saturated" (legacy: every request waiting at t=0)
  c.trace_requests = 320
  c.trace_load = 1.5                 # x the Baseline's capacity: the trace overloads it
  c.machine_hour_usd = 2 * 3.67      # a machine of 2 A100-80GB at on-demand ~$3.67/GPU-hour
  c.seed = 0
  if variant == "legacy":
    c.rows = ("opt_13b:v100_16gb:4", "opt_30b:a100_80gb:2", "opt_66b:a100_80gb:4",
              "opt_30b:v100_16gb:8", "bloom_176b:a100_80gb:8")
    c.output_mean = 250.0
    c.lengths = "equal"
    c.trace = "saturated"
    c.trace_requests = 256
  if variant == "tiny":
    c.rows = ("opt_1.3b:a100_80gb:2",)
    c.prompt_len = 128
    c.output_mean = 20.0
    c.batch_sizes = (8,)
    c.trace_requests = 48
  return c
