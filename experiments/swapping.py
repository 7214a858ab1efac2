"""Microbatch swapping: throughput and normalized latency vs rate, B without swapping against 2B
with it under one device KV budget, paced as OPT-66B on A100-80GB and OPT-30B on V100-16GB
machines (4 stages), plus a simulated context-length sweep showing where swapping stops paying.

  python -m experiments.swapping --config=configs/swapping.py --output_dir=results/swapping

Writes to --output_dir: `rows.jsonl` (one line per paced run and per sweep point), `summary.txt`,
`rate_{system}.png` (throughput and p50 normalized latency vs rate, both systems) and
`context_sweep.png` (swapping's throughput gain vs prompt length).
"""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import flags  # noqa: E402

from dejavu_jax.studies import cli  # noqa: E402

_OUT = flags.DEFINE_string("output_dir", "results/swapping", "where results and plots go")


# experiments/figures.py: the columns its index shows, and the headline number.
TABLE = ("system", "kind", "load", "swapping", "batch", "output_throughput",
         "norm_latency_p50_s_per_tok", "prompt_len", "gain", "tokens_identical")


def headline(rows) -> str:
  """Throughput with swapping (batch 2B) over without (B) at the highest load, per system."""
  out = []
  for system in sorted({r["system"] for r in rows if r["kind"] == "rate"}):
    rate = [r for r in rows if r["kind"] == "rate" and r["system"] == system]
    top = max(r["load"] for r in rate)
    by = {r["swapping"]: r for r in rate if r["load"] == top}
    if True in by and False in by and by[False]["output_throughput"]:
      out.append(f"{system}: batch {by[False]['batch']} -> {by[True]['batch']}, throughput "
                 f"x{by[True]['output_throughput'] / by[False]['output_throughput']:.2f} at "
                 f"load {top:g}")
  return "; ".join(out)


def run(config, output_dir: str, log=print) -> list[dict]:
  """Runs the study; writes the files above; returns the rows written to rows.jsonl."""
  from dejavu_jax.config import tiny_config
  from dejavu_jax.studies import swapstudy as study
  os.makedirs(output_dir, exist_ok=True)
  cfg = tiny_config("opt", num_layers=4, max_positions=1024)
  rows = []
  for name in config.systems:
    system = study.get_system(name)
    rows += study.rate_sweep(system, cfg, stages=config.stages, prompt_len=config.prompt_len,
                             output_len=config.output_len, batch_without=config.batch_without,
                             loads=tuple(config.loads), num_microbatches=config.num_microbatches,
                             time_scale=config.time_scale, program=config.program,
                             seed=config.seed, log=log)
    rows += study.context_sweep(system, config.stages, tuple(config.sweep_prompts),
                                config.sweep_output_len, config.batch_without)
  with open(os.path.join(output_dir, "rows.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  lines = []
  for r in rows:
    if r["kind"] == "rate":
      lines.append(f"{r['system']:<12} load {r['load']:<5.2f} swapping={r['swapping']!s:<5} "
                   f"batch {r['batch']:>3}: {r['output_throughput']:8.1f} tok/s, p50 "
                   f"{r['norm_latency_p50_s_per_tok']:.4f} s/tok, tokens identical "
                   f"{r['tokens_identical']}, within budget {r['within_budget']}")
    else:
      lines.append(f"{r['system']:<12} prompt {r['prompt_len']:>5}: gain x{r['gain']:.2f} "
                   f"(swap-in {r['swap_in_s'] * 1e3:.1f} ms vs step {r['step_s'] * 1e3:.1f} ms"
                   f", hides {r['swap_hides']}), auto -> {'on' if r['auto_choice'] else 'off'}")
  with open(os.path.join(output_dir, "summary.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  _plot(rows, output_dir)
  return rows


def _plot(rows, output_dir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  for system in sorted({r["system"] for r in rows if r["kind"] == "rate"}):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for swapping in (False, True):
      pts = sorted((r["rate"], r["output_throughput"], r["norm_latency_p50_s_per_tok"], r["batch"])
                   for r in rows if r["kind"] == "rate" and r["system"] == system and
                   r["swapping"] == swapping)
      if not pts:
        continue
      label = f"{'swapping' if swapping else 'no swapping'}, batch {pts[0][3]}"
      a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
      b.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=label)
    a.set(xlabel="request rate (req/s)", ylabel="output tokens/s", title=f"{system}: throughput")
    b.set(xlabel="request rate (req/s)", ylabel="p50 normalized latency (s/token)",
          title=f"{system}: latency")
    a.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, f"rate_{system}.png"))
    plt.close(fig)
  sweep = [r for r in rows if r["kind"] == "context_sweep"]
  if sweep:
    fig, ax = plt.subplots(figsize=(6, 4))
    for system in sorted({r["system"] for r in sweep}):
      pts = sorted((r["prompt_len"], r["gain"]) for r in sweep if r["system"] == system)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=system)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="prompt length (tokens)",
           ylabel="throughput with / without swapping", title="where swapping pays (simulated)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "context_sweep.png"))
    plt.close(fig)


def main(c):
  rows = run(c, _OUT.value)
  print(f"\nwrote {len(rows)} rows to {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  cli.run(main, "configs/swapping.py", __doc__)
