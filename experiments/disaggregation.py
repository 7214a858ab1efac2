"""Fig 8 on the engine: "DéjàVu Dp-Dt vs Baseline-D", paced and simulated latency vs rate
(dejavu_jax/studies/disagg_experiment.py; `configs/disaggregation.py`: the paper's setting,
OPT-66B on 4 and BLOOM-176B on 8 machines; `:legacy` adds the split's neighbours).

Writes `results.jsonl` (one object per system, rate and source: "paced" runs of the real
engines, "sim" the simulator on the same requests in the same chunks, "sim_unchunked" the
simulator on the same requests at paper scale (one decode step per token: what chunking
changes); median and p99 normalized latency in modeled seconds per paper-scale token,
throughput, tokens identical to `fake_generate`) and `latency_vs_rate[_{model}].png`. Every
number is modelled: the paced steps sleep to the cost model (scaled by `time_scale`, decode
steps in chunks of `chunk`, studies/disagg_experiment.py), only the tokens are computed.

  python -m experiments.disaggregation --config=configs/disaggregation.py --output_dir=/tmp/dis
"""

import json
import os

# Stages run on virtual CPU devices unless the caller set XLA_FLAGS (before jax is imported).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import flags  # noqa: E402

from dejavu_jax.studies import cli  # noqa: E402
from dejavu_jax.studies import disagg_experiment as dx  # noqa: E402
from dejavu_jax import metrics  # noqa: E402

_OUT = flags.DEFINE_string("output_dir", "/tmp/dejavu_disaggregation", "where results go")


KIND = "modelled"   # paced runs replay the cost model (tokens are real)


def scenarios(c) -> list[dx.Scenario]:
  out = []
  for spec in c.scenarios:
    model, hw, machines = spec.split(":")
    out.append(dx.Scenario(model=model, hardware=hw, gpus_per_machine=c.gpus_per_machine,
                           machines=int(machines), prompt_len=c.prompt_len,
                           real_prompt_len=c.real_prompt_len, batch=c.batch_size,
                           output_mean=c.output_mean, time_scale=c.time_scale,
                           stream_link=c.stream_link, host_slots=c.host_slots, seed=c.seed,
                           chunk=c.get("chunk", 1)))
  return out


def setting(c) -> str:
  pace = (f"time x{c.time_scale:g}, decode steps in chunks of {c.get('chunk', 1)}, "
          f"{c.num_microbatches} microbatches per rate, "
          + (f"rates {list(c.rates)} req/s" if c.rates else f"loads {list(c.loads)} of capacity"))
  return (f"{c.variant}: {', '.join(c.scenarios)} (x{c.gpus_per_machine} GPUs), prompt "
          f"{c.prompt_len} (fake program {c.real_prompt_len}), microbatch {c.batch_size}, LMSys "
          f"mean {c.output_mean:g} clamped to {c.output_max}, {c.lengths} lengths, systems "
          f"{c.systems}; paced {pace}")


def _row(sc, system, rate, source, summary, **extra):
  return {"model": sc.model, "machines": sc.machines, "system": _name(system), "rate": rate,
          "source": source,
          "norm_latency_p50_s_per_tok": summary["norm_latency_p50_s_per_tok"],
          "norm_latency_p99_s_per_tok": summary["norm_latency_p99_s_per_tok"],
          "request_throughput": summary["request_throughput"],
          "completed": summary["completed"], **extra}


def _name(system) -> str:
  return (f"Baseline-{system[1]}" if system[0] == "colocated"
          else f"DéjàVu {system[1]}-{system[2]}")


# experiments/figures.py: the columns its index shows, and the headline number.
TABLE = ("model", "system", "source", "rate", "norm_latency_p50_s_per_tok",
         "norm_latency_p99_s_per_tok", "request_throughput", "capacity_rps", "tokens_identical",
         "paced_overruns")


def headline(rows) -> str:
  """Per model: each split's throughput over the baseline's at equal median normalized latency
  (paced engine; the simulator's on the same chunks, and unchunked, in brackets) and how far
  the simulator is from the paced runs."""
  from dejavu_jax.studies import paper  # pylint: disable=g-import-not-at-top
  out = []
  for model in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == model]
    base = next((r["system"] for r in mine if r["system"].startswith("Baseline")), None)
    if base is None:
      continue
    sources = [s for s in ("paced", "sim", "sim_unchunked") if any(r["source"] == s
                                                                    for r in mine)]
    g = {src: paper.gain_at_equal_latency([r for r in mine if r["source"] == src], base,
                                          mine[0].get("slo_factor", 2.0))
         for src in sources}
    chunk = mine[0].get("chunk", 1)
    parts = [f"{s} x{g['paced']['gain'][s]:.2f} (sim x{g['sim']['gain'][s]:.2f}"
             + (f", sim unchunked x{g['sim_unchunked']['gain'][s]:.2f}"
                if "sim_unchunked" in g else "") + ")"
             for s in g["paced"]["gain"] if s != base]
    over = [r.get("paced_overruns") or 0 for r in mine if r["source"] == "paced"]
    paced = {(r["system"], r["rate"]): r for r in mine if r["source"] == "paced"}
    errs = [abs(r["norm_latency_p50_s_per_tok"] / paced[k]["norm_latency_p50_s_per_tok"] - 1)
            for r in mine if r["source"] == "sim"
            for k in [(r["system"], r["rate"])] if paced.get(k, {}).get(
                "norm_latency_p50_s_per_tok")]
    sim_txt = f"; sim vs paced p50 within {max(errs):.0%}" if errs else ""
    out.append(f"{model}: {', '.join(parts)} vs {base} at p50 <= "
               f"{g['paced']['bound']:.3f} s/tok{sim_txt}; chunks of {chunk}, "
               f"{max(over)} paced overruns at most per run")
  return ("modelled (the paced engine replays the cost model): throughput at equal median "
          "normalized latency: " + "; ".join(out))


def _systems(sc, mode) -> list[tuple]:
  if mode == "neighbours":
    return dx.systems(sc)
  if mode != "planner":
    raise ValueError(f"systems must be planner or neighbours, got {mode!r}")
  dp, dt = dx.planner_split(sc)
  return [("colocated", sc.machines), ("disagg", dp, dt)]


def _capacity(sc, system) -> float:
  from dejavu_jax.studies import paper  # pylint: disable=g-import-not-at-top
  period = sc.machines if system[0] == "colocated" else max(system[1], system[2])
  return paper.capacity(lambda requests, batch_size: dx.simulate_records(sc, system, requests),
                        period, sc.batch, sc.prompt_len, sc.seed, sc.output_mean)


def run(config, output_dir: str, log=print) -> list[dict]:
  """Runs every system at every rate, paced and simulated; writes the JSONL and the plots."""
  from dejavu_jax.studies import paper  # pylint: disable=g-import-not-at-top
  os.makedirs(output_dir, exist_ok=True)
  rows = []
  for sc in scenarios(config):
    systems = _systems(sc, config.systems)
    caps = {s: _capacity(sc, s) for s in systems}
    rates = (list(config.rates) if config.rates else
             paper.sweep_rates(list(caps.values()), config.loads))
    log(f"{sc.model} on {sc.machines}: " + ", ".join(f"{_name(s)} capacity {v:.3f} req/s"
                                                    for s, v in caps.items())
        + f"; rates {[round(r, 3) for r in rates]}")
    lens = dict(enumerate(dx.output_lens(sc, config.num_microbatches)))
    for system in systems:
      eng = dx.make_engine(sc, system)
      try:
        for rate in rates:
          reqs = dx.make_requests(sc, config.num_microbatches, rate / sc.time_scale, system)
          served = eng.serve(reqs)
          identical = served.tokens() == dx.reference_tokens(sc, reqs)
          extra = dict(capacity_rps=caps[system], slo_factor=config.slo_factor,
                       chunk=sc.chunk, time_scale=sc.time_scale,
                       chosen=system[0] != "colocated" and system[1:] == dx.planner_split(sc))
          rows.append(_row(sc, system, rate, "paced", metrics.summarize(dx.modelled_records(
              served.records, sc.time_scale, sc.prompt_len, lens)), tokens_identical=identical,
              paced_overruns=served.summary.get("paced_overruns"), wall_s=served.wall_s,
              **extra))
          paced = rows[-1]
          simulated = dx.simulate(sc, system, reqs)
          rows.append(_row(sc, system, rate, "sim", metrics.summarize(dx.modelled_records(
              simulated.records, 1.0, sc.prompt_len, lens)), **extra))
          line = (f"  {_name(system)} rate {rate:.3f}: paced p50 "
                  f"{paced['norm_latency_p50_s_per_tok']:.4f} s/tok, sim "
                  f"{rows[-1]['norm_latency_p50_s_per_tok']:.4f}")
          if sc.chunk > 1:
            unchunked = dx.simulate(sc, system, reqs, chunked=False, output_lens=lens)
            rows.append(_row(sc, system, rate, "sim_unchunked", metrics.summarize(
                dx.modelled_records(unchunked.records, 1.0, sc.prompt_len, lens)), **extra))
            line += f", unchunked {rows[-1]['norm_latency_p50_s_per_tok']:.4f}"
          log(f"{line}; overruns {paced['paced_overruns']}, {paced['wall_s']:.0f} s")
      finally:
        eng.close()
  with open(os.path.join(output_dir, "results.jsonl"), "w") as f:
    for r in rows:
      f.write(metrics.dumps(r) + "\n")
  for sc in scenarios(config):
    mine = [r for r in rows if r["model"] == sc.model]
    suffix = "" if len(config.scenarios) == 1 else f"_{sc.model}"
    _plot(mine, os.path.join(output_dir, f"latency_vs_rate{suffix}.png"), sc)
  return rows


def _plot(rows, path, sc):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, name in ((axes[0], "norm_latency_p50_s_per_tok", "median"),
                        (axes[1], "norm_latency_p99_s_per_tok", "p99")):
    for i, system in enumerate(dict.fromkeys(r["system"] for r in rows)):
      mark = " (planner's split)" if any(r.get("chosen") for r in rows
                                          if r["system"] == system) else ""
      for source, style in (("paced", "-o"), ("sim", "--x"), ("sim_unchunked", ":")):
        pts = sorted((r["rate"], r[key]) for r in rows
                     if r["system"] == system and r["source"] == source)
        if not pts:
          continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}",
                label=f"{system}{mark} ({source})")
    ax.set_xlabel("rate (requests/s)")
    ax.set_ylabel(f"{name} normalized latency (s/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{sc.model} on {sc.machines} x {sc.gpus_per_machine} {sc.hardware}, prompt "
               f"{sc.prompt_len}, batch {sc.batch}: paced engines (solid), simulator (dashed; "
               f"dotted: unchunked) [modelled]")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(c):
  rows = run(c, _OUT.value)
  for r in rows:
    print(json.dumps(r))
  print(headline(rows))


if __name__ == "__main__":
  cli.run(main, "configs/disaggregation.py", __doc__)
