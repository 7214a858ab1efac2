"""Prompt-token disaggregation on the Ray runtime, with one SIGKILL on each side: the tiny random
model's prompt pipeline (1 actor) streams each layer's KV straight into the host slots of the
token pipeline's actors (2), the prompt actor is SIGKILLed after its 2nd prefill (its prompts
are redone) and token stage 1 (global stage 2) after its 20th step (recovered from its replica).
The run prints both kills and the recovery timeline, and checks every completion against the
single-device greedy run (exit code 1 if one differs):

  python -m experiments.serve --config=configs/serve_ray_disagg_tiny.py --output_dir=/tmp/rd
"""

from configs import serve_tiny


def get_config():
  c = serve_tiny.get_config()
  c.model_overrides = dict(c.model_overrides, num_layers=4)
  c.runtime = "ray"
  c.prompt_stages, c.token_stages = 1, 2
  c.microbatch_size = 2
  c.recovery = "replica"
  c.rates = (20.0,)
  c.num_requests = 8
  c.output_len = "fixed:24"
  c.fail_stages = (0, 2)          # prompt stage 0, token stage 1
  c.fail_after_steps = (2, 20)
  c.fail_times = ()
  c.heartbeat_s = 0.1
  c.heartbeat_timeout_s = 2.0     # Ray reports each death first; heartbeats are the backstop
  c.check_tokens = True
  return c
