"""The failure figures: the paper's setting by default, the chunked cost model, the paced spare,
and (slow) the paced engine against the simulator under every strategy on a reduced scenario."""

import pytest

from configs import fig_failures as cfg_lib
from dejavu_jax import costmodel as cm
from dejavu_jax import sim
from dejavu_jax.config import get_model_config
from dejavu_jax.studies import failstudy
from experiments import fig_failures


def test_default_config_is_the_papers_setting():
  c = cfg_lib.get_config()
  assert (c.model, c.hardware, c.gpus_per_machine, c.num_stages, c.microbatch_size,
          c.prompt_len, c.output_len) == ("opt_66b", "a100_80gb", 2, 4, 1, 500, 1000)
  assert (c.arrivals, c.load, c.rate) == ("zero", 1.0, None)
  assert (c.fail_after_steps, c.fail_time) == (1200, None)
  assert tuple(c.series_times) == (600.0, 1200.0, 1800.0)
  assert (c.single_model, c.single_prompt_len, c.single_output_len, c.single_fail_token) == (
      "gpt2_xl", 500, 500, 250)
  assert set(c.strategies) == {"restart", "reprefill", "replica", "snapshot"}
  assert set(cfg_lib.get_config().paced.scenarios) == {"one", "series", "single"}
  old = cfg_lib.get_config("v1")   # the settings before, kept as a named variant
  assert (old.arrivals, old.rate, old.fail_time, tuple(old.series_times)) == (
      "poisson", 0.25, 200.0, (100.0, 200.0, 300.0))
  with pytest.raises(ValueError, match="unknown fig_failures variant 'nope'"):
    cfg_lib.get_config("nope")


def test_scenarios_place_the_papers_failures_and_arrivals():
  c = cfg_lib.get_config()
  one, series, single = fig_failures.scenarios(c)
  assert one.failures == (sim.Failure(stage=1, after_steps=1200),)
  assert [(f.time, f.stage) for f in series.failures] == [(600.0, 1), (1200.0, 2), (1800.0, 3)]
  assert one.arrivals == (0.0,) * 16 and series.arrivals == (0.0,) * 150   # a job
  # ~150 requests of ~50 s, 4 at a time: the job outlasts the last failure.
  interval = failstudy.capacity_interval(one.cost(), 4, 1, 500, 1000)
  assert 10 < interval < 20 and 150 * interval > 1900
  c.arrivals = "fixed"   # deterministic, spaced at the failure-free capacity
  arr = fig_failures.scenarios(c)[0].arrivals
  assert {round(b - a, 9) for a, b in zip(arr, arr[1:])} == {round(interval, 9)}
  assert single.failures == (sim.Failure(stage=1, after_steps=250),)
  # The single request's recovery is scaled to it: well under its failure-free latency.
  assert single.recovery.timeout_s + single.recovery.replacement_start_s < 1.0
  c.fail_time = 100.0
  with pytest.raises(ValueError, match="exactly one of fail_after_steps and fail_time"):
    fig_failures.scenarios(c)


def test_chunked_cost_charges_chunks_of_paper_steps():
  base = cm.roofline(get_model_config("opt_66b", dtype="float16"), "a100_80gb",
                     gpus_per_machine=2)
  one = failstudy.ChunkedCost(base, real=16, modeled=500, chunk=1)
  assert one.prompt_time(16, 16, 1) == base.prompt_time(16, 500, 1)
  assert one.token_time(16, 1, 20) == base.token_time(16, 1, 504)
  c = failstudy.ChunkedCost(base, real=16, modeled=500, chunk=10)
  # A decode step at 3 generated tokens stands for paper steps 30..39 at contexts 530..539.
  assert c.token_time(16, 1, 19) == 10 * base.token_time(16, 1, 535)
  assert c.head_time(1) == 10 * base.head_time(1)
  # The prompt step yields the first chunk: the prompt, then 9 decode steps.
  assert c.prompt_time(16, 16, 1) == pytest.approx(
      base.prompt_time(16, 500, 1) + 9 * base.token_time(16, 1, 505))
  # A continuation (prompt + 3 chunks) is a prompt of 530 tokens at paper scale.
  assert c.prompt_time(16, 19, 1) == pytest.approx(
      base.prompt_time(16, 530, 1) + 9 * base.token_time(16, 1, 535))


def test_paced_spare_waits_out_the_modelled_recovery():
  rec = sim.RecoveryConfig(heartbeat_s=1.0, timeout_s=3.0, replacement_start_s=5.0)
  spares = failstudy.PacedSpares(rec, weight_s=16.0, time_scale=0.01)
  spares.t0 = 100.0
  # A crash at modelled 2.5 s: detected at 2 + 3 = 5 s, the spare runs at 5 + 5 + 16 = 26 s.
  assert spares.deadline(100.0 + 0.025) == pytest.approx(100.0 + 0.26)

  class Runtime:
    def __init__(self):
      self.replaced = []

    def died_at(self, stage):
      return spares.t0

    def replace(self, stage):
      self.replaced.append(stage)
      return stage

  rt = Runtime()
  spares.install(rt)
  spares.t0 = __import__("time").perf_counter() - 0.5   # crashed at modelled 0 s, long ago
  assert rt.replace(2) == 2 and rt.replaced == [2]
  assert spares.waited_s == [0.0]   # its modelled recovery (0.24 s of wall) is over already


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_paced_engine_matches_simulator_under_every_strategy():
  """OPT-66B on 4 stages, microbatch 1, the paper's recovery constants (24 s down), a job of 4
  requests of 500 + 400 tokens, stage 1 failing after 8 of its paced steps (~10 s in): the
  paced engine (fake program, chunks of 100 tokens, 15x compressed) and the simulator on the
  same workload agree within 10% on total runtime (15% on mean latency) under every strategy,
  and the tokens are the oracle's. The failure is placed by step count, as the replay's
  snapshot period then keeps it clear of a snapshot's write: placed by time, on loaded cores
  the engine's real write and the simulator's median one could fall on either side of it
  (CI once saw the simulator a whole snapshot period behind: 10.05%)."""
  sc = failstudy.Scenario(
      "reduced", "opt_66b", "a100_80gb", 2, num_stages=4, microbatch_size=1, prompt_len=500,
      output_len=400, arrivals=failstudy.arrivals("zero", 4, 1.0),
      failures=(sim.Failure(stage=1, after_steps=800),),
      recovery=sim.RecoveryConfig(snapshot_every=50, restart_scope="job"))
  rep = failstudy.Replayer(sc, failstudy.Replay(chunk=100, time_scale=1 / 15),
                           log=lambda *a: None)
  rows = {}
  try:
    for strategy in (None, "restart", "reprefill", "replica", "snapshot"):
      out = rep.run(strategy, fail_steps=[(1, 8)] if strategy else [])
      e = failstudy.run_row("r", str(strategy), out["engine_records"],
                            out["engine_recoveries"], "paced", None)
      s = failstudy.run_row("r", str(strategy), out["sim_records"], out["sim_recoveries"],
                            "sim", None)
      rows[strategy] = (e, s, out)
  finally:
    rep.close()
  for strategy, (e, s, out) in rows.items():
    print(f"{strategy}: runtime paced {e['total_runtime_s']:.2f} s sim {s['total_runtime_s']:.2f}"
          f" s; mean latency {e['mean_e2el_s']:.2f} / {s['mean_e2el_s']:.2f} s; overruns "
          f"{out['overruns']}; engine recovery overhead {out['engine_overhead_s']:.2f} s")
    assert out["identical"] and e["completed"] == s["completed"] == 4, strategy
    assert e["failures"] == s["failures"] == (0 if strategy is None else 1), strategy
    assert failstudy.rel(s["total_runtime_s"], e["total_runtime_s"]) <= 0.10, (strategy, e, s)
    # The figure's paced-vs-simulator check is total runtime (above). Mean latency averages the
    # paced steps' overruns too, which loaded cores add to (11% seen once in CI at 10%).
    assert failstudy.rel(s["mean_e2el_s"], e["mean_e2el_s"]) <= 0.15, (strategy, e, s)
  # The failure costs its downtime, and restart the most: the check can fail.
  free = rows[None][0]["total_runtime_s"]
  assert all(rows[k][0]["total_runtime_s"] > free + 20 for k in rows if k)
  assert rows["restart"][0]["lost_tokens"] > rows["replica"][0]["lost_tokens"]
  assert rows["restart"][0]["total_runtime_s"] > rows["replica"][0]["total_runtime_s"]
