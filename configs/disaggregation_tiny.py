"""A few seconds of `configs/disaggregation.py`: OPT-125M on 2 machines, short outputs, steps
paced at 1/50 of the modeled time (tests/test_figures.py, as the figure run's disaggregation
figure). It checks the plumbing only: the modeled steps are far shorter than the real ones, so
paced latencies are the machine's overheads, not the model's."""

from configs import disaggregation


def get_config():
  c = disaggregation.get_config("legacy")
  c.variant = "tiny"
  c.scenarios = ("opt_125m:a100_80gb:2",)
  c.batch_size = 2
  c.real_prompt_len = 8
  c.output_mean = 6.0
  c.time_scale = 0.02
  c.rates = (20.0, 60.0)
  c.num_microbatches = 3
  c.chunk = 2          # the paper variant's chunked decode steps, exercised
  return c
