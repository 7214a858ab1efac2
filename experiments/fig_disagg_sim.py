"""Figure: disaggregation vs the colocated baseline, latency against rate, from the simulator
(`configs/fig_disagg_sim.py`; the engine's disaggregation figure: experiments/disaggregation.py).

For each scenario (model, hardware, machines) the baseline is a colocated pipeline over every
machine; the disaggregated systems are every split Dp + Dt = machines that fits memory by the
planner's check (`dejavu_jax.studies.splits`; infeasible ones are listed, not simulated). Writes
`disagg_sim.jsonl` and one `latency_vs_rate_{model}.png` per scenario (p50 solid, p99 dashed, a
colour per system) to --output_dir.

  python -m experiments.fig_disagg_sim --config=configs/fig_disagg_sim.py --output_dir=/tmp/fig
"""

import os

from dejavu_jax import costmodel as cm
from dejavu_jax import planner, sim
from dejavu_jax.studies import reporting
from dejavu_jax.config import get_model_config
from dejavu_jax.studies import runrecord
from dejavu_jax.studies import splits


TABLE = ("model", "system", "rate", "load", "completed", "norm_latency_p50_s_per_tok",
         "norm_latency_p99_s_per_tok", "request_throughput")


def _saturated_rps(cost, machines, c) -> float:
  reqs = sim.saturated_requests(8 * machines * c.batch_size, c.prompt_len, int(c.output_median))
  res = sim.simulate_colocated(cost, reqs, machines, c.batch_size)
  return res.summary["request_throughput"]


def run(c, out_dir, log=print) -> list[dict]:
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  jobs = []
  for spec in c.scenarios:
    name, hw, machines = spec.split(":")
    machines = int(machines)
    model = get_model_config(name, dtype="float16")
    cost = cm.roofline(model, hw, gpus_per_machine=c.gpus_per_machine)
    feasible = splits.feasible_splits(model, hw, machines, c.prompt_len, int(c.output_median),
                                      c.batch_size, c.gpus_per_machine)
    for dp in range(1, machines):
      if (dp, machines - dp) not in feasible:
        rows.append({"model": name, "system": f"disagg {dp}-{machines - dp}", "skipped":
                     splits.check_split(model, hw, dp, machines - dp, c.prompt_len,
                                        int(c.output_median), c.batch_size, c.gpus_per_machine)})
    if not feasible:
      runrecord.warn(log, f"{spec}: no prompt/token split fits memory; only the baseline runs")
    sat = _saturated_rps(cost, machines, c)
    systems = [("baseline", None)] + [(f"disagg {dp}-{dt}", (dp, dt)) for dp, dt in feasible]
    jobs += [(name, hw, machines, cost, sat, s, split, load) for s, split in systems
             for load in c.load]
  bar = runrecord.progress_bar(len(jobs), "simulate rate sweeps", bool(log))
  for i, (name, hw, machines, cost, sat, system, split, load) in enumerate(jobs):
    rate = load * sat
    lens = sim.sample_output_lens(c.num_requests, c.seed, median=c.output_median,
                                  high=c.output_max)
    reqs = sim.make_requests(rate, c.num_requests, c.prompt_len, lens, seed=c.seed)
    if split is None:
      res = sim.simulate_colocated(cost, reqs, machines, c.batch_size,
                                   stage_link=cm.LINKS["inter_vm_40gbps"])
    else:
      res = sim.simulate_disaggregated(cost, reqs, split[0], split[1], c.batch_size,
                                       stream_link=planner.default_stream_link(hw),
                                       host_link=cost.hardware.host_link,
                                       stage_link=cm.LINKS["inter_vm_40gbps"])
    rows.append({"model": name, "hardware": hw, "machines": machines, "rate": rate,
                 "load": load, "baseline_saturated_rps": sat, **res.to_json_dict(),
                 "system": system})
    bar(i + 1, len(jobs))
  bar.close()
  for spec in c.scenarios:
    name, hw, machines = spec.split(":")
    pts = [r for r in rows if r["model"] == name and "rate" in r]
    reporting.plot_latency_vs_rate(pts, os.path.join(out_dir, f"latency_vs_rate_{name}.png"),
                                 log_y=True, title=f"{name} on {machines} x {hw}")
  reporting.write_rows(os.path.join(out_dir, "disagg_sim.jsonl"), rows)
  return rows


def headline(rows) -> str:
  """At the highest load: each split's p50 normalized latency relative to the baseline's."""
  out = []
  for model in dict.fromkeys(r["model"] for r in rows):
    pts = [r for r in rows if r["model"] == model and "rate" in r]
    if not pts:
      continue
    top = max(r["load"] for r in pts)
    at = {r["system"]: r["norm_latency_p50_s_per_tok"] for r in pts if r["load"] == top}
    base = at.get("baseline")
    out.append(f"{model} at {top:g}x baseline saturation: " + ", ".join(
        f"{s} {v / base:.2f}x" for s, v in at.items() if s != "baseline" and base and v))
  return "p50 normalized latency vs baseline: " + "; ".join(out)


if __name__ == "__main__":
  from experiments import figmain  # pylint: disable=g-import-not-at-top
  figmain.main_for(run, headline, TABLE, "configs/fig_disagg_sim.py", "results/fig_disagg_sim")
