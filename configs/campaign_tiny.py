"""A seconds-long version of `configs/campaign.py` for tests: local runtime only."""

from configs import campaign


def get_config():
  c = campaign.get_config()
  c.injections = 10
  c.depths = (2, 3)
  c.microbatch_sizes = (2,)
  c.strategies = ("replica,snapshot,reprefill", "snapshot", "restart")
  c.model_depths = (2,)
  c.ray_injections = 0
  c.smollm2_injections = 0
  c.min_judged = 1
  return c
