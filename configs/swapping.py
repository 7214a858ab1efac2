"""Microbatch swapping study (`experiments/swapping.py`): B without swapping vs 2B with it.

Two modeled systems of 4 stages (OPT-66B on A100-80GB machines, OPT-30B on machines of two
V100-16GB), each with a device KV budget that holds 4 buffers of `batch_without` rows; paced
runs of the engine (fake stage program: real scheduling, hand-checkable tokens) over request
rates given as fractions of the no-swapping system's saturated throughput, and a simulated
context-length sweep showing where swapping stops paying.
"""

import ml_collections


def get_config(variant=None):
  if variant == "tiny":   # experiments/figures.py's tiny run (tests)
    from configs import swapping_tiny  # pylint: disable=g-import-not-at-top
    return swapping_tiny.get_config()
  c = ml_collections.ConfigDict()
  c.systems = ("opt66b_a100", "opt30b_v100")
  c.stages = 4
  c.prompt_len = 16
  c.output_len = 48
  c.batch_without = 8          # the budget admits this batch without swapping (2x with)
  c.loads = (0.5, 1.0, 2.0)   # request rate / the no-swapping saturated rate (2.0: saturated)
  c.num_microbatches = 8       # requests per run = this x the swapping batch
  c.time_scale = 3.0           # paced durations x this (real compute stays inside the steps)
  c.program = "fake"
  c.sweep_prompts = (8, 16, 32, 64, 128, 256, 512, 1024)
  c.sweep_output_len = 32
  c.seed = 0
  return c
