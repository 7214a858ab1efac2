"""Streaming overhead, measured on this machine (no pipeline): one model generates `new_tokens`
after a `prompt_len`-token prompt while every step's KV delta (and the prompt block once) is
streamed on a background thread to host memory, to a file on local disk, or to another process,
against the same generation without streaming.

Variants: paper (default): prompt 500, 500 new tokens (the paper's overhead experiment), a small
model (OPT-125M, float32 on CPU), batch 1 (an OPT-125M decode step at batch 8 takes ~80 ms on
this CPU when quiet: 8 generations of 500 steps would take ~6 of the figure run's 40 minutes;
`--config.batch_size=8` runs it); tiny: seconds, for tests.
"""

import ml_collections


def get_config(arg=None):
  variant = arg or "paper"
  if variant not in ("paper", "tiny"):
    raise ValueError(f"unknown variant {variant!r}: paper or tiny")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.model = "opt_125m"
  c.dtype = "float32"
  c.model_overrides = ml_collections.ConfigDict()   # ModelConfig fields replaced in the preset
  c.prompt_len = 500
  c.new_tokens = 500
  c.batch_size = 1
  c.sinks = ("host", "disk", "process")
  c.runs = 2                     # medians of this many runs per mode (modes interleaved)
  c.seed = 0
  if variant == "tiny":
    c.model_overrides = {"hidden_size": 64, "num_heads": 4, "ffn_dim": 128, "vocab_size": 128,
                         "num_layers": 2}
    c.prompt_len = 16
    c.new_tokens = 16
    c.batch_size = 2
    c.runs = 1
  return c
