"""The absl main every figure script shares: flags defined only when the script runs (so
`experiments/figures.py` and tests can import every figure module into one process), the output
directory checked, what the run was recorded, the figure run, its table and headline printed.
The command line is studies/cli.py's: --help lists the config's fields and exits 0, a config
error is one line and exit code 2."""

import sys

from absl import flags

from dejavu_jax.studies import cli
from dejavu_jax.studies import reporting
from dejavu_jax.studies import runrecord


def main_for(run, headline, table, default_config: str, default_output_dir: str) -> None:
  """Defines --config, --output_dir, --overwrite and runs `run(config, output_dir)`."""
  out = flags.DEFINE_string("output_dir", default_output_dir, "where results and plots go")
  overwrite = flags.DEFINE_bool("overwrite", False,
                                "replace the results in a non-empty output_dir")

  def main(c):
    runrecord.prepare_output_dir(out.value, overwrite.value)
    runrecord.write_run_info(out.value, runrecord.run_info(c))
    rows = run(c, out.value)
    print(reporting.markdown_table(rows, table))
    print(headline(rows))

  cli.run(main, default_config, getattr(sys.modules["__main__"], "__doc__", "") or "",
          errors=(runrecord.OutputDirError,))
