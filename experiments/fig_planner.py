"""Figure: the planner's table, and the simulated makespan of a fixed batch of requests under
the baseline (colocated D = machines, no replicas), the baseline with data-parallel replicas (the
best colocated plan the planner found) and the planner's disaggregated split
(`configs/fig_planner.py`).

Writes `planner.jsonl` (one row per model/cluster and system), `planner.txt` (the planner's
reports) and `makespan.png` (grouped bars, every system on one chart) to --output_dir.

  python -m experiments.fig_planner --config=configs/fig_planner.py --output_dir=/tmp/fig
"""

import os

from dejavu_jax import costmodel as cm
from dejavu_jax import planner, sim
from dejavu_jax.studies import reporting
from dejavu_jax.config import get_model_config
from dejavu_jax.studies import runrecord


TABLE = ("cluster", "system", "plan", "throughput_rps", "makespan_s", "speedup_vs_baseline")
SYSTEMS = ("baseline", "best colocated (DP replicas)", "disaggregated")


def _makespan(cost, c, hw, system, **kw) -> float:
  reqs = sim.saturated_requests(c.makespan_requests, c.prompt_len, c.output_len)
  if system == "disaggregated":
    res = sim.simulate_disaggregated(cost, reqs, kw["Dp"], kw["Dt"], kw["batch"],
                                     stream_link=planner.default_stream_link(hw),
                                     host_link=cost.hardware.host_link)
  else:
    res = sim.simulate_colocated(cost, reqs, kw["depth"], kw["batch"], replicas=kw["replicas"])
  return max(r.finish for r in res.records)


def _plans(summary, machines, batch) -> dict:
  """system -> plan kwargs (None where the planner has none)."""
  base = summary["best_baseline"]
  best = summary["best"]
  ap = summary["analytical"]
  plans = {"baseline": dict(depth=machines, replicas=1, batch=batch),
           "best colocated (DP replicas)": dict(depth=base["depth"], replicas=base["replicas"],
                                       batch=base["batch"])}
  if best["system"] == "disaggregated":
    plans["disaggregated"] = dict(Dp=best["Dp"], Dt=best["Dt"], batch=best["batch"])
  elif "Dp" in ap and ap["Dp"] >= 1 and ap["Dt"] >= 1:
    plans["disaggregated"] = dict(Dp=ap["Dp"], Dt=ap["Dt"], batch=batch)
  else:
    plans["disaggregated"] = None
  return plans


def _describe(system, p) -> str:
  if p is None:
    return "infeasible"
  if system == "disaggregated":
    return f"Dp={p['Dp']} Dt={p['Dt']} b={p['batch']}"
  return f"D={p['depth']} x{p['replicas']} b={p['batch']}"


def run(c, out_dir, log=print) -> list[dict]:
  os.makedirs(out_dir, exist_ok=True)
  rows, reports, bars, groups = [], [], {s: [] for s in SYSTEMS}, []
  bar = runrecord.progress_bar(len(c.rows), "planner + makespan", bool(log))
  for i, spec in enumerate(c.rows):
    name, hw, machines = spec.split(":")
    machines = int(machines)
    model = get_model_config(name, dtype="float16")
    wl = planner.Workload(c.prompt_len, c.output_len, c.batch_size)
    cluster = f"{name} {machines}x{hw}"
    groups.append(cluster)
    try:
      text, summary = planner.plan_report(model, machines, hw, wl, c.gpus_per_machine,
                                          c.batch_sizes)
    except ValueError as e:
      rows.append({"cluster": cluster, "system": "planner", "error": str(e)})
      for s in SYSTEMS:
        bars[s].append(float("nan"))
      continue
    reports.append(text)
    cost = cm.roofline(model, hw, gpus_per_machine=c.gpus_per_machine)
    base_span = None
    for system, p in _plans(summary, machines, c.batch_size).items():
      span = _makespan(cost, c, hw, system, **p) if p else float("nan")
      base_span = span if system == "baseline" else base_span
      bars[system].append(span)
      rows.append({"cluster": cluster, "model": name, "hardware": hw, "machines": machines,
                   "system": system, "plan": _describe(system, p), "makespan_s": span,
                   "throughput_rps": c.makespan_requests / span if p else None,
                   "speedup_vs_baseline": base_span / span if p else None,
                   "planner_gain_vs_best_baseline": summary["gain_vs_best_baseline"],
                   "planner": summary})
    bar(i + 1, len(c.rows))
  bar.close()
  reporting.write_rows(os.path.join(out_dir, "planner.jsonl"), rows)
  with open(os.path.join(out_dir, "planner.txt"), "w") as f:
    f.write("\n\n".join(reports) + "\n")
  # Clusters differ by orders of magnitude in makespan; relative to each cluster's baseline the
  # bars share one linear axis (the seconds are in planner.jsonl and the table).
  rel = {s: [v / b if b and b == b else float("nan") for v, b in zip(vals, bars["baseline"])]
         for s, vals in bars.items()}
  reporting.plot_bars(groups, rel, os.path.join(out_dir, "makespan.png"),
                      ylabel=f"makespan of {c.makespan_requests} requests / baseline's",
                      baseline="baseline", value_fmt="{:.2f}",
                      title=f"prompt {c.prompt_len}, output {c.output_len} tokens")
  return rows


def headline(rows) -> str:
  out = []
  for r in rows:
    if r.get("system") == "disaggregated" and r.get("speedup_vs_baseline"):
      rep = next(x for x in rows if x.get("cluster") == r["cluster"]
                 and x.get("system") == "best colocated (DP replicas)")
      out.append(f"{r['cluster']}: disaggregated {r['speedup_vs_baseline']:.2f}x, "
                 f"best colocated with DP replicas {rep['speedup_vs_baseline']:.2f}x")
  return "makespan speedup vs baseline: " + "; ".join(out)


if __name__ == "__main__":
  from experiments import figmain  # pylint: disable=g-import-not-at-top
  figmain.main_for(run, headline, TABLE, "configs/fig_planner.py", "results/fig_planner")
