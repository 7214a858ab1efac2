"""`configs/serve_tiny.py` on the Ray runtime: each stage an actor process, stage 1 SIGKILLed
mid-run and recovered from its replica (tests, and a quick look at the recovery timeline)."""

from configs import serve_tiny


def get_config():
  c = serve_tiny.get_config()
  c.runtime = "ray"
  c.rates = (5.0,)
  c.output_len = "fixed:24"
  c.fail_times = (0.6,)
  c.heartbeat_s = 0.1
  c.heartbeat_timeout_s = 2.0     # Ray reports the death first; heartbeats are the backstop
  return c
