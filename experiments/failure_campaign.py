"""Randomized failure campaign: N scenarios (crash or stall; one stage, adjacent stages, close
together, or during a recovery; every strategy and a chain), each checked against the oracle
(every request completes; tokens equal the failure-free fake-model run).

  python -m experiments.failure_campaign --config=configs/campaign.py [--output_dir=results/campaign]

The last stdout line is one JSON object: injections, completed_fraction, identical_fraction,
hangs, by_strategy, by_pattern, ... (also written to --output_dir/campaign.json).
"""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import flags  # noqa: E402

from dejavu_jax.studies import cli  # noqa: E402
from dejavu_jax.studies.campaign import run_campaign  # noqa: E402

_OUT = flags.DEFINE_string("output_dir", "", "where campaign.json goes (nothing written if empty)")


def main(c):
  report = run_campaign(c)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "campaign.json"), "w") as f:
      json.dump(report, f, indent=1)
  print(json.dumps(report))


if __name__ == "__main__":
  cli.run(main, "configs/campaign.py", __doc__)
