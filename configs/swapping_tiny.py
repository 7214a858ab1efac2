"""A seconds-long version of `configs/swapping.py`: one paced B-vs-2B run and a two-point legacy
sweep (the legacy study's plumbing) and a two-point paper sweep, for tests."""

from configs import swapping


def get_config():
  c = swapping.get_config("legacy")
  c.variant = "tiny"
  c.context_sweeps = ("legacy", "paper")
  c.paper_systems = ("opt66b_a100x2",)
  c.paper_prompts = (16, 1000)
  c.paper_microbatches = 24
  c.output_mean = 20.0
  c.systems = ("opt66b_a100",)
  c.real_prompt_len = 8
  c.output_len = 8
  c.batch_without = 2
  c.loads = (0.9,)
  c.num_microbatches = 4
  c.time_scale = 0.5
  c.sweep_prompts = (16, 1024)
  c.sweep_output_len = 16
  return c
