"""The prompt/token step-time ratio Y/t (what disaggregation feeds on): one prompt step over one
token step at the same context, per microbatch size 1-8 and prompt length 250-2000.

Variants: paper (default): modelled from the roofline cost model for OPT-66B and BLOOM-176B on
machines of 2 x A100-80GB and OPT-30B on 2 x V100-16GB (per stage of `stages`), plus a measured
grid on this CPU for a small model (OPT-125M-shaped, 2 layers, float32); tiny: seconds (tests).
"""

import ml_collections


def get_config(arg=None):
  variant = arg or "paper"
  if variant not in ("paper", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: paper or tiny")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.models = ("opt_66b:a100_80gb:4", "bloom_176b:a100_80gb:8", "opt_30b:v100_16gb:4")
  c.hardware = "a100_80gb"
  c.gpus_per_machine = 2
  c.batch_sizes = (1, 2, 3, 4, 5, 6, 7, 8)
  c.prompt_lens = (250, 500, 750, 1000, 1250, 1500, 1750, 2000)
  c.prompt_len = 1000           # the headline's prompt
  c.batch_size = 8              # the headline's microbatch
  c.measured_model = "opt_125m"
  c.measured_layers = 2
  c.measured_batches = (1, 8)
  c.measured_prompts = (250, 1000)
  c.measured_runs = 2
  c.measured_overrides = ml_collections.ConfigDict()
  if variant == "tiny":
    c.batch_sizes = (1, 8)
    c.prompt_lens = (250, 1000)
    c.measured_batches = (1, 2)
    c.measured_prompts = (16, 32)
    c.measured_runs = 1
    c.measured_overrides = {"hidden_size": 64, "num_heads": 4, "ffn_dim": 128, "vocab_size": 128}
  return c
