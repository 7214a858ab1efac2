"""A seconds-long version of `configs/simulate.py` for tests."""

from configs import simulate


def get_config():
  c = simulate.get_config()
  c.model = "opt_1.3b"
  c.output_median = 20.0
  c.output_max = 60
  c.num_requests = 40
  c.rates = (2.0, 8.0)
  c.failure_rate = 4.0
  c.failure_requests = 40
  c.fail_time = 2.0
  c.planner_rows = ("opt_1.3b:a100_80gb:2",)
  c.planner_output_len = 20
  c.planner_batch_sizes = (8,)
  return c
