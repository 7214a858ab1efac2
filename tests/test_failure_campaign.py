"""The failure campaign: it reports what happened (which strategy handled each lost microbatch,
failures fired vs specified, untriggered runs apart), its verdict can fail, its scenarios are
timed so each strategy gets to handle its own failures, and the real-model program's greedy
outputs are not degenerate."""

import numpy as np
import pytest

from configs import campaign, campaign_tiny
from dejavu_jax.studies.campaign import (check_config, draw_scenarios, real_model_params, report,
                                         run_campaign)


def _rec(strategy="snapshot", triggered=True, identical=True, handled=None, targeted=True,
         lost=2, specified=1):
  handled = {strategy.split(",")[0]: lost} if handled is None else handled
  return {"program": "fake", "mechanism": "colocated", "runtime": "local", "depth": 2,
          "prompt_depth": 0, "microbatch": 2, "strategy": strategy, "kind": "crash",
          "pattern": "single", "side": "token", "targeted": targeted, "failures": [],
          "specified": specified, "error": None, "hang": False, "completed": True,
          "identical": identical, "recoveries": int(triggered), "fired": int(triggered),
          "extra_deaths": 0, "lost_microbatches": lost if triggered else 0,
          "recomputed_tokens": 0, "handled_by": handled if triggered else {}, "load_errors": 0,
          "wall_s": 0.1, "triggered": triggered,
          "handled_own": triggered and handled.get(strategy.split(",")[0], 0) > 0}


def test_report_counts_untriggered_apart_and_can_fail():
  c = campaign.get_config()
  c.min_fired = 0
  good = [_rec() for _ in range(8)] + [_rec(handled={"snapshot": 1, "restart": 1})]
  r = report(c, good + [_rec(triggered=False)], 1.0)
  assert r["ok"] and r["scenarios_run"] == 10
  assert r["triggered"] == 9 and r["untriggered"] == 1 and r["identical"] == 9
  assert r["untriggered_identical"] == 1
  assert r["failures_specified"] == 10 and r["failures_fired"] == 9
  assert r["handled_by"]["snapshot"] == {"restart": 1, "snapshot": 17}
  assert r["targets"]["snapshot"]["rate"] == 1.0
  # The configured name is not what handled it: restart did, so the target is missed.
  missed = report(c, good[:4] + [_rec(handled={"restart": 2}) for _ in range(5)], 1.0)
  assert not missed["ok"] and not missed["targets"]["snapshot"]["met"]
  assert missed["targets"]["snapshot"]["rate"] == pytest.approx(4 / 9, abs=1e-3)
  assert missed["by_strategy"]["snapshot"]["handled_by"] == {"restart": 10, "snapshot": 8}
  # One completed run with other tokens than the oracle's fails the campaign.
  wrong = report(c, good + [_rec(identical=False)], 1.0)
  assert not wrong["ok"] and wrong["not_ok_runs"] == 1 and wrong["identical"] == 9
  # ... and so does one whose restored caches differ from the failure-free run's, tokens equal.
  cache = dict(_rec(), cache_identical=False, cache_points={"replica": 2}, cache_detail="x")
  seen = report(c, good + [dict(_rec(), cache_identical=True, cache_points={"replica": 3})], 1.0)
  assert seen["ok"] and seen["cache_identical"] == 1 and seen["cache_points"] == {"replica": 3}
  differ = report(c, good + [cache], 1.0)
  assert not differ["ok"] and differ["cache_different"] == 1 and differ["identical"] == 10
  assert differ["failed_examples"][0]["cache_detail"] == "x"
  # Untargeted scenarios (a pattern the strategy is not designed for) are not judged.
  loose = report(c, good + [_rec(targeted=False, handled={"restart": 2}) for _ in range(9)], 1.0)
  assert loose["ok"] and loose["targets"]["snapshot"]["judged"] == 9
  # A runtime whose failures never fired vouches for nothing: the campaign fails.
  idle = report(c, good + [dict(_rec(triggered=False), runtime="ray") for _ in range(2)], 1.0)
  assert not idle["ok"] and idle["unexercised"] == ["runtime=ray"]
  # Fewer failures fired than the config's minimum: a missed target.
  c.min_fired = 10
  few = report(c, good, 1.0)
  assert not few["ok"] and few["fired_target"] == {"min": 10, "met": False}
  assert report(c, good + [_rec()], 1.0)["fired_target"]["met"]


def test_a_stall_the_watchdog_cannot_see_is_refused():
  """The Ray scenarios of an earlier default config never fired: their 5 s stalls ended before
  a 5 s progress timeout could see them."""
  c = campaign.get_config()
  check_config(c)
  c.ray_stall_s = c.ray_progress_timeout_s
  with pytest.raises(ValueError, match="ray_stall_s .* ray_progress_timeout_s"):
    check_config(c)
  c.kinds = ("crash",)
  check_config(c)


def test_scenarios_cover_the_space_and_are_timed_for_their_strategy():
  c = campaign.get_config()
  c.scenarios = 600
  c.ray_scenarios = c.smollm2_scenarios = 0
  scen = draw_scenarios(c, np.random.default_rng(1))
  assert {s.pattern for s in scen} == {"single", "adjacent", "close", "during_recovery",
                                        "during_recovery_holder", "during_recovery_loaded"}
  assert {s.kind for s in scen} == {"crash", "stall"}
  assert {s.program for s in scen} == {"fake", "model"}
  assert {s.mechanism for s in scen} == {"colocated", "swapping", "disagg"}
  assert {s.side for s in scen if s.mechanism == "disagg"} == {"prompt", "token"}
  colocated = [s for s in scen if s.mechanism == "colocated"]
  stages = {(s.depth, f.stage) for s in colocated for f in s.failures}
  assert all((d, 0) in stages and (d, d - 1) in stages for d in (2, 3, 4))
  for s in scen:
    first = s.failures[0]
    if s.side == "prompt":   # within the few prefills a prompt worker runs
      assert first.stage < s.prompt_depth and not s.targeted
      assert 1 <= first.after_steps <= c.prompt_max_step
    else:
      assert s.prompt_depth <= first.stage < s.prompt_depth + s.depth
    if s.own == "snapshot" and s.mechanism != "disagg":
      assert first.after_snapshots in (2, 3) and s.slow
      # A restore whose target dies while it loads falls back by design: not judged.
      assert s.targeted == (s.side == "token" and s.pattern != "during_recovery_loaded")
    elif s.own == "replica" and s.side == "token":
      assert first.after_steps >= c.replica_steps_per_stage * s.depth
      assert s.targeted == (s.side == "token" and s.pattern in ("single", "close"))
    if s.program == "model":
      assert s.strategy in c.model_strategies and s.mechanism in c.model_mechanisms
  for strategy in c.strategies:
    assert sum(s.targeted for s in scen if s.strategy == strategy) >= 40, strategy
  c.scenarios, c.ray_scenarios, c.smollm2_scenarios = 0, 3, 2
  few = draw_scenarios(c, np.random.default_rng(2))
  assert [(s.runtime, s.program) for s in few] == [("ray", "fake")] * 3 + [("local", "smollm2")] * 2


def test_real_model_greedy_outputs_vary():
  """At the default init a tiny OPT's greedy output repeats one token, which no cache mutation
  would change; the campaign's weights must give varied tokens, per row and across rows."""
  from dejavu_jax.config import tiny_config  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models.generate import generate  # pylint: disable=g-import-not-at-top
  c = campaign.get_config()
  cfg = tiny_config("opt", num_layers=c.num_layers, max_positions=c.max_len)
  params = real_model_params(cfg, c.model_seed, c.model_scale)
  rng = np.random.default_rng(0)
  prompts = [list(int(t) for t in rng.integers(3, cfg.vocab_size, 6)) for _ in range(4)]
  out = generate(cfg, params, prompts, 16)
  assert all(len(set(o)) >= 6 for o in out), out
  assert len({tuple(o) for o in out}) == len(out), out
  assert max(max(np.bincount(o)) for o in out) <= 6, out   # no token dominates a row


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_campaign_reports_what_happened():
  c = campaign_tiny.get_config()
  c.scenarios = 6
  # One layout per mechanism (each new one compiles its stage programs): the mechanisms and
  # strategies vary, the shapes need not.
  c.depths = c.disagg_depths = (2,)
  c.prompt_depths = (1,)
  r = run_campaign(c, log=lambda *_: None)
  assert r["scenarios_run"] == 6 and r["hangs"] == 0
  assert r["triggered"] + r["untriggered"] == 6
  assert r["completed"] == r["identical"] == r["triggered"], r["failed_examples"]
  assert r["failures_fired"] <= r["failures_specified"]
  assert r["failures_fired"] >= r["triggered"]
  assert set(r["handled_by"]) <= set(c.strategies) | set(c.model_strategies)
  recs = r["scenarios"]
  for rec in recs:   # who handled what comes from the recovery events, not the configuration
    if rec["triggered"] and rec["lost_microbatches"]:
      assert sum(rec["handled_by"].values()) >= rec["lost_microbatches"], rec
  assert r["ok"], (r["targets"], r["failed_examples"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_snapshot_scenarios_are_handled_by_snapshot():
  """Snapshot failures fire after completed snapshots: snapshot itself restores, not the
  restart appended to it."""
  c = campaign_tiny.get_config()
  c.scenarios, c.strategies, c.mechanisms, c.mechanism_p = 3, ("snapshot",), ("colocated",), (1.0,)
  c.model_fraction, c.kinds, c.depths = 0.0, ("crash",), (2,)
  r = run_campaign(c, log=lambda *_: None)
  assert r["triggered"] == 3 and r["identical"] == 3, r["failed_examples"]
  assert r["handled_by"]["snapshot"].get("snapshot", 0) >= 3, r["handled_by"]
  assert r["targets"]["snapshot"]["handled_own"] >= 2, r["targets"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prompt_side_failures_fire_and_caches_are_checked():
  """Disaggregated scenarios with every first failure on a prompt worker (crashes and stalls,
  every pattern): each fires while prompts are in flight and is recovered (a prompt stall was
  never detected, a prompt-side during-recovery failure never fired); with the cache oracle on,
  every prompt cache a token worker loaded equals the colocated reference's."""
  c = campaign_tiny.get_config()
  c.scenarios, c.mechanisms, c.mechanism_p = 5, ("disagg",), (1.0,)
  c.prompt_side_p, c.prompt_depths, c.disagg_depths = 1.0, (2,), (2,)
  c.model_fraction, c.strategies, c.cache_oracle = 0.0, ("replica",), True
  r = run_campaign(c, log=lambda *_: None)
  recs = r["scenarios"]
  assert {rec["side"] for rec in recs} == {"prompt"}
  assert {rec["kind"] for rec in recs} == {"crash", "stall"}, [rec["kind"] for rec in recs]
  assert r["untriggered"] == 0 and r["failures_fired"] == r["failures_specified"], recs
  assert r["identical"] == 5 and r["cache_different"] == 0, r["failed_examples"]
  assert r["cache_identical"] == 5 and r["cache_points"].get("prompt_load", 0) >= 10, r
  assert r["ok"], r["failed_examples"]
