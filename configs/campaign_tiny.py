"""A seconds-long version of `configs/campaign.py` for tests: local runtime only."""

from configs import campaign


def get_config():
  c = campaign.get_config()
  c.scenarios = 10
  c.min_fired = 0
  c.depths = (2, 3)
  c.microbatch_sizes = (2,)
  c.strategies = ("replica,snapshot,reprefill", "snapshot", "restart")
  c.model_depths = (2,)
  c.ray_scenarios = 0
  c.smollm2_scenarios = 0
  c.min_judged = 1
  return c
