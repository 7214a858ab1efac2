"""Figure: what a failure costs under each recovery strategy (simulated; `configs/fig_failures.py`).

Writes to --output_dir: `failures.jsonl` (one row per system and scenario), `timeline_one.png`
and `timeline_series.png` (cumulative latency over time: failure-free and every strategy on one
chart, dashed lines at the failures) and `single_request.png` (one request's end-to-end latency
with a failure mid-generation, per strategy).

  python -m experiments.fig_failures --config=configs/fig_failures.py --output_dir=/tmp/fig
"""

import os

from dejavu_jax import costmodel as cm
from dejavu_jax import sim
from dejavu_jax.studies import reporting
from dejavu_jax.config import get_model_config
from dejavu_jax.studies import runrecord


TABLE = ("scenario", "system", "completed", "norm_latency_p50_s_per_tok", "mean_e2el_ms",
         "makespan_s", "lost_tokens", "downtime_s", "slowdown_vs_failure_free")
FAILURE_FREE = "failure-free"


def recovery(c, strategy: str) -> sim.RecoveryConfig:
  return sim.RecoveryConfig(strategy=strategy, snapshot_every=c.snapshot_every,
                            heartbeat_s=c.heartbeat_s, timeout_s=c.heartbeat_timeout_s,
                            replacement_start_s=c.replacement_start_s,
                            weight_load_s=c.weight_load_s, restart_scope=c.restart_scope,
                            replica_link=cm.LINKS["inter_vm_40gbps"])


def _row(scenario: str, system: str, res, base_e2el: float | None) -> dict:
  s = res.summary
  done = [r.finish for r in res.records if r.done]
  rec = res.recoveries
  row = {"scenario": scenario, "system": system, **s,
         "makespan_s": max(done) if done else float("nan"),
         "failures": len(rec), "lost_tokens": sum(r["lost_tokens"] for r in rec),
         "downtime_s": sum(r["downtime_s"] for r in rec), "recoveries": rec}
  if base_e2el:
    row["slowdown_vs_failure_free"] = s["mean_e2el_ms"] / base_e2el
  return row


def _timeline(c, cost, scenario: str, failures, out_dir, rows) -> None:
  def reqs():
    return sim.make_requests(c.rate, c.num_requests, c.prompt_len, c.output_len, seed=c.seed)
  runs = {}
  free = sim.simulate_colocated(cost, reqs(), c.num_stages, c.microbatch_size)
  runs[FAILURE_FREE] = free.records
  base = free.summary["mean_e2el_ms"]
  rows.append(_row(scenario, FAILURE_FREE, free, base))
  for strategy in c.strategies:
    res = sim.simulate_colocated(cost, reqs(), c.num_stages, c.microbatch_size,
                                 failures=failures, recovery=recovery(c, strategy))
    runs[strategy] = res.records
    rows.append(_row(scenario, strategy, res, base))
  reporting.plot_failure_timeline(
      runs, os.path.join(out_dir, f"timeline_{scenario}.png"),
      failure_times=[f.time for f in failures],
      failure_labels=[f"stage {f.stage} fails at {f.time:g} s" for f in failures],
      title=f"{c.model}, {c.num_stages} stages, {len(failures)} failure(s)")


def _single(c, rows, out_dir) -> None:
  model = get_model_config(c.single_model, dtype="float16")
  cost = cm.roofline(model, c.hardware, gpus_per_machine=c.gpus_per_machine)

  def one():
    return [sim.RequestRecord(0, 0.0, c.single_prompt_len, c.single_output_len)]
  free = sim.simulate_colocated(cost, one(), c.single_stages, 1)
  t_fail = free.records[0].first_token + (free.records[0].finish - free.records[0].first_token) / 2
  base = free.summary["mean_e2el_ms"]
  rows.append(_row("single", FAILURE_FREE, free, base) | {"fail_time_s": t_fail})
  values = {FAILURE_FREE: free.summary["mean_e2el_ms"] / 1e3}
  for strategy in c.strategies:
    res = sim.simulate_colocated(cost, one(), c.single_stages, 1,
                                 failures=[sim.Failure(t_fail, c.single_stages - 1)],
                                 recovery=recovery(c, strategy))
    rows.append(_row("single", strategy, res, base) | {"fail_time_s": t_fail})
    values[strategy] = res.summary["mean_e2el_ms"] / 1e3
  reporting.plot_bars([f"{c.single_model} {c.single_prompt_len}+{c.single_output_len}"],
                      {k: [v] for k, v in values.items()},
                      os.path.join(out_dir, "single_request.png"),
                      ylabel="end-to-end latency (s)", baseline=FAILURE_FREE,
                      title=f"one request, failure at {t_fail:.1f} s (mid-generation)")


def run(c, out_dir, log=print) -> list[dict]:
  """Simulates every scenario; writes the JSONL and plots; returns the rows."""
  os.makedirs(out_dir, exist_ok=True)
  cost = cm.roofline(get_model_config(c.model, dtype="float16"), c.hardware,
                     gpus_per_machine=c.gpus_per_machine)
  rows = []
  bar = runrecord.progress_bar(3, "simulate failures", bool(log))
  _timeline(c, cost, "one", [sim.Failure(c.fail_time, c.fail_stage)], out_dir, rows)
  bar(1, 3)
  series = [sim.Failure(t, (c.fail_stage + i) % c.num_stages)
            for i, t in enumerate(c.series_times)]
  _timeline(c, cost, "series", series, out_dir, rows)
  bar(2, 3)
  _single(c, rows, out_dir)
  bar(3, 3)
  bar.close()
  for r in rows:
    if r["scenario"] != "single" and r["system"] != FAILURE_FREE and not r["lost_tokens"]:
      if r["system"] in ("restart",):
        runrecord.warn(log, f"[{r['scenario']}] restart lost no tokens: the failure hit no "
                       "generated work in flight")
  reporting.write_rows(os.path.join(out_dir, "failures.jsonl"), rows)
  return rows


def headline(rows) -> str:
  """Slowdown of mean end-to-end latency vs failure-free, one failure, per strategy."""
  one = {r["system"]: r.get("slowdown_vs_failure_free") for r in rows if r["scenario"] == "one"}
  return "mean e2e latency vs failure-free, one failure: " + ", ".join(
      f"{k} {v:.3f}x" for k, v in one.items() if k != FAILURE_FREE and v)


if __name__ == "__main__":
  from experiments import figmain  # pylint: disable=g-import-not-at-top
  figmain.main_for(run, headline, TABLE, "configs/fig_failures.py", "results/fig_failures")
