"""Figure 8 from the simulator: "DéjàVu Dp-Dt vs Baseline-D", latency against rate, and a
sensitivity panel over the prompt -> token link (`configs/fig_disagg_sim.py`; the engine's
figure: experiments/disaggregation.py).

For each scenario (model, hardware, machines) the baseline is a colocated pipeline over every
machine (Baseline-D) and DéjàVu runs the planner's split Dp + Dt = machines (the analytical
planner with the memory constraints; `systems="feasible"` adds every memory-feasible split,
`dejavu_jax.studies.splits`). Capacities are simulated on the very workload the sweep draws
(`studies/paper.py`), and the rates cross both systems' saturation. The sensitivity panel: each
feasible split's saturated throughput over the baseline's as the link bandwidth varies, the
planner's pick at each bandwidth marked, and one more point at the prompt -> token link
measured by benchmarks/transport.py when its table exists (`links_table`: "auto" takes
`costmodel.DEFAULT_LINK_TABLE` if it is there, a path must exist, "none" sweeps constant links
only; every sensitivity row and the headline say which). The rate sweep keeps the paper's
40 Gbps inter-VM link. Everything is modelled (the simulator replays the roofline cost model,
on a link fitted to measured transfers where one is used). Writes `disagg_sim.jsonl`,
`latency_vs_rate_{model}.png` (p50 solid, p99 dashed; throughput beside it) and
`link_sensitivity.png` to --output_dir.

  python -m experiments.fig_disagg_sim --config=configs/fig_disagg_sim.py --output_dir=/tmp/fig
"""

import os

from dejavu_jax import costmodel as cm
from dejavu_jax import planner, sim
from dejavu_jax.config import get_model_config
from dejavu_jax.studies import paper
from dejavu_jax.studies import reporting
from dejavu_jax.studies import runrecord
from dejavu_jax.studies import splits


KIND = "modelled"
TABLE = ("model", "system", "rate", "load", "completed", "norm_latency_p50_s_per_tok",
         "norm_latency_p99_s_per_tok", "request_throughput", "capacity_rps")


def setting(c) -> str:
  return (f"{c.variant}: {', '.join(s.replace(':', ' on ', 1).replace(':', ' x ') for s in c.scenarios)}"
          f" (x{c.gpus_per_machine} GPUs), prompt {c.prompt_len}, microbatch {c.batch_size}, "
          f"LMSys mean {c.output_mean:g} [2, {c.output_max}] {c.lengths}, {c.num_requests} "
          f"requests per rate, capacity from {c.capacity}; {_links_setting(c)}")


def links_table_path(c) -> str | None:
  """The measured link table the sensitivity panel uses (module doc), None for constant links
  only. An explicit path that does not exist is an error naming it."""
  value = c.get("links_table", "auto")
  if value in (None, "", "none"):
    return None
  if value == "auto":
    return cm.DEFAULT_LINK_TABLE if os.path.exists(cm.DEFAULT_LINK_TABLE) else None
  if not os.path.exists(value):
    raise cm.LinkTableError(f"links_table {value!r} does not exist (write one with "
                            "benchmarks/transport.py, or pass 'auto' or 'none')")
  return value


def measured_link(c) -> tuple[cm.Link | None, dict | None]:
  """(the prompt -> token link calibrated from the measured table, the table's record), or
  (None, None) without a table."""
  path = links_table_path(c)
  if path is None:
    return None, None
  links = cm.calibrate_links(cm.load_link_table(path))
  if "prompt_kv" not in links:
    raise cm.LinkTableError(f"links_table {path!r} has no prompt_kv rows")
  return links["prompt_kv"], cm.link_table_record(path)


def _links_setting(c) -> str:
  path = links_table_path(c)
  if path:
    return f"link sensitivity also at the link of the measured table {path}"
  if c.get("links_table", "auto") == "auto":
    return f"link sensitivity on constant links only (no measured table at {cm.DEFAULT_LINK_TABLE})"
  return "link sensitivity on constant links only"


def _name(split, machines) -> str:
  return f"Baseline-{machines}" if split is None else f"DéjàVu {split[0]}-{split[1]}"


def _simulator(cost, hw, machines, split, stream_link=None, microbatching="paper"):
  stage_link = cm.LINKS["inter_vm_40gbps"]
  if split is None:
    return lambda **kw: sim.simulate_colocated(cost, num_stages=machines, stage_link=stage_link,
                                               microbatching=microbatching, **kw)
  link = stream_link or planner.default_stream_link(hw)
  return lambda **kw: sim.simulate_disaggregated(
      cost, prompt_stages=split[0], token_stages=split[1], stream_link=link,
      host_link=cost.hardware.host_link, stage_link=stage_link, microbatching=microbatching, **kw)


def _workload(c) -> planner.Workload:
  return planner.Workload(c.prompt_len, max(2, round(c.output_mean)), c.batch_size,
                          "per_microbatch", c.seed)


def planner_split(cost, machines, c, link) -> tuple[int, int] | None:
  try:
    ap = planner.analytical_plan(cost, machines, _workload(c), cost.machine_memory_bytes,
                                 stream_link=link)
  except ValueError:
    return None
  return ap.Dp, ap.Dt


def _capacity(c, cost, hw, machines, split, link=None) -> float:
  if c.capacity == "equal_lengths":   # legacy: every request of the median length
    reqs = sim.saturated_requests(8 * machines * c.batch_size, c.prompt_len,
                                  int(c.output_median))
    return _simulator(cost, hw, machines, split, link, "greedy")(
        requests=reqs, batch_size=c.batch_size).summary["request_throughput"]
  period = machines if split is None else max(split)
  return paper.capacity(_simulator(cost, hw, machines, split, link), period, c.batch_size,
                        c.prompt_len, c.seed, c.output_mean)


def _requests(c, rate):
  if c.lengths == "per_microbatch":
    return paper.requests(rate, c.num_requests, c.prompt_len, c.batch_size, c.seed, c.output_mean)
  lens = sim.sample_output_lens(c.num_requests, c.seed, median=c.output_median,
                                high=c.output_max)
  return sim.make_requests(rate, c.num_requests, c.prompt_len, lens, seed=c.seed)


def _check(c):
  if c.lengths not in ("per_microbatch", "per_request"):
    raise ValueError(f"lengths must be per_microbatch or per_request, got {c.lengths!r}")
  if c.capacity not in ("same_workload", "equal_lengths"):
    raise ValueError(f"capacity must be same_workload or equal_lengths, got {c.capacity!r}")
  if c.systems not in ("planner", "feasible"):
    raise ValueError(f"systems must be planner or feasible, got {c.systems!r}")


def run(c, out_dir, log=print) -> list[dict]:
  _check(c)
  measured, table = measured_link(c) if c.sensitivity_gbps else (None, None)
  os.makedirs(out_dir, exist_ok=True)
  rows, sens = [], []
  for spec in c.scenarios:
    name, hw, machines = spec.split(":")
    machines = int(machines)
    model = get_model_config(name, dtype="float16")
    cost = cm.roofline(model, hw, gpus_per_machine=c.gpus_per_machine)
    out_len = max(2, round(c.output_mean))
    feasible = splits.feasible_splits(model, hw, machines, c.prompt_len, out_len, c.batch_size,
                                      c.gpus_per_machine)
    chosen = planner_split(cost, machines, c, planner.default_stream_link(hw))
    if c.systems == "feasible":
      for dp in range(1, machines):
        if (dp, machines - dp) not in feasible:
          rows.append({"model": name, "system": _name((dp, machines - dp), machines),
                       "skipped": splits.check_split(model, hw, dp, machines - dp, c.prompt_len,
                                                     out_len, c.batch_size, c.gpus_per_machine)})
      shown = feasible
    else:
      shown = [chosen] if chosen else []
    if not shown:
      runrecord.warn(log, f"{spec}: no prompt/token split fits memory; only the baseline runs")
    systems = [None] + list(shown)
    caps = {s: _capacity(c, cost, hw, machines, s) for s in systems}
    if c.capacity == "equal_lengths":
      rates = [load * caps[None] for load in c.loads]
    else:
      rates = paper.sweep_rates(list(caps.values()), c.loads)
    log(f"{spec}: planner split {chosen}; capacity " + ", ".join(
        f"{_name(s, machines)} {v:.3f} req/s" for s, v in caps.items()))
    bar = runrecord.progress_bar(len(systems) * len(rates), f"{name} rate sweep", bool(log))
    for i, (split, rate) in enumerate((s, r) for s in systems for r in rates):
      res = _simulator(cost, hw, machines, split,
                       microbatching="paper" if c.lengths == "per_microbatch" else "greedy")(
                           requests=_requests(c, rate), batch_size=c.batch_size)
      rows.append({"model": name, "hardware": hw, "machines": machines, "rate": rate,
                   "load": rate / caps[None], "capacity_rps": caps[split],
                   "planner_split": list(chosen) if chosen else None,
                   **res.to_json_dict(), "system": _name(split, machines),
                   "chosen": split is not None and split == chosen,
                   "slo_factor": c.slo_factor})
      bar(i + 1, len(systems) * len(rates))
    bar.close()
    links = [("constant", g, paper.link_gbps(g)) for g in c.sensitivity_gbps]
    if c.sensitivity_gbps and measured is not None:
      links.append(("measured", measured.bandwidth * 8 / 1e9, measured))
    for source, gbps, link in links:
      pick = planner_split(cost, machines, c, link)
      for split in feasible:
        cap = _capacity(c, cost, hw, machines, split, link)
        sens.append({"model": name, "machines": machines, "kind": "link_sensitivity",
                     "link_gbps": gbps, "link": link.name,
                     "link_latency_s": link.latency, "link_source": source,
                     "links_table": table if source == "measured" else None,
                     "measured_table": table, "system": _name(split, machines),
                     "capacity_rps": cap, "baseline_capacity_rps": caps[None],
                     "gain": cap / caps[None], "planner_pick": split == pick})
  reporting.write_rows(os.path.join(out_dir, "disagg_sim.jsonl"), rows + sens)
  for spec in c.scenarios:
    name, hw, machines = spec.split(":")
    pts = [r for r in rows if r["model"] == name and "rate" in r]
    _plot_sweep(pts, os.path.join(out_dir, f"latency_vs_rate_{name}.png"),
                f"{name} on {machines} x {c.gpus_per_machine} {hw} (simulated)")
  if sens:
    _plot_sensitivity(sens, os.path.join(out_dir, "link_sensitivity.png"))
  return rows + sens


def _plot_sweep(pts, path, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for i, system in enumerate(dict.fromkeys(r["system"] for r in pts)):
    mine = sorted((r for r in pts if r["system"] == system), key=lambda r: r["rate"])
    mark = " (planner's split)" if mine and mine[0]["chosen"] else ""
    x = [r["rate"] for r in mine]
    a.plot(x, [r["norm_latency_p50_s_per_tok"] for r in mine], "-o", color=f"C{i}",
           label=f"{system}{mark} p50")
    a.plot(x, [r["norm_latency_p99_s_per_tok"] for r in mine], "--", color=f"C{i}",
           label=f"{system} p99")
    b.plot(x, [r["request_throughput"] for r in mine], "-o", color=f"C{i}", label=system)
    b.axhline(mine[0]["capacity_rps"], color=f"C{i}", lw=0.7, ls=":")
  a.set(xlabel="request rate (req/s)", ylabel="normalized latency (s/token)", yscale="log")
  b.set(xlabel="request rate (req/s)", ylabel="throughput (req/s; dotted: capacity)")
  for ax in (a, b):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_sensitivity(sens, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  models = list(dict.fromkeys(r["model"] for r in sens))
  fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
  for ax, model in zip(axes[0], models):
    mine = [r for r in sens if r["model"] == model]
    for i, system in enumerate(dict.fromkeys(r["system"] for r in mine)):
      pts = sorted((r for r in mine if r["system"] == system and r["link_source"] == "constant"),
                   key=lambda r: r["link_gbps"])
      ax.plot([r["link_gbps"] for r in pts], [r["gain"] for r in pts], "-", color=f"C{i}",
              label=system)
      picked = [r for r in pts if r["planner_pick"]]
      ax.plot([r["link_gbps"] for r in picked], [r["gain"] for r in picked], "*", ms=12,
              color=f"C{i}")
      for r in (r for r in mine if r["system"] == system and r["link_source"] == "measured"):
        ax.plot([r["link_gbps"]], [r["gain"]], "*" if r["planner_pick"] else "D",
                ms=12 if r["planner_pick"] else 6, color=f"C{i}", mec="black")
    for r in mine:
      if r["link_source"] == "measured":
        ax.axvline(r["link_gbps"], color="black", lw=0.8, ls="--",
                   label=f"measured {r['link']} ({r['link_latency_s'] * 1e3:.1f} ms)")
        break
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axvline(40, color="gray", lw=0.6, ls=":")
    ax.set(xscale="log", xlabel="prompt -> token link (Gbps; dotted: the paper's 40)",
           ylabel="saturated throughput / Baseline's", title=f"{model} (star: planner's pick)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def headline(rows) -> str:
  """Per model: DéjàVu's throughput over the baseline's at equal median normalized latency
  (the bound: slo x the baseline's light-load median) and the saturated capacities."""
  out = []
  for model in dict.fromkeys(r["model"] for r in rows if "rate" in r):
    pts = [r for r in rows if r["model"] == model and "rate" in r]
    base = next(r["system"] for r in pts if r["system"].startswith("Baseline"))
    g = paper.gain_at_equal_latency(pts, base, pts[0].get("slo_factor", 2.0))
    cap = {r["system"]: r["capacity_rps"] for r in pts}
    parts = [f"{s} x{g['gain'][s]:.2f} ({g['throughput'][s]:.2f} vs "
             f"{g['throughput'][base]:.2f} req/s; capacity {cap[s]:.2f} vs {cap[base]:.2f})"
             for s in g["gain"] if s != base]
    out.append(f"{model}: " + ", ".join(parts) + f" at p50 <= {g['bound']:.3f} s/tok")
  sens = [r for r in rows if r.get("kind") == "link_sensitivity"]
  for model in dict.fromkeys(r["model"] for r in sens):
    const = [r for r in sens if r["model"] == model and r["link_source"] == "constant"]
    pays = sorted({r["link_gbps"] for r in const if r["planner_pick"] and r["gain"] > 1})
    if pays:
      out.append(f"{model}: the planner's split beats the baseline from {pays[0]:g} Gbps")
    meas = [r for r in sens if r["model"] == model and r["link_source"] == "measured"]
    pick = next((r for r in meas if r["planner_pick"]), None)
    if pick:
      best = max(meas, key=lambda r: r["gain"])
      out.append(f"{model} at the measured link ({pick['link']} {pick['link_gbps']:.1f} Gbps "
                 f"+ {pick['link_latency_s'] * 1e3:.2f} ms): the planner picks {pick['system']} "
                 f"x{pick['gain']:.2f} saturated (best split {best['system']} "
                 f"x{best['gain']:.2f})")
  if sens:
    table = next((r["measured_table"] for r in sens if r.get("measured_table")), None)
    out.append(f"links: measured table {table['path']} (sha256 {table['sha256'][:12]})" if table
               else "links: constant (no measured link table)")
  return "throughput at equal median normalized latency vs Baseline-D: " + "; ".join(out)


if __name__ == "__main__":
  from experiments import figmain  # pylint: disable=g-import-not-at-top
  figmain.main_for(run, headline, TABLE, "configs/fig_disagg_sim.py", "results/fig_disagg_sim")
