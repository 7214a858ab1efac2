"""The planner's data-parallel baseline served for real, seconds-long: 2 replicas of a 2-stage
pipeline (4 of the 8 virtual CPU devices) on the tiny random model, behind the least-loaded
router; replica 0's stage 1 is killed after its 12th step and recovers from its replica while
replica 1 keeps serving. Tokens are checked against the single-device greedy run.

  python -m experiments.serve --config=configs/serve_dp_tiny.py --output_dir=/tmp/dp
  ... --config.routing=round_robin --config.fail_replica=1 --config.runtime=ray
"""

from configs import serve_tiny


def get_config():
  c = serve_tiny.get_config()
  c.data_parallel = 2
  c.rates = (20.0,)
  c.num_requests = 8
  c.output_len = "fixed:16"
  c.fail_stages = (1,)
  c.fail_replica = 0
  c.fail_after_steps = (12,)      # a point of the run, whatever the machine's load
  c.fail_times = ()
  c.check_tokens = True
  return c
