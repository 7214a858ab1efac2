"""Paper-scale answers from the simulator: latency vs rate, failure timelines, planner table.

Writes `results.jsonl` (one JSON object per simulated point, planner row) and the plots
`latency_vs_rate.png` and `failure_timeline.png` to --output_dir.

  python -m experiments.simulate --config=configs/simulate.py --output_dir=/tmp/sim
"""

import os

from absl import app, flags
from ml_collections import config_flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dejavu_jax import costmodel as cm  # noqa: E402
from dejavu_jax import planner  # noqa: E402
from dejavu_jax import sim  # noqa: E402
from dejavu_jax.config import get_model_config  # noqa: E402
from dejavu_jax.serving import metrics  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/simulate.py")
_OUT = flags.DEFINE_string("output_dir", "/tmp/dejavu_simulate", "where results and plots go")


def _requests(c, rate, n):
  lens = sim.sample_output_lens(n, c.seed, median=c.output_median, high=c.output_max)
  # One output length per microbatch (the paper's setting) unless the config asks otherwise.
  group = c.batch_size if c.get("per_microbatch_lengths", True) else None
  return sim.make_requests(rate, n, c.prompt_len, lens, seed=c.seed, per_microbatch=group)


def _run(c, cost, system, reqs, **kw):
  if system == "baseline":
    return sim.simulate_colocated(cost, reqs, c.machines, c.batch_size,
                                  stage_link=cm.LINKS["inter_vm_40gbps"], **kw)
  return sim.simulate_disaggregated(
      cost, reqs, c.prompt_stages, c.token_stages, c.batch_size,
      stream_link=planner.default_stream_link(c.hardware), host_link=cost.hardware.host_link,
      stage_link=cm.LINKS["inter_vm_40gbps"], **kw)


def run(c, out_dir):
  """Runs the three parts; returns the list of result rows written."""
  os.makedirs(out_dir, exist_ok=True)
  model = get_model_config(c.model, dtype=c.dtype)
  cost = cm.roofline(model, c.hardware, gpus_per_machine=c.gpus_per_machine)
  rows = []
  for system in ("baseline", "disaggregated"):
    for rate in c.rates:
      res = _run(c, cost, system, _requests(c, rate, c.num_requests))
      rows.append({"kind": "rate_sweep", "system": system, "rate": rate, "model": c.model,
                   **res.to_json_dict()})
  timelines = {}
  for strategy in c.strategies:
    rec = sim.RecoveryConfig(strategy=strategy, snapshot_every=c.snapshot_every)
    res = _run(c, cost, "disaggregated", _requests(c, c.failure_rate, c.failure_requests),
               failures=[sim.Failure(c.fail_time, c.fail_stage, "token")], recovery=rec)
    done = sorted((r for r in res.records if r.done), key=lambda r: r.finish)
    timelines[strategy] = ([r.finish for r in done], np.cumsum([r.latency for r in done]))
    rows.append({"kind": "failure", "strategy": strategy, "rate": c.failure_rate,
                 "model": c.model, **res.to_json_dict()})
  for spec in c.planner_rows:
    name, hw, machines = spec.split(":")
    wl = planner.Workload(c.prompt_len, c.planner_output_len, c.batch_size)
    try:
      text, summary = planner.plan_report(get_model_config(name, dtype="float16"), int(machines),
                                          hw, wl, c.gpus_per_machine, c.planner_batch_sizes)
      rows.append({"kind": "planner", **summary})
      print(text, "\n")
    except ValueError as e:  # a row whose model does not fit is a result too
      rows.append({"kind": "planner", "model": name, "hardware": hw,
                   "machines": int(machines), "error": str(e)})
  with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
    for row in rows:
      f.write(metrics.dumps(row) + "\n")   # strict JSON: NaN (nothing finished) -> null
  _plot(rows, timelines, c, out_dir)
  return rows


def _plot(rows, timelines, c, out_dir):
  fig, ax = plt.subplots(figsize=(6, 4))
  for system, style in (("baseline", "o-"), ("disaggregated", "s-")):
    pts = [r for r in rows if r["kind"] == "rate_sweep" and r["system"] == system]
    for q, alpha in (("p50", 1.0), ("p99", 0.5)):
      ax.plot([r["rate"] for r in pts], [r[f"norm_latency_{q}_s_per_tok"] for r in pts], style,
              alpha=alpha, label=f"{system} {q}")
  ax.set(xlabel="request rate (req/s)", ylabel="normalized latency (s/token)", yscale="log",
         title=f"{c.model} on {c.machines} x {c.hardware}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "latency_vs_rate.png"))
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  for strategy, (t, cum) in timelines.items():
    ax.plot(t, cum, label=strategy)
  ax.axvline(c.fail_time, color="k", ls="--", lw=0.8)
  ax.set(xlabel="time (s)", ylabel="cumulative latency (s)",
         title=f"token stage {c.fail_stage} fails at {c.fail_time} s")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "failure_timeline.png"))
  plt.close(fig)


def main(argv):
  del argv
  run(_CONFIG.value, _OUT.value)


if __name__ == "__main__":
  app.run(main)
