"""The streaming ablation: naive / buffered / layer-by-layer / background token streaming, per
prompt length, measured for real on this machine (OPT-1.3B-shaped layers, float32 on CPU,
batch 2; the model truncated to `compute_layers` layers so a prefill takes seconds on a CPU).

This figure is measured on this CPU and is exempt from the paper's GPU setting: at the paper's
microbatch 8 and prompt 1000 one CPU prefill of these layers takes tens of seconds and the
ablation runs ~15 per prompt length (the paper's setting of streaming is measured by
configs/fig_stream_overhead.py: prompt 500, 500 new tokens). `get_config("tiny")`: a tiny model
and two short prompts, for tests.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.variant = "tiny" if arg == "tiny" else "cpu"
  c.model = "opt_1.3b"
  c.dtype = "float32"                 # XLA:CPU emulates bfloat16 matmuls (minutes per prefill)
  # A 2-layer OPT-1.3B prefill over batch x prompt tokens takes seconds on this CPU and the
  # ablation runs ~15 of them per prompt length: batch 2 keeps the whole figure to minutes.
  c.batch = 2
  c.compute_layers = 2
  c.prompt_lens = (128, 256, 512)
  c.runs = 2                          # medians of this many runs
  c.model_overrides = ml_collections.ConfigDict()   # ModelConfig fields replaced in the preset
  if arg == "tiny":
    c.model = "opt_125m"
    c.model_overrides = {"hidden_size": 64, "num_heads": 4, "ffn_dim": 128, "vocab_size": 128}
    c.dtype = "float32"
    c.batch = 2
    c.compute_layers = 2
    c.prompt_lens = (16,)              # one length keeps the test to seconds (compiles dominate)
    c.runs = 1
  return c
