"""Microbatch swapping (Fig 9): batch B without swapping vs 2B with it, per model.

Variants (`--config=configs/swapping.py:VARIANT`):
  paper (default): the paper's setting: OPT-30B on machines of 2 x V100-16GB, OPT-66B and
    BLOOM-176B on machines of 2 x A100-80GB, 4 stages, microbatch B = 8 against 2B = 16 (the
    KV memory of 4 buffers of B holds 2 of 2B), LMSys output lengths (mean 214.5, clamped to
    [2, 950], one per microbatch); saturated throughput over the prompt length (the headline at
    prompt 1000), the swap-in beside the decode step it must hide under, and the break-even
    context. Simulated (modelled), with the paper's swap unit (studies/swapstudy.py).
  legacy: the earlier default: paced engine runs (fake program) of OPT-66B on 1 A100 and OPT-30B
    on 2 V100 per stage, prompt 16 + 48 new tokens, throughput and latency vs rate, and the
    equal-length context sweep.
  tiny: seconds, for tests (a paced run, the legacy sweep and a two-point paper sweep).
"""

import ml_collections


def get_config(variant=None):
  variant = variant or "paper"
  if variant == "tiny":   # experiments/figures.py's tiny run (tests)
    from configs import swapping_tiny  # pylint: disable=g-import-not-at-top
    return swapping_tiny.get_config()
  if variant not in ("paper", "legacy"):
    raise ValueError(f"unknown variant {variant!r}: paper, legacy or tiny")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.rate_sweep = False         # paced engine runs vs rate (the legacy study)
  c.context_sweeps = ("paper",)   # of "paper", "legacy"
  c.paper_systems = ("opt30b_v100x2", "opt66b_a100x2", "bloom176b_a100x2")
  c.hardware = "a100_80gb"     # the A100 systems' machines (OPT-30B: the paper's V100 VMs)
  c.gpus_per_machine = 2
  c.stages = 4
  c.prompt_len = 1000          # the headline's prompt length
  c.batch_size = 8             # B; swapping runs 2B
  c.output_mean = 214.5        # the LMSys-Chat-1M fit, clamped to [2, 950], per microbatch
  c.output_max = 950
  c.lengths = "per_microbatch"
  c.paper_prompts = (8, 32, 128, 500, 1000, 2000)
  c.paper_microbatches = 32    # saturated microbatches per simulated point
  # The legacy study's fields (rate_sweep, context_sweeps=("legacy",)).
  c.systems = ("opt66b_a100", "opt30b_v100")
  c.real_prompt_len = 16
  c.output_len = 48
  c.batch_without = 8          # the budget admits this batch without swapping (2x with)
  c.loads = (0.5, 1.0, 2.0)   # request rate / the no-swapping saturated rate (2.0: saturated)
  c.num_microbatches = 8       # requests per run = this x the swapping batch
  c.time_scale = 3.0           # paced durations x this (real compute stays inside the steps)
  c.program = "fake"
  c.sweep_prompts = (8, 16, 32, 64, 128, 256, 512, 1024)
  c.sweep_output_len = 32
  c.seed = 0
  if variant == "legacy":
    c.rate_sweep = True
    c.context_sweeps = ("legacy",)
  return c
