"""Paper-scale answers from the simulator: latency vs rate, failure timelines, planner table.

Writes `results.jsonl` (one JSON object per simulated point, planner row; `system` is
"baseline" or "disaggregated"), `run.json` (what the run was) and the plots `latency_vs_rate.png`
(p50 solid, p99 dashed, one colour per system) and `failure_timeline.png` to --output_dir.
The disaggregated split (`prompt_stages`/`token_stages`) is checked against the planner's memory
model: an infeasible one is simulated anyway (the simulator does not model memory) with a loud
warning that names the feasible splits.

  python -m experiments.simulate --config=configs/simulate.py --output_dir=/tmp/sim
"""

import os

from absl import flags

from dejavu_jax import costmodel as cm
from dejavu_jax import planner
from dejavu_jax import sim
from dejavu_jax.config import get_model_config
from dejavu_jax import metrics
from dejavu_jax.studies import cli
from dejavu_jax.studies import runrecord
from dejavu_jax.studies import splits
from dejavu_jax.studies import reporting

_OUT = flags.DEFINE_string("output_dir", "/tmp/dejavu_simulate", "where results and plots go")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace the results in a non-empty output_dir")


def recovery_config(c, strategy: str) -> sim.RecoveryConfig:
  """The config's recovery parameters (heartbeat, timeout, replacement, weight load, restart
  scope) for one strategy; configs without them get the paper's 1 s / 3 s / 5 s."""
  links = {k: v for k, v in (("replica_link", _links(c).get("replica_delta")),
                             ("weight_link", _links(c).get("weights"))) if v is not None}
  return sim.RecoveryConfig(
      strategy=strategy, snapshot_every=c.snapshot_every,
      heartbeat_s=c.get("heartbeat_s", 1.0), timeout_s=c.get("heartbeat_timeout_s", 3.0),
      replacement_start_s=c.get("replacement_start_s", 5.0),
      weight_load_s=c.get("weight_load_s", None), restart_scope=c.get("restart_scope", "stage"),
      **links)


def _links(c) -> dict:
  """The calibrated links of `c.links_table` (benchmarks/transport.py), {} without one: they
  replace the presets for the paths the table has."""
  return cm.calibrated_links(c.get("links_table", None))


def _requests(c, rate, n):
  lens = sim.sample_output_lens(n, c.seed, median=c.output_median, high=c.output_max)
  # One output length per microbatch (the paper's setting) unless the config asks otherwise.
  group = c.batch_size if c.get("per_microbatch_lengths", True) else None
  return sim.make_requests(rate, n, c.prompt_len, lens, seed=c.seed, per_microbatch=group)


def _run(c, cost, system, reqs, **kw):
  if system == "baseline":
    return sim.simulate_colocated(cost, reqs, c.machines, c.batch_size,
                                  stage_link=cm.LINKS["inter_vm_40gbps"], **kw)
  links = _links(c)
  return sim.simulate_disaggregated(
      cost, reqs, c.prompt_stages, c.token_stages, c.batch_size,
      stream_link=links.get("prompt_kv", planner.default_stream_link(c.hardware)),
      host_link=links.get("swap_in", cost.hardware.host_link),
      stage_link=cm.LINKS["inter_vm_40gbps"], **kw)


def check_split(c, log=print) -> str | None:
  """Warns (and returns why) when the config's split does not fit memory."""
  model = get_model_config(c.model, dtype=c.dtype)
  why = splits.check_split(model, c.hardware, c.prompt_stages, c.token_stages, c.prompt_len,
                           int(c.output_median), c.batch_size, c.gpus_per_machine)
  if why:
    ok = splits.feasible_splits(model, c.hardware, c.prompt_stages + c.token_stages,
                                c.prompt_len, int(c.output_median), c.batch_size,
                                c.gpus_per_machine)
    runrecord.warn(log, f"the disaggregated split {c.prompt_stages}-{c.token_stages} does not "
                   f"fit memory by the planner's check ({why}); memory-feasible splits: "
                   f"{ok or 'none'}. Simulated anyway: the simulator does not model memory.")
  return why


def run(c, out_dir, log=print, overwrite=True):
  """Runs the three parts; returns the list of result rows written."""
  runrecord.prepare_output_dir(out_dir, overwrite)
  table = c.get("links_table", None)
  runrecord.write_run_info(out_dir, runrecord.run_info(
      c, links_table=cm.link_table_record(table) if table else None))
  split_problem = check_split(c, log)
  model = get_model_config(c.model, dtype=c.dtype)
  cost = cm.roofline(model, c.hardware, gpus_per_machine=c.gpus_per_machine)
  rows = []
  points = [(s, r) for s in ("baseline", "disaggregated") for r in c.rates]
  bar = runrecord.progress_bar(len(points) + len(c.strategies), "simulate", bool(log))
  for i, (system, rate) in enumerate(points):
    res = _run(c, cost, system, _requests(c, rate, c.num_requests))
    # `system` last: the result's own info names the colocated simulator "colocated".
    rows.append({"kind": "rate_sweep", "rate": rate, "model": c.model, **res.to_json_dict(),
                 "system": system, "split_infeasible": split_problem if system != "baseline"
                 else None})
    bar(i + 1, len(points) + len(c.strategies))
  # The failure-free run of the same requests: the timeline's baseline (not a result row).
  timelines = {"failure-free": _run(c, cost, "disaggregated",
                                    _requests(c, c.failure_rate, c.failure_requests)).records}
  for j, strategy in enumerate(c.strategies):
    res = _run(c, cost, "disaggregated", _requests(c, c.failure_rate, c.failure_requests),
               failures=[sim.Failure(c.fail_time, c.fail_stage, "token")],
               recovery=recovery_config(c, strategy))
    timelines[strategy] = res.records
    rows.append({"kind": "failure", "rate": c.failure_rate, "model": c.model,
                 **res.to_json_dict(), "system": "disaggregated", "strategy": strategy})
    bar(len(points) + j + 1, len(points) + len(c.strategies))
  bar.close()
  for spec in c.planner_rows:
    name, hw, machines = spec.split(":")
    wl = planner.Workload(c.prompt_len, c.planner_output_len, c.batch_size)
    try:
      text, summary = planner.plan_report(get_model_config(name, dtype="float16"), int(machines),
                                          hw, wl, c.gpus_per_machine, c.planner_batch_sizes)
      rows.append({"kind": "planner", **summary})
      if log:
        log(text + "\n")
    except ValueError as e:  # a row whose model does not fit is a result too
      rows.append({"kind": "planner", "model": name, "hardware": hw,
                   "machines": int(machines), "error": str(e)})
  with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
    for row in rows:
      f.write(metrics.dumps(row) + "\n")   # strict JSON: NaN (nothing finished) -> null
  _plot(rows, timelines, c, out_dir)
  return rows


def _plot(rows, timelines, c, out_dir):
  # One plotting path with the engine (serving.metrics): p50 and p99 share a system's colour.
  reporting.plot_latency_vs_rate([r for r in rows if r["kind"] == "rate_sweep"],
                               os.path.join(out_dir, "latency_vs_rate.png"),
                               title=f"{c.model} on {c.machines} x {c.hardware}", log_y=True)
  reporting.plot_failure_timeline(timelines, os.path.join(out_dir, "failure_timeline.png"),
                                failure_times=[c.fail_time],
                                title=f"token stage {c.fail_stage} fails at {c.fail_time} s")


def main(c):
  run(c, _OUT.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
  cli.run(main, "configs/simulate.py", __doc__, errors=(runrecord.OutputDirError,))
