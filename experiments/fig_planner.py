"""Figure: the planner's reports and the appendix's cost/makespan comparison on a trace
(`configs/fig_planner.py`): Baseline (colocated over every machine, one pipeline), Baseline-DP
(the best colocated plan with data-parallel replicas, from the planner's search) and DéjàVu (the
best prompt/token split either search simulated, with or without replicas; the closed-form
split only where both pruned every split),
each simulated on the same trace; and the planner's recommendation with data-parallel replicas
allowed and without (the paper's baseline has none), each also run on the trace. Cost is
machine-hours (machines the plan uses x makespan) and dollars at `machine_hour_usd`.

Writes `planner.jsonl` (one row per cluster and system), `planner.txt` (the planner's reports,
with and without replicas) and `makespan.png` (makespan relative to the Baseline's) to
--output_dir. Modelled: the simulator replays the roofline cost model.

  python -m experiments.fig_planner --config=configs/fig_planner.py --output_dir=/tmp/fig
"""

import os

from dejavu_jax import costmodel as cm
from dejavu_jax import planner, sim
from dejavu_jax.config import get_model_config
from dejavu_jax.studies import paper
from dejavu_jax.studies import reporting
from dejavu_jax.studies import runrecord


KIND = "modelled"
TABLE = ("cluster", "system", "plan", "machines_used", "makespan_s", "speedup_vs_baseline",
         "machine_hours", "cost_usd")
SYSTEMS = ("Baseline", "Baseline-DP", "DéjàVu")


def setting(c) -> str:
  trace = (f"{c.trace_requests} Poisson requests at {c.trace_load:g}x the Baseline's capacity"
           if c.trace == "poisson" else f"{c.trace_requests} requests waiting at t=0")
  return (f"{c.variant}: {', '.join(c.rows)} (x{c.gpus_per_machine} GPUs), prompt {c.prompt_len}"
          f", microbatch {c.batch_size}, LMSys mean {c.output_mean:g} clamped to {c.output_max},"
          f" {c.lengths} lengths; trace: {trace}")


def _plan(summary_key, summary, machines, batch, no_dp=None):
  if summary_key == "Baseline":
    return dict(system="colocated", depth=machines, replicas=1, batch=batch)
  if summary_key == "Baseline-DP":
    b = summary["best_baseline"]
    return dict(system="colocated", depth=b["depth"], replicas=b["replicas"], batch=b["batch"])
  if summary_key == "DéjàVu":   # the searches' best split (the pruning differs between them)
    found = [x for x in (summary.get("best_disaggregated"),
                         (no_dp or {}).get("best_disaggregated")) if x]
    d = max(found, key=lambda x: x["throughput_rps"]) if found else None
    if d:
      return dict(system="disaggregated", Dp=d["Dp"], Dt=d["Dt"], batch=d["batch"])
    ap = summary["analytical"]
    if "Dp" in ap and ap["Dp"] >= 1 and ap["Dt"] >= 1:
      return dict(system="disaggregated", Dp=ap["Dp"], Dt=ap["Dt"], batch=batch,
                  closed_form=True)
    return None
  best = summary[summary_key]
  keys = ("depth", "replicas") if best["system"] == "colocated" else ("Dp", "Dt")
  return dict(system=best["system"], batch=best["batch"], **{k: best[k] for k in keys})


def _describe(p) -> str:
  if p is None:
    return "infeasible"
  if p["system"] == "disaggregated":
    return (f"Dp={p['Dp']} Dt={p['Dt']} b={p['batch']}"
            + (" (closed form)" if p.get("closed_form") else ""))
  return f"D={p['depth']} x{p['replicas']} b={p['batch']}"


def _machines(p) -> int:
  return p["Dp"] + p["Dt"] if p["system"] == "disaggregated" else p["depth"] * p["replicas"]


def _trace(c, rate, batch):
  if c.trace == "saturated":
    out = max(2, round(c.output_mean))
    if c.lengths == "equal":
      return sim.saturated_requests(c.trace_requests, c.prompt_len, out)
    return sim.saturated_requests(c.trace_requests, c.prompt_len,
                                  paper.output_lens(c.trace_requests, batch, c.seed,
                                                    c.output_mean))
  return paper.requests(rate, c.trace_requests, c.prompt_len, batch, c.seed, c.output_mean)


def _simulate(cost, hw, p, reqs):
  micro = "paper"
  if p["system"] == "disaggregated":
    return sim.simulate_disaggregated(cost, reqs, p["Dp"], p["Dt"], p["batch"],
                                      stream_link=planner.default_stream_link(hw),
                                      host_link=cost.hardware.host_link, microbatching=micro)
  return sim.simulate_colocated(cost, reqs, p["depth"], p["batch"], replicas=p["replicas"],
                                microbatching=micro)


def run(c, out_dir, log=print) -> list[dict]:
  if c.trace not in ("poisson", "saturated") or c.lengths not in ("per_microbatch", "equal"):
    raise ValueError(f"trace must be poisson|saturated and lengths per_microbatch|equal; got "
                     f"{c.trace!r}, {c.lengths!r}")
  os.makedirs(out_dir, exist_ok=True)
  rows, reports, groups = [], [], []
  bars = {s: [] for s in SYSTEMS + ("planner (DP allowed)", "planner (no DP)")}
  bar = runrecord.progress_bar(len(c.rows), "planner + trace", bool(log))
  for i, spec in enumerate(c.rows):
    name, hw, machines = spec.split(":")
    machines = int(machines)
    model = get_model_config(name, dtype="float16")
    dist = "per_microbatch" if c.lengths == "per_microbatch" else "equal"
    wl = planner.Workload(c.prompt_len, max(2, round(c.output_mean)), c.batch_size, dist, c.seed)
    cluster = f"{name} {machines}x{hw}"
    try:
      text, summary = planner.plan_report(model, machines, hw, wl, c.gpus_per_machine,
                                          c.batch_sizes)
      text1, summary1 = planner.plan_report(model, machines, hw, wl, c.gpus_per_machine,
                                            c.batch_sizes, max_replicas=1)
    except ValueError as e:
      rows.append({"cluster": cluster, "system": "planner", "error": str(e)})
      for s in bars:
        bars[s].append(float("nan"))
      continue
    groups.append(cluster)
    reports += [f"== with data-parallel replicas ==\n{text}",
                f"== without data-parallel replicas ==\n{text1}"]
    cost = cm.roofline(model, hw, gpus_per_machine=c.gpus_per_machine)
    base_plan = _plan("Baseline", summary, machines, c.batch_size)
    cap = summary["plain_baseline"]["throughput_rps"] if summary.get("plain_baseline") else None
    if cap is None:
      cap = planner.simulate_candidate(cost, planner.Candidate(
          "colocated", c.batch_size, depth=machines, replicas=1), wl, machines).throughput_rps
    rate = c.trace_load * cap
    plans = {s: _plan(s, summary, machines, c.batch_size, summary1) for s in SYSTEMS}
    plans["planner (DP allowed)"] = _plan("best", summary, machines, c.batch_size)
    plans["planner (no DP)"] = _plan("best", summary1, machines, c.batch_size)
    base_span = None
    for system, p in plans.items():
      if p is None:
        bars[system].append(float("nan"))
        rows.append({"cluster": cluster, "system": system, "plan": "infeasible"})
        continue
      res = _simulate(cost, hw, p, _trace(c, rate, p["batch"]))
      span = max(r.finish for r in res.records)
      base_span = span if system == "Baseline" else base_span
      bars[system].append(span)
      hours = _machines(p) * span / 3600
      rows.append({"cluster": cluster, "model": name, "hardware": hw, "machines": machines,
                   "system": system, "plan": _describe(p), "machines_used": _machines(p),
                   "makespan_s": span, "speedup_vs_baseline": base_span / span,
                   "machine_hours": hours, "cost_usd": hours * c.machine_hour_usd,
                   "trace_rate_rps": rate if c.trace == "poisson" else None,
                   "baseline_capacity_rps": cap,
                   "norm_latency_p50_s_per_tok": res.summary["norm_latency_p50_s_per_tok"],
                   "planner_gain_vs_best_baseline": summary["gain_vs_best_baseline"],
                   "planner": summary if system == "planner (DP allowed)" else
                   (summary1 if system == "planner (no DP)" else None)})
    bar(i + 1, len(c.rows))
  bar.close()
  reporting.write_rows(os.path.join(out_dir, "planner.jsonl"), rows)
  with open(os.path.join(out_dir, "planner.txt"), "w") as f:
    f.write("\n\n".join(reports) + "\n")
  rel = {s: [v / b if b and b == b else float("nan") for v, b in zip(vals, bars["Baseline"])]
         for s, vals in bars.items()}
  what = (f"{c.trace_requests} requests at {c.trace_load:g}x Baseline capacity"
          if c.trace == "poisson" else f"{c.trace_requests} requests waiting")
  reporting.plot_bars(groups, rel, os.path.join(out_dir, "makespan.png"),
                      ylabel="makespan / Baseline's", baseline="Baseline", value_fmt="{:.2f}",
                      title=f"{what}; prompt {c.prompt_len}, LMSys mean {c.output_mean:g}")
  return rows


def headline(rows) -> str:
  out = []
  for cluster in dict.fromkeys(r["cluster"] for r in rows if "makespan_s" in r):
    by = {r["system"]: r for r in rows if r["cluster"] == cluster and "makespan_s" in r}
    parts = [f"{s} {by[s]['speedup_vs_baseline']:.2f}x" for s in ("Baseline-DP", "DéjàVu")
             if s in by]
    recs = [f"{s.split('(')[1].rstrip(')')}: {by[s]['plan']}"
            for s in ("planner (DP allowed)", "planner (no DP)") if s in by]
    cost = (f", cost ${by['Baseline']['cost_usd']:.2f} (Baseline) vs "
            f"${by['DéjàVu']['cost_usd']:.2f} (DéjàVu)"
            if "DéjàVu" in by else "")
    out.append(f"{cluster}: {', '.join(parts)}{cost}; planner recommends " + "; ".join(recs))
  return "makespan speedup vs Baseline on the trace: " + " | ".join(out)


if __name__ == "__main__":
  from experiments import figmain  # pylint: disable=g-import-not-at-top
  figmain.main_for(run, headline, TABLE, "configs/fig_planner.py", "results/fig_planner")
