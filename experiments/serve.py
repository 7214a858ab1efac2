"""Main job: serve an open-loop workload on a pipeline, with failures, and write the results.

  python -m experiments.serve --config=configs/serve_text.py --output_dir=results/serve   # main job
  python -m experiments.serve --config=configs/serve.py --output_dir=results/serve
  python -m experiments.serve --config=configs/serve.py --config.rates='(1.0,2.0,4.0)' \
      --config.fail_stages='()' --config.fail_times='()'          # a rate sweep, no failures

Writes to --output_dir: `requests_rate{R}.jsonl` (one line per request), `summary.jsonl` (one
summary per rate), `summary.txt` (readable), `recoveries.jsonl`, `failure_timeline.png`
(cumulative latency over time, as in the paper's failure figures) when failures were injected,
and `latency_vs_rate.png` when several rates ran.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dejavu_jax.serving import runner, textjob  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/serve.py", "experiment config")
_OUT = flags.DEFINE_string("output_dir", "results/serve", "where results and plots go")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  c = _CONFIG.value
  if c.get("text_prompts"):   # the real model on text prompts (configs/serve_text.py)
    textjob.run_text_job(c, _OUT.value, log=print)
    print(f"\nwrote the results to {os.path.abspath(_OUT.value)}")
    return
  summaries = runner.run_experiment(c, _OUT.value, log=print)
  print(f"\nwrote {len(summaries)} run(s) to {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  app.run(main)
