"""Randomized failure campaign: N scenarios over programs (fake, real tiny model), mechanisms
(colocated, swapping, disaggregated), runtimes (local, Ray), strategies and failure patterns,
each checked against the oracle, reporting which strategy handled each lost microbatch
(dejavu_jax/studies/campaign.py).

  python -m experiments.failure_campaign --config=configs/campaign.py [--output_dir=results/campaign]

The last stdout line is one JSON object: ok, scenarios_run, triggered / untriggered, failures
specified / fired (the injections; at least `min_fired` must fire), identical, cache identical /
different, handled_by per configured strategy, targets, by_program, by_mechanism, by_runtime
(Ray: `sigkills`), phases_s (where the time went), ... (written with every scenario's record to
--output_dir/campaign.json). Exits 1 when `ok` is False: a strategy handled less than its target
share of its own scenarios, a run did not complete or differs from an oracle, too few failures
fired, or a program, mechanism or runtime had none fire.
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import flags  # noqa: E402

from dejavu_jax.studies import cli  # noqa: E402
from dejavu_jax.studies.campaign import check_config, run_campaign  # noqa: E402

_OUT = flags.DEFINE_string("output_dir", "", "where campaign.json goes (nothing written if empty)")


def main(c):
  report = run_campaign(c)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "campaign.json"), "w") as f:
      json.dump(report, f, indent=1)
  print(json.dumps({k: v for k, v in report.items() if k != "scenarios"}))
  if not report["ok"]:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main, "configs/campaign.py", __doc__, check=check_config)
