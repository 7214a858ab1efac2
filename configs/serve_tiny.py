"""A seconds-long version of `configs/serve.py` for tests (tiny model, two rates)."""

from configs import serve


def get_config():
  c = serve.get_config()
  c.model_overrides = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_dim": 128,
                       "vocab_size": 128, "max_positions": 128}
  c.max_len = 64
  c.rates = (5.0, 20.0)
  c.num_requests = 6
  c.prompt_len = 8
  c.output_len = "fixed:6"
  c.max_output = 950
  c.fail_after_steps = ()         # wall clock: tests pin the failure's time
  c.fail_times = (0.05,)
  return c
