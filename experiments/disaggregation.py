"""Prompt-token disaggregation, paced and simulated: latency vs rate of the colocated baseline,
the planner's split and its neighbours (dejavu_jax/studies/disagg_experiment.py).

Writes `results.jsonl` (one object per system, rate and source: "paced" runs of the real
engines, "sim" the simulator on the same requests; median and p99 normalized latency in modeled
seconds per token, throughput, tokens identical to `fake_generate`) and `latency_vs_rate.png`.

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


def scenario(c) -> dx.Scenario:
  return dx.Scenario(model=c.model, hardware=c.hardware, gpus_per_machine=c.gpus_per_machine,
                     machines=c.machines, prompt_len=c.prompt_len,
                     real_prompt_len=c.real_prompt_len, batch=c.batch_size,
                     output_mean=c.output_mean, time_scale=c.time_scale,
                     stream_link=c.stream_link, host_slots=c.host_slots, seed=c.seed)


def _row(system, rate, source, summary, scale, **extra):
  return {"system": dx.system_name(system), "rate": rate, "source": source,
          "norm_latency_p50_s_per_tok": summary["norm_latency_p50_s_per_tok"] / scale,
          "norm_latency_p99_s_per_tok": summary["norm_latency_p99_s_per_tok"] / scale,
          "request_throughput": summary["request_throughput"] * scale,
          "completed": summary["completed"], **extra}


# experiments/figures.py: the columns its index shows, and the headline number.
TABLE = ("system", "source", "rate", "norm_latency_p50_s_per_tok", "norm_latency_p99_s_per_tok",
         "request_throughput", "tokens_identical")


def headline(rows) -> str:
  """p50 normalized latency of each split over the colocated baseline at the highest rate
  (paced), and how far the simulator is from the paced runs there."""
  paced = [r for r in rows if r["source"] == "paced"]
  if not paced:
    return ""
  top = max(r["rate"] for r in paced)
  at = {r["system"]: r for r in paced if r["rate"] == top}
  sim = {r["system"]: r for r in rows if r["source"] == "sim" and r["rate"] == top}
  base = next((k for k in at if k.startswith("colocated")), None)
  if base is None:
    return ""
  parts = []
  for name, r in at.items():
    if name == base:
      continue
    parts.append(f"{name} p50 x{r['norm_latency_p50_s_per_tok'] / at[base]['norm_latency_p50_s_per_tok']:.2f}")
  errs = [abs(sim[k]["norm_latency_p50_s_per_tok"] / at[k]["norm_latency_p50_s_per_tok"] - 1)
          for k in at if k in sim and at[k]["norm_latency_p50_s_per_tok"]]
  sim_txt = f"; sim vs paced p50 within {max(errs):.0%}" if errs else ""
  return f"rate {top:g} req/s, vs {base}: " + ", ".join(parts) + sim_txt


def run(config, output_dir: str) -> list[dict]:
  """Runs every system at every rate, paced and simulated; writes the JSONL and the plot."""
  os.makedirs(output_dir, exist_ok=True)
  sc = scenario(config)
  rows = []
  for system in dx.systems(sc):
    eng = dx.make_engine(sc, system)
    try:
      for rate in config.rates:
        reqs = dx.make_requests(sc, config.num_microbatches, rate / sc.time_scale)
        served = eng.serve(reqs)
        identical = served.tokens() == dx.reference_tokens(sc, reqs)
        rows.append(_row(system, rate, "paced", metrics.summarize(served.records),
                         sc.time_scale, tokens_identical=identical,
                         paced_overruns=served.summary.get("paced_overruns")))
        simulated = dx.simulate(sc, system, reqs)
        rows.append(_row(system, rate, "sim", metrics.summarize(simulated.records), 1.0))
    finally:
      eng.close()
  with open(os.path.join(output_dir, "results.jsonl"), "w") as f:
    for r in rows:
      f.write(metrics.dumps(r) + "\n")
  _plot(rows, os.path.join(output_dir, "latency_vs_rate.png"), sc)
  return rows


def _plot(rows, path, sc):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, name in ((axes[0], "norm_latency_p50_s_per_tok", "median"),
                        (axes[1], "norm_latency_p99_s_per_tok", "p99")):
    for i, system in enumerate(dict.fromkeys(r["system"] for r in rows)):
      for source, style in (("paced", "-o"), ("sim", "--x")):
        pts = [(r["rate"], r[key]) for r in rows
               if r["system"] == system and r["source"] == source]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}",
                label=f"{system} ({source})")
    ax.set_xlabel("rate (requests/s)")
    ax.set_ylabel(f"{name} normalized latency (s/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{sc.model} on {sc.machines} x {sc.gpus_per_machine} {sc.hardware}, prompt "
               f"{sc.prompt_len}, batch {sc.batch}: paced engines (solid) and simulator (dashed)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(c):
  rows = run(c, _OUT.value)
  for r in rows:
    print(json.dumps(r))


if __name__ == "__main__":
  cli.run(main, "configs/disaggregation.py", __doc__)
