"""Figure: what a failure costs under each recovery strategy (`configs/fig_failures.py`).

Simulated at paper scale, and replayed by the paced engine beside the simulator on the replay's
workload (dejavu_jax/studies/failstudy.py); every number is `modelled`. Writes to --output_dir:
`failures.jsonl` (one row per scenario, system and source: "sim" for the paper-scale simulator,
"paced" for the paced engine, "sim (replay)" for the simulator on the replay's workload), and
per scenario `timeline_<scenario>.png` (cumulative latency over time, failure-free and every
strategy, at paper scale), `timeline_<scenario>_paced.png` (paced engine beside its simulator),
`single_request.png` (one request's end-to-end latency per strategy, simulated and paced) and
`paced_vs_sim.jsonl` (the relative errors per scenario and strategy).

  python -m experiments.fig_failures --config=configs/fig_failures.py --output_dir=/tmp/fig
"""

import dataclasses
import math
import os
import time

# The paced replays run pipelines on virtual CPU devices: the flag must precede jax's import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from dejavu_jax import sim  # noqa: E402
from dejavu_jax.studies import failstudy  # noqa: E402
from dejavu_jax.studies import reporting  # noqa: E402
from dejavu_jax.studies import runrecord  # noqa: E402

TABLE = ("scenario", "system", "source", "completed", "total_runtime_s", "mean_e2el_s",
         "cumulative_latency_s", "lost_tokens", "downtime_s", "runtime_vs_failure_free",
         "latency_vs_failure_free")
KIND = "modelled"   # the simulator and the paced engine both replay the cost model
FAILURE_FREE = failstudy.FAILURE_FREE
PACED, REPLAY_SIM = "paced", "sim (replay)"


def recovery(c, single: bool = False) -> sim.RecoveryConfig:
  """The recovery constants of the OPT-66B scenarios, or of the one-request scenario."""
  p = "single_" if single else ""
  return sim.RecoveryConfig(
      strategy="restart", snapshot_every=c.snapshot_every, heartbeat_s=c[p + "heartbeat_s"],
      timeout_s=c[p + "heartbeat_timeout_s"],
      replacement_start_s=c[p + "replacement_start_s"], weight_load_s=c[p + "weight_load_s"],
      restart_scope=c.restart_scope)


def scenarios(c) -> list[failstudy.Scenario]:
  """The config's three scenarios at paper scale."""
  if (c.fail_after_steps is None) == (c.fail_time is None):
    raise ValueError("fig_failures: give exactly one of fail_after_steps and fail_time")
  common = dict(hardware=c.hardware, gpus_per_machine=c.gpus_per_machine)
  probe = failstudy.Scenario("probe", c.model, num_stages=c.num_stages,
                             microbatch_size=c.microbatch_size, prompt_len=c.prompt_len,
                             output_len=c.output_len, arrivals=(), failures=(),
                             recovery=recovery(c), **common)
  rate = c.rate
  if rate is None:
    rate = c.load * c.microbatch_size / failstudy.capacity_interval(
        probe.cost(), c.num_stages, c.microbatch_size, c.prompt_len, c.output_len)
  one = [sim.Failure(stage=c.fail_stage, after_steps=c.fail_after_steps)
         if c.fail_after_steps is not None else sim.Failure(c.fail_time, c.fail_stage)]
  series = [sim.Failure(t, (c.fail_stage + i) % c.num_stages)
            for i, t in enumerate(c.series_times)]
  n_series = c.series_num_requests or c.num_requests
  out = [
      dataclasses.replace(probe, name="one", failures=tuple(one),
                          arrivals=failstudy.arrivals(c.arrivals, c.num_requests, rate, c.seed)),
      dataclasses.replace(probe, name="series", failures=tuple(series),
                          arrivals=failstudy.arrivals(c.arrivals, n_series, rate, c.seed))]
  last = c.single_stages - 1
  single_fail = (sim.Failure(stage=last, after_steps=c.single_fail_token)
                 if c.single_fail_token is not None else None)
  out.append(failstudy.Scenario(
      "single", c.single_model, num_stages=c.single_stages, microbatch_size=1,
      prompt_len=c.single_prompt_len, output_len=c.single_output_len, arrivals=(0.0,),
      failures=(single_fail,) if single_fail else (), recovery=recovery(c, single=True),
      **common))
  return out


def describe(sc) -> str:
  """The scenario in a few words (the headline's and the index's setting)."""
  fails = ", ".join(f"stage {f.stage} after step {f.after_steps}" if f.after_steps is not None
                    else f"{f.time:g} s" for f in sc.failures) or "at the midpoint"
  job = (f"a job of {len(sc.arrivals)}" if not any(sc.arrivals) else
         f"{len(sc.arrivals)} requests")
  return (f"{sc.model}, {sc.num_stages} stages of {sc.gpus_per_machine} x {sc.hardware}, "
          f"microbatch {sc.microbatch_size}, {sc.prompt_len}+{sc.output_len}, {job}, "
          f"failures: {fails}")


def _simulate(sc, strategies, rows, runs, log) -> dict:
  """Every system at paper scale; returns the scenario (its failures placed) and
  {system: SimResult}."""
  free = failstudy.simulate(sc, None)
  if not sc.failures:   # one request, failing at the failure-free run's midpoint in time
    r0 = free.records[0]
    t = r0.first_token + (r0.finish - r0.first_token) / 2
    sc = dataclasses.replace(sc, failures=(sim.Failure(t, sc.num_stages - 1),))
  setting = describe(sc)
  base = failstudy.run_row(sc.name, FAILURE_FREE, free.records, [], "sim", None)
  base["setting"] = setting
  rows.append(base)
  runs[FAILURE_FREE] = free
  for strategy in strategies:
    t0 = time.perf_counter()
    res = failstudy.simulate(sc, strategy)
    runs[strategy] = res
    rows.append(failstudy.run_row(sc.name, strategy, res.records, res.recoveries, "sim", base)
                | {"setting": setting})
    log(f"[modelled] {sc.name} {strategy} simulated in {time.perf_counter() - t0:.1f} s")
  return sc, runs


def _plot_timeline(sc, runs: dict, path: str, title: str, failure_times=None) -> None:
  times = failure_times if failure_times is not None else sorted(
      {r["time"] for res in runs.values() if hasattr(res, "recoveries")
       for r in res.recoveries})
  reporting.plot_failure_timeline(
      {k: (v.records if hasattr(v, "records") else v) for k, v in runs.items()}, path,
      failure_times=times, title=title)


def _replay(c, sc, sim_runs, rows, comparisons, out_dir, log) -> None:
  """The paced engine and its simulator on the replay's workload, every system."""
  p = c.paced
  rp = failstudy.Replay(chunk=p[sc.name + "_chunk"], time_scale=p[sc.name + "_time_scale"],
                        real_prompt_len=p.real_prompt_len, heartbeat_s=p.heartbeat_s,
                        heartbeat_timeout_s=p.heartbeat_timeout_s)
  t0 = time.perf_counter()
  rep = failstudy.Replayer(sc, rp, log)
  log(f"[{sc.name}] paced engine ready in {time.perf_counter() - t0:.1f} s (chunk {rp.chunk}, "
      f"time scale {rp.time_scale:.4g})")
  engine_runs, sim_runs_replay, base_e, base_s, fired = {}, {}, None, None, set()
  try:
    for strategy in (None, *c.strategies):
      name = strategy or FAILURE_FREE
      fail_times, fail_steps = [], []
      if strategy is not None:
        for f, rec in zip(sc.failures, sim_runs[strategy].recoveries):
          if f.after_steps is not None and sc.name == "single":
            fail_steps.append((f.stage, max(1, round(f.after_steps / rp.chunk))))
          else:   # where it fired at paper scale
            fail_times.append((f.stage, rec["time"] if f.after_steps is not None else f.time))
      t1 = time.perf_counter()
      out = rep.run(strategy, fail_times, fail_steps)
      fired |= {round(r["time"], 1) for r in out["sim_recoveries"]}
      e_row = failstudy.run_row(sc.name, name, out["engine_records"], out["engine_recoveries"],
                                PACED, base_e)
      s_row = failstudy.run_row(sc.name, name, out["sim_records"], out["sim_recoveries"],
                                REPLAY_SIM, base_s)
      e_row |= {"tokens_identical": out["identical"], "paced_overruns": out["overruns"],
                "wall_s": time.perf_counter() - t1, "chunk": rp.chunk,
                "time_scale": rp.time_scale}
      if strategy is None:
        base_e, base_s = e_row, s_row
      rows += [e_row, s_row]
      engine_runs[name + " (paced engine)"] = out["engine_records"]
      sim_runs_replay[name + " (simulator)"] = out["sim_records"]
      cmp = {"scenario": sc.name, "system": name, "kind": "modelled",
             "engine_runtime_s": e_row["total_runtime_s"],
             "sim_runtime_s": s_row["total_runtime_s"],
             "paper_scale_sim_runtime_s": next(r["total_runtime_s"] for r in rows if
                                               r["scenario"] == sc.name and r["system"] == name
                                               and r["source"] == "sim"),
             "engine_mean_e2el_s": e_row["mean_e2el_s"], "sim_mean_e2el_s": s_row["mean_e2el_s"],
             "rel_error_runtime": failstudy.rel(s_row["total_runtime_s"],
                                                e_row["total_runtime_s"]),
             "rel_error_mean_latency": failstudy.rel(s_row["mean_e2el_s"],
                                                     e_row["mean_e2el_s"]),
             "engine_failures": e_row["failures"], "sim_failures": s_row["failures"],
             "tokens_identical": out["identical"], "paced_overruns": out["overruns"],
             "wall_s": e_row["wall_s"]}
      cmp["rel_error_runtime_vs_paper_scale"] = failstudy.rel(cmp["paper_scale_sim_runtime_s"],
                                                              cmp["engine_runtime_s"])
      comparisons.append(cmp)
      log(f"[modelled] {sc.name} {name}: total runtime paced {cmp['engine_runtime_s']:.1f} s, "
          f"sim {cmp['sim_runtime_s']:.1f} s ({cmp['rel_error_runtime']:.1%}), paper-scale sim "
          f"{cmp['paper_scale_sim_runtime_s']:.1f} s; mean latency "
          f"{cmp['engine_mean_e2el_s']:.2f} / {cmp['sim_mean_e2el_s']:.2f} s "
          f"({cmp['rel_error_mean_latency']:.1%}); {out['overruns']} overruns; tokens "
          f"{'identical' if out['identical'] else 'DIFFER'}; {cmp['wall_s']:.1f} s wall")
  finally:
    rep.close()
  if sc.name != "single":
    _plot_timeline(sc, engine_runs | sim_runs_replay,
                   os.path.join(out_dir, f"timeline_{sc.name}_paced.png"),
                   f"[modelled] paced engine vs simulator, {rp.chunk} tokens per paced step",
                   failure_times=sorted(fired))


def _names(value) -> tuple[str, ...]:
  """A tuple of names; the command line hands `--config.paced.scenarios='(one,single)'` over
  as one string."""
  items = (value,) if isinstance(value, str) else tuple(value or ())
  return tuple(n.strip().strip("()[]").strip().strip("'\"") for item in items
               for n in str(item).split(",") if n.strip().strip("()[]").strip())


def run(c, out_dir, log=print) -> list[dict]:
  """Simulates and replays every scenario; writes the JSONL and plots; returns the rows."""
  os.makedirs(out_dir, exist_ok=True)
  rows, comparisons = [], []
  scs = scenarios(c)
  paced = _names(c.paced.scenarios)
  unknown = set(paced) - {sc.name for sc in scs}
  if unknown:
    raise ValueError(f"fig_failures: paced.scenarios {sorted(unknown)} unknown; known: "
                     f"{[sc.name for sc in scs]}")
  single = {}
  for i, sc in enumerate(scs):
    sc, runs = _simulate(sc, c.strategies, rows, {}, log)
    if sc.name == "single":
      single["sim"] = {k: v.records[0].latency for k, v in runs.items()}
    else:
      n = len(sc.failures)
      _plot_timeline(sc, runs, os.path.join(out_dir, f"timeline_{sc.name}.png"),
                     f"[modelled] {sc.model}, {sc.num_stages} stages, microbatch "
                     f"{sc.microbatch_size}, {sc.prompt_len}+{sc.output_len}: {n} failure(s)")
    if sc.name in paced:
      _replay(c, sc, runs, rows, comparisons, out_dir, log)
      if sc.name == "single":
        single["paced"] = {r["system"]: r["mean_e2el_s"] for r in rows
                           if r["scenario"] == "single" and r["source"] == PACED}
  bars = {k: [v, single.get("paced", {}).get(k, math.nan)] for k, v in single["sim"].items()}
  reporting.plot_bars(["simulator", "paced engine"] if "paced" in single else ["simulator"],
                      bars if "paced" in single else {k: v[:1] for k, v in bars.items()},
                      os.path.join(out_dir, "single_request.png"),
                      ylabel="end-to-end latency (s) [modelled]", baseline=FAILURE_FREE,
                      title=f"one {sc.model} request {sc.prompt_len}+{sc.output_len}, "
                            f"failure at token {c.single_fail_token}")
  for r in rows:
    if r["system"] == "restart" and r["source"] == "sim" and not r["lost_tokens"] \
        and r["scenario"] != "single":
      runrecord.warn(log, f"[{r['scenario']}] restart lost no tokens: the failure hit no "
                     "generated work in flight")
  for cmp in comparisons:
    if cmp["rel_error_runtime"] > c.paced.target or not cmp["tokens_identical"]:
      runrecord.warn(log, f"[{cmp['scenario']}] {cmp['system']}: paced engine vs simulator "
                     f"{cmp['rel_error_runtime']:.1%} (target {c.paced.target:.0%}), tokens "
                     f"{'identical' if cmp['tokens_identical'] else 'DIFFER'}")
  reporting.write_rows(os.path.join(out_dir, "failures.jsonl"), rows)
  if comparisons:
    reporting.write_rows(os.path.join(out_dir, "paced_vs_sim.jsonl"), comparisons)
  return rows


def headline(rows) -> str:
  """[modelled] The paper's metrics at paper scale: total runtime and cumulative latency vs
  failure-free (one failure, three failures), one request's end-to-end latency; and the paced
  engine's largest error against its simulator."""
  def pick(scenario, key, source="sim"):
    return {r["system"]: r.get(key) for r in rows
            if r["scenario"] == scenario and r["source"] == source}

  def ratios(scenario, key):
    v = pick(scenario, key)
    base = v.get(FAILURE_FREE)
    return ", ".join(f"{k} {x / base:.3f}x" for k, x in v.items()
                     if k != FAILURE_FREE and base and x is not None)

  parts = []
  setting = {r["scenario"]: r.get("setting") for r in rows if r.get("setting")}
  for scenario, what in (("one", "one failure"), ("series", "three failures")):
    if pick(scenario, "total_runtime_s"):
      parts.append(f"{what} ({setting.get(scenario, '')}): total runtime vs failure-free "
                   f"{ratios(scenario, 'total_runtime_s')}"
                   f"; cumulative latency {ratios(scenario, 'cumulative_latency_s')}")
  lat = pick("single", "mean_e2el_s")
  if lat:
    parts.append(f"one request's end-to-end latency ({setting.get('single', '')}): " + ", ".join(
        f"{k} {x:.2f} s" for k, x in lat.items()))
  paced = {(r["scenario"], r["system"]): r["total_runtime_s"] for r in rows
           if r["source"] == PACED}
  replay = {(r["scenario"], r["system"]): r["total_runtime_s"] for r in rows
            if r["source"] == REPLAY_SIM}
  errs = [failstudy.rel(replay[k], v) for k, v in paced.items() if k in replay]
  if errs:
    parts.append(f"paced engine vs simulator, total runtime: max error {max(errs):.1%} over "
                 f"{len(errs)} runs")
  return "[modelled] " + "; ".join(parts)


if __name__ == "__main__":
  from experiments import figmain  # pylint: disable=g-import-not-at-top
  figmain.main_for(run, headline, TABLE, "configs/fig_failures.py", "results/fig_failures")
