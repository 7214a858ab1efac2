"""Main job: serve an open-loop workload on a pipeline, with failures, and write the results.

  python -m experiments.serve --config=configs/serve_text.py --output_dir=results/serve   # main job
  python -m experiments.serve --config=configs/serve.py --output_dir=results/serve
  python -m experiments.serve --config=configs/serve.py --config.rates='(1.0,2.0,4.0)' \\
      --config.fail_stages='()' --config.fail_times='()' --config.recovery=restart   # rate sweep
  python -m experiments.serve --config=configs/serve.py --output_dir=results/compare \\
      --config.recovery='(restart,reprefill,replica,snapshot)' --config.seeds='(0,1,2)'
  python -m experiments.serve --config=configs/serve.py --print_config   # every field, meaning

Writes to --output_dir (refused when not empty, unless --overwrite): `run.json` (resolved config,
commit, time, command line), `requests_{tag}.jsonl` (one line per request; tag `rate2`, or
`replica_seed1_rate2` in a comparison), `summary.jsonl` (one row per run, each carrying strategy,
seed, pacing, failures, commit and config), `summary.txt`, `recoveries.jsonl`, `comparison.md`
(several strategies or seeds), `failure_timeline.png` (a line per strategy) and
`latency_vs_rate.png` (several rates). A bad config field fails before anything is built.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dejavu_jax.studies import jaxcache
from dejavu_jax.studies import runconfig
from dejavu_jax.studies import runner
from dejavu_jax.studies import runrecord
from dejavu_jax.studies import textjob  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/serve.py", "experiment config")
_OUT = flags.DEFINE_string("output_dir", "results/serve", "where results and plots go")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "replace the results in a non-empty --output_dir")
_PRINT = flags.DEFINE_bool("print_config", False,
                           "print every config field, its value and meaning, and exit")
_CACHE = jaxcache.define_flags()


def main(argv):
  del argv
  jaxcache.setup_from_flags()   # compile cache on; absl/orbax/jax quiet unless --verbosity
  c = _CONFIG.value
  if _PRINT.value:
    print(runconfig.describe(c))
    return
  try:
    if c.get("text_prompts"):   # the real model on text prompts (configs/serve_text.py)
      import jax  # pylint: disable=g-import-not-at-top
      runconfig.validate(c, num_devices=len(jax.devices()))
      runrecord.prepare_output_dir(_OUT.value, _OVERWRITE.value)
      info = runrecord.run_info(c)
      runrecord.write_run_info(_OUT.value, info)
      row = runrecord.row_info(info, strategy=c.recovery, seed=c.seed, pacing=c.pacing,
                               injected_failures=[f.describe() for f in textjob.failures_of(c)])
      textjob.run_text_job(c, _OUT.value, log=print, row_info=row)
      print(f"\nwrote the results to {os.path.abspath(_OUT.value)}")
      return
    summaries = runner.run_experiment(c, _OUT.value, log=print, overwrite=_OVERWRITE.value)
  except (runconfig.ConfigError, runrecord.OutputDirError) as e:
    sys.exit(f"error: {e}\n(see every field with --print_config)")   # no traceback
  print(f"\nwrote {len(summaries)} run(s) to {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  app.run(main)
