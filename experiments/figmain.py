"""The absl main every figure script shares: flags defined only when the script runs (so
`experiments/figures.py` and tests can import every figure module into one process), the output
directory checked, what the run was recorded, the figure run, its table and headline printed."""

import sys

from absl import app, flags
from ml_collections import config_flags

from dejavu_jax.studies import jaxcache
from dejavu_jax.studies import reporting
from dejavu_jax.studies import runrecord


def main_for(run, headline, table, default_config: str, default_output_dir: str) -> None:
  """Defines --config, --output_dir, --overwrite and runs `run(config, output_dir)`."""
  config = config_flags.DEFINE_config_file("config", default_config, "figure config")
  out = flags.DEFINE_string("output_dir", default_output_dir, "where results and plots go")
  overwrite = flags.DEFINE_bool("overwrite", False,
                                "replace the results in a non-empty output_dir")
  jaxcache.define_flags()

  def main(argv):
    del argv
    jaxcache.setup_from_flags()   # compile cache on; absl/orbax/jax quiet unless --verbosity
    try:
      runrecord.prepare_output_dir(out.value, overwrite.value)
    except runrecord.OutputDirError as e:
      sys.exit(f"error: {e}")
    runrecord.write_run_info(out.value, runrecord.run_info(config.value))
    rows = run(config.value, out.value)
    print(reporting.markdown_table(rows, table))
    print(headline(rows))

  app.run(main)
