"""Main job: serve an open-loop workload on a pipeline, with failures, and write the results.

  python -m experiments.serve --config=configs/serve_text.py --output_dir=results/serve   # main job
  python -m experiments.serve --config=configs/serve.py --output_dir=results/serve
  python -m experiments.serve --config=configs/serve.py --config.rates='(1.0,2.0,4.0)' \\
      --config.fail_stages='()' --config.fail_times='()' --config.recovery=restart   # rate sweep
  python -m experiments.serve --config=configs/serve.py --output_dir=results/compare \\
      --config.recovery='(restart,reprefill,replica,snapshot)' --config.seeds='(0,1,2)'
  python -m experiments.serve --config=configs/serve.py --print_config   # every field, meaning

Every config field is set as --config.<field>=<value> (ServeConfig's under their flat names:
--config.temperature=0.7, --config.ray_placement=spread); --help lists them all with their
meaning. Writes to --output_dir (refused when not empty, unless --overwrite): `run.json`
(resolved config, commit, time, command line), `requests_{tag}.jsonl` (one line per request; tag
`rate2`, or `replica_seed1_rate2` in a comparison), `summary.jsonl` (one row per run, each
carrying strategy, seed, pacing, failures, commit and config), `summary.txt`,
`recoveries.jsonl`, `comparison.md` (several strategies or seeds), `failure_timeline.png` (a
line per strategy) and `latency_vs_rate.png` (several rates). A bad config field fails before
anything is built, in one line (exit code 2). The text job (configs/serve_text.py) exits 1 when
a completion differs from the failure-free run.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import flags  # noqa: E402

from dejavu_jax.studies import cli  # noqa: E402
from dejavu_jax.studies import runconfig  # noqa: E402
from dejavu_jax.studies import runrecord  # noqa: E402

_OUT = flags.DEFINE_string("output_dir", "results/serve", "where results and plots go")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "replace the results in a non-empty --output_dir")
_PRINT = flags.DEFINE_bool("print_config", False,
                           "print every config field, its value and meaning, and exit")


def main(c):
  # Imported here: --help and config errors answer without loading the engine.
  from dejavu_jax.studies import runner, textjob  # pylint: disable=g-import-not-at-top
  if _PRINT.value:
    print(runconfig.describe(c))
    return 0
  if c.get("text_prompts"):   # the real model on text prompts (configs/serve_text.py)
    import jax  # pylint: disable=g-import-not-at-top
    runconfig.validate(c, num_devices=len(jax.devices()))
    runrecord.prepare_output_dir(_OUT.value, _OVERWRITE.value)
    info = runrecord.run_info(c)
    runrecord.write_run_info(_OUT.value, info)
    sc = runconfig.serve_config(c)
    row = runrecord.row_info(info, strategy=sc.fault.recovery, seed=sc.sampling.seed,
                             pacing=sc.timing.pacing,
                             injected_failures=[f.describe() for f in textjob.failures_of(c)])
    summary = textjob.run_text_job(c, _OUT.value, log=print, row_info=row)
    print(f"\nwrote the results to {os.path.abspath(_OUT.value)}")
    if not summary["identical"]:
      print("error: a completion differs from the failure-free run (see completions.jsonl)",
            file=sys.stderr)
      return 1
    return 0
  summaries = runner.run_experiment(c, _OUT.value, log=print, overwrite=_OVERWRITE.value)
  print(f"\nwrote {len(summaries)} run(s) to {os.path.abspath(_OUT.value)}")
  if any(s.get("identical") is False for s in summaries):   # check_tokens
    print("error: a run's tokens differ from the single-device greedy run", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  cli.run(main, "configs/serve.py", __doc__, describe=runconfig.describe,
          errors=(runconfig.ConfigError, runrecord.OutputDirError), check=runconfig.validate)
