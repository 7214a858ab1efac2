"""A seconds-long version of `configs/campaign.py` for tests."""

from configs import campaign


def get_config():
  c = campaign.get_config()
  c.injections = 10
  c.depths = (2, 3)
  c.microbatch_sizes = (2,)
  c.strategies = ("replica,snapshot,reprefill", "restart")
  return c
