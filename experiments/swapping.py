"""Microbatch swapping (Fig 9): throughput at batch B without swapping against 2B with it, per
model, over the prompt length, with the swap-in beside the decode step it must hide under.

  python -m experiments.swapping --config=configs/swapping.py --output_dir=results/swapping
  python -m experiments.swapping --config=configs/swapping.py:legacy --output_dir=/tmp/swap

The paper variant (default) simulates OPT-30B/V100, OPT-66B/A100 and BLOOM-176B/A100 (machines
of 2 GPUs, 4 stages, LMSys lengths) with the paper's swap unit (modelled). The legacy variant
adds the paced engine runs (fake program, tokens checked against its oracle) vs rate and the
equal-length context sweep. Writes to --output_dir: `rows.jsonl`, `summary.txt`,
`batch_B_vs_2B.png` (bars per model at the headline prompt, and the gain over the prompt length
with the break-even marked), `swap_overlap.png` (swap-in vs decode step over the context),
and for the legacy parts `rate_{system}.png` and `context_sweep.png`.
"""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import flags  # noqa: E402

from dejavu_jax.studies import cli  # noqa: E402

_OUT = flags.DEFINE_string("output_dir", "results/swapping", "where results and plots go")

KIND = "modelled"
# experiments/figures.py: the columns its index shows, and the headline number.
TABLE = ("system", "kind", "prompt_len", "batch_without", "batch_with", "throughput_without",
         "throughput_with", "gain", "swap_in_s", "step_s", "hidden_fraction",
         "break_even_context", "load", "swapping", "batch", "output_throughput",
         "tokens_identical")


def setting(c) -> str:
  parts = [f"{c.variant}"]
  if "paper" in c.context_sweeps:
    parts.append(f"{', '.join(c.paper_systems)}, {c.stages} stages x{c.gpus_per_machine} GPUs, "
                 f"B={c.batch_size} vs 2B, prompt {c.prompt_len} (swept {list(c.paper_prompts)}),"
                 f" LMSys mean {c.output_mean:g} clamped to {c.output_max}, {c.lengths} lengths")
  if c.rate_sweep:
    parts.append(f"paced {', '.join(c.systems)}: prompt {c.real_prompt_len} + {c.output_len} "
                 f"new, loads {list(c.loads)}")
  return "; ".join(parts)


def headline(rows) -> str:
  """Per model: throughput at 2B with swapping over B without, at the headline prompt, and the
  break-even context; for the paced legacy runs the gain at the highest load."""
  out = []
  paper = [r for r in rows if r["kind"] == "context_sweep" and "hidden_fraction" in r]
  for system in dict.fromkeys(r["system"] for r in paper):
    mine = [r for r in paper if r["system"] == system]
    head = next((r for r in mine if r.get("headline")), mine[-1])
    be = head["break_even_context"]
    out.append(f"{system}: B={head['batch_without']} {head['throughput_without']:.3g} vs "
               f"2B {head['throughput_with']:.3g} req/s at prompt {head['prompt_len']} "
               f"(x{head['gain']:.2f}; swap-in {head['swap_in_s'] * 1e3:.0f} ms vs step "
               f"{head['step_s'] * 1e3:.0f} ms, {head['hidden_fraction']:.0%} hidden); pays "
               f"only below context {be}")
  for system in sorted({r["system"] for r in rows if r["kind"] == "rate"}):
    rate = [r for r in rows if r["kind"] == "rate" and r["system"] == system]
    top = max(r["load"] for r in rate)
    by = {r["swapping"]: r for r in rate if r["load"] == top}
    if True in by and False in by and by[False]["output_throughput"]:
      out.append(f"{system} (paced): batch {by[False]['batch']} -> {by[True]['batch']}, "
                 f"throughput x{by[True]['output_throughput'] / by[False]['output_throughput']:.2f}"
                 f" at load {top:g}")
  return "; ".join(out)


def run(config, output_dir: str, log=print) -> list[dict]:
  """Runs the study; writes the files above; returns the rows written to rows.jsonl."""
  from dejavu_jax.config import tiny_config
  from dejavu_jax.studies import swapstudy as study
  unknown = set(config.context_sweeps) - {"paper", "legacy"}
  if unknown:
    raise ValueError(f"context_sweeps: unknown {sorted(unknown)}; expected paper, legacy")
  os.makedirs(output_dir, exist_ok=True)
  rows = []
  if "paper" in config.context_sweeps:
    prompts = tuple(sorted(set(config.paper_prompts) | {config.prompt_len}))
    for name in config.paper_systems:
      system = study.get_system(name)
      if system.gpus_per_machine != config.gpus_per_machine:
        raise ValueError(f"system {name} has {system.gpus_per_machine} GPUs per machine, the "
                         f"config {config.gpus_per_machine}")
      sweep = study.paper_context_sweep(system, config.stages, prompts, config.batch_size,
                                        config.output_mean, config.paper_microbatches,
                                        config.seed)
      for r in sweep:
        r["headline"] = r["prompt_len"] == config.prompt_len
        log(f"{name} prompt {r['prompt_len']}: x{r['gain']:.2f} (swap-in "
            f"{r['swap_in_s'] * 1e3:.1f} ms, step {r['step_s'] * 1e3:.1f} ms)")
      rows += sweep
  if config.rate_sweep or "legacy" in config.context_sweeps:
    cfg = tiny_config("opt", num_layers=4, max_positions=1024)
    for name in config.systems:
      system = study.get_system(name)
      if config.rate_sweep:
        rows += study.rate_sweep(system, cfg, stages=config.stages,
                                 prompt_len=config.real_prompt_len,
                                 output_len=config.output_len,
                                 batch_without=config.batch_without, loads=tuple(config.loads),
                                 num_microbatches=config.num_microbatches,
                                 time_scale=config.time_scale, program=config.program,
                                 seed=config.seed, log=log)
      if "legacy" in config.context_sweeps:
        rows += study.context_sweep(system, config.stages, tuple(config.sweep_prompts),
                                    config.sweep_output_len, config.batch_without)
  with open(os.path.join(output_dir, "rows.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  with open(os.path.join(output_dir, "summary.txt"), "w") as f:
    f.write("\n".join(_summary_line(r) for r in rows) + "\n")
  _plot(rows, output_dir)
  _plot_paper(rows, output_dir, config)
  return rows


def _summary_line(r) -> str:
  if r["kind"] == "rate":
    return (f"{r['system']:<12} load {r['load']:<5.2f} swapping={r['swapping']!s:<5} "
            f"batch {r['batch']:>3}: {r['output_throughput']:8.1f} tok/s, p50 "
            f"{r['norm_latency_p50_s_per_tok']:.4f} s/tok, tokens identical "
            f"{r['tokens_identical']}, within budget {r['within_budget']}")
  return (f"{r['system']:<16} prompt {r['prompt_len']:>5}: gain x{r['gain']:.2f} "
          f"(swap-in {r['swap_in_s'] * 1e3:.1f} ms vs step {r['step_s'] * 1e3:.1f} ms"
          f", hides {r['swap_hides']})"
          + (f", break-even context {r['break_even_context']}" if "break_even_context" in r
             else f", auto -> {'on' if r['auto_choice'] else 'off'}"))


def _plot_paper(rows, output_dir, config):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from dejavu_jax.studies import reporting
  from dejavu_jax.studies import swapstudy as study
  from dejavu_jax.kv import budget as kv_budget
  paper = [r for r in rows if r["kind"] == "context_sweep" and "hidden_fraction" in r]
  if not paper:
    return
  systems = list(dict.fromkeys(r["system"] for r in paper))
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
  head = [next(r for r in paper if r["system"] == s and r["headline"]) for s in systems]
  x = range(len(systems))
  w = 0.38
  for dx, key, label, color in ((-w / 2, "throughput_without", "B, no swapping", "0.6"),
                                (w / 2, "throughput_with", "2B, swapping", "C1")):
    rects = a.bar([i + dx for i in x], [r[key] for r in head], w, label=label, color=color)
    a.bar_label(rects, fmt="%.2f", fontsize=7)
  a.set_xticks(list(x))
  a.set_xticklabels([f"{s}\n(B={r['batch_without']})" for s, r in zip(systems, head)], fontsize=8)
  a.set(ylabel="saturated throughput (req/s)",
        title=f"prompt {config.prompt_len}, LMSys outputs (simulated)")
  a.legend(fontsize=8)
  for i, s in enumerate(systems):
    pts = sorted((r for r in paper if r["system"] == s), key=lambda r: r["prompt_len"])
    b.plot([r["prompt_len"] for r in pts], [r["gain"] for r in pts], "-o", color=f"C{i}",
           label=f"{s} (break-even context {pts[0]['break_even_context']})")
  b.axhline(1.0, color="gray", lw=0.8)
  b.set(xscale="log", xlabel="prompt length (tokens; + LMSys outputs)",
        ylabel="throughput 2B with swapping / B without", title="where swapping pays")
  b.legend(fontsize=7)
  b.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "batch_B_vs_2B.png"), dpi=110)
  plt.close(fig)
  # The swap-in of the next microbatch against the step it overlaps, over the context.
  series, styles = {}, {}
  ctx = [2 ** k for k in range(0, 12)]
  for s in systems:
    system = study.get_system(s)
    model, cost, link = study.modeled(system)
    layers = max(study.stage_layers(model, config.stages))
    bb = 2 * config.batch_size
    sw = [kv_budget.hides(cost, link, layers, bb, n)[1] * 1e3 for n in ctx]
    st = [kv_budget.hides(cost, link, layers, bb, n)[2] * 1e3 for n in ctx]
    series[f"{s} swap-in ({link.name})"] = (ctx, sw)
    series[f"{s} decode step"] = (ctx, st)
    styles[f"{s} swap-in ({link.name})"] = "-"
    styles[f"{s} decode step"] = "--"
  reporting.plot_lines(series, os.path.join(output_dir, "swap_overlap.png"),
                       xlabel="context (tokens)", ylabel="ms per stage, batch 2B",
                       title="swap-in hides while it is under the step", log_x=True,
                       log_y=True, styles=styles)


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
  sweep = [r for r in rows if r["kind"] == "context_sweep" and "auto_choice" in r]
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
  print(headline(rows))


if __name__ == "__main__":
  cli.run(main, "configs/swapping.py", __doc__)
