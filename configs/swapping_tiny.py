"""A seconds-long version of `configs/swapping.py` for tests."""

from configs import swapping


def get_config():
  c = swapping.get_config()
  c.systems = ("opt66b_a100",)
  c.prompt_len = 8
  c.output_len = 8
  c.batch_without = 2
  c.loads = (0.9,)
  c.num_microbatches = 4
  c.time_scale = 0.5
  c.sweep_prompts = (16, 1024)
  c.sweep_output_len = 16
  return c
