"""The failure campaign end to end on its tiny config: every scenario completes with the
failure-free tokens, and the report has the fields the issue names."""

import pytest

from configs import campaign_tiny
from dejavu_jax.studies.campaign import draw_scenarios, run_campaign


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_campaign_is_all_identical():
  c = campaign_tiny.get_config()
  c.injections = 6
  report = run_campaign(c, log=lambda *_: None)
  assert report["injections"] == 6 and report["hangs"] == 0
  assert report["completed_fraction"] == 1.0 and report["identical_fraction"] == 1.0, (
      report["failed_examples"])
  assert set(report["by_strategy"]) <= set(c.strategies)
  assert report["recoveries"] >= 6 - report["untriggered"]


def test_scenarios_cover_the_space():
  import numpy as np  # pylint: disable=g-import-not-at-top
  c = campaign_tiny.get_config()
  c.injections = 400
  c.depths = (2, 3, 4)
  scen = draw_scenarios(c, np.random.default_rng(1))
  assert {s.pattern for s in scen} == {"single", "adjacent", "close", "during_recovery"}
  assert {s.kind for s in scen} == {"crash", "stall"}
  stages = {(s.depth, f.stage) for s in scen for f in s.failures}
  assert all((d, 0) in stages and (d, d - 1) in stages for d in (2, 3, 4))
