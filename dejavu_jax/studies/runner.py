"""Runs a serving experiment from an ml_collections config: model, engine, workload, failures,
results on disk. The experiment scripts stay thin; tests call `run_experiment` directly.

The config is validated whole before anything is built (`runconfig`); several strategies
(`recovery='(restart,replica)'`) and seeds (`seeds=(0,1,2)`) run on one engine compiled once,
each strategy on the same requests and failures; every summary row says what it was
(`runrecord`), and `comparison.md` gives each strategy's numbers (spread over the seeds).

Issue 21 (a comparison that was silently noise): failures fire after a number of steps of the
failed stage's worker by default (`fail_after_steps`; `fail_times` for wall clock), so a loaded
machine moves them with the work; whenever failures are injected, a failure-free run of the same
requests (recovery restart: no replication overhead) comes first and is a row of every table;
each run's validity warnings (the failure hit no generated work, paced steps overran, a failure
never fired) are in its summary row ("warnings"), in comparison.md (with too few seeds) and on
the timeline plot, whose curves name their seed. Each run logs one line and the run ends with a
table of one line per run; the full per-run summaries are in summary.txt. Only the prompt buckets
the workload can reach are compiled (`warm`).

When serving fails (`EngineError`), everything already served is still written (the requests
file of the failed rate, and a summary with "error") before the error is raised again.

Why one module over 400 lines: the serve experiment (build, warm, the strategy x seed x rate
runs with a failure-free baseline, validity warnings, tables and plots) is one pipeline.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from dejavu_jax import costmodel
from dejavu_jax.config import get_model_config
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.kv.buckets import bucket_length
from dejavu_jax.models import init_params
from dejavu_jax.models.convert import load_hf_checkpoint
from dejavu_jax import metrics
from dejavu_jax.studies import runconfig
from dejavu_jax.studies import runrecord
from dejavu_jax.serving.disagg_engine import make_engine
from dejavu_jax.serving.engine import EngineError
from dejavu_jax.workload import WorkloadConfig, make_workload
from dejavu_jax.studies import reporting


def build_model(c):
  """(ModelConfig, params) from a local HF checkpoint or a preset with random weights."""
  if c.checkpoint:
    return load_hf_checkpoint(c.checkpoint, dtype=c.dtype)
  overrides = dict(c.model_overrides or {})
  cfg = get_model_config(c.model, dtype=c.dtype, **overrides)
  return cfg, init_params(cfg, jax.random.key(c.seed))


def build_cost_model(c, cfg):
  """The cost model that paces stage steps (only used with pacing='paced')."""
  kind = c.cost.kind
  if kind == "roofline":
    return costmodel.roofline(get_model_config(c.cost.model, dtype="float16"), c.cost.hardware)
  if kind == "table":
    return costmodel.TableCostModel.from_json(cfg, c.cost.table)
  raise ValueError(f"unknown cost model kind {kind!r}; expected 'roofline' or 'table'")


# The ServeConfig of a serve config (every field under its flat name; runconfig declares them).
serve_config = runconfig.serve_config


def _tag(strategy: str, seed: int, rate: float, many_strategies: bool, many_seeds: bool) -> str:
  """The file-name part of one run: `rate2` alone, `replica_seed1_rate2` in a comparison."""
  parts = []
  if many_strategies:
    parts.append(strategy.replace(",", "+"))
  if many_seeds:
    parts.append(f"seed{seed}")
  parts.append(f"rate{rate:g}")
  return "_".join(parts)


def _keeps_state(strategy: str) -> bool:
  return any(n.strip() in ("replica", "snapshot") for n in strategy.split(","))


def failures_of(c) -> list[FailureSpec]:
  """The config's failures: `fail_stages` paired with `fail_after_steps` (the default: the same
  point of the run on any machine), else with `fail_times` (seconds of wall clock: on a loaded
  machine a fixed time can land before or after any generated work)."""
  steps = tuple(c.get("fail_after_steps", ()) or ())
  if steps:
    return [FailureSpec(stage=int(s), after_steps=int(n)) for s, n in zip(c.fail_stages, steps)]
  return [FailureSpec(float(t), int(s)) for s, t in zip(c.fail_stages, c.fail_times or ())]


def _failure_cell(f: FailureSpec) -> list:
  """A failure as the summary rows record it: [stage, seconds] or [stage, 'after N steps']."""
  if f.time_s is not None:
    return [f.stage, f.time_s]
  return [f.stage, f"after {f.after_steps} steps" if f.after_steps is not None else f.describe()]


def _run_warnings(res, failures, summary: dict) -> list[str]:
  """Why a run's numbers are not what they claim to be: written into the summary
  row, comparison.md and the timeline plot, not only printed."""
  out = []
  if summary.get("paced_overruns"):
    out.append(f"{summary['paced_overruns']} paced steps overran their modelled time: real "
               "compute did not fit, so this is NOT a paced result (raise cost.time_scale, or "
               "use fewer stages per core)")
  for ev in res.recoveries:
    if ev.side == "prompt" and ev.lost_microbatches:
      continue   # a prompt worker's failure only ever loses prompts: redoing them is its recovery
    if ev.lost_requests == 0 or (ev.restored_microbatches == 0 and ev.recomputed_tokens == 0):
      out.append(f"the failure of stage {ev.stage} at {ev.failed_at:.2f} s hit no generated work "
                 "in flight (nothing in flight, or only prompts not yet past their first token): "
                 "it measures detection, not recovery (fail after more steps, or send more "
                 "requests)")
  if len(res.recoveries) > len(failures):
    out.append(f"{len(res.recoveries)} recoveries but {len(failures)} failure(s) injected: a live "
               "worker was declared dead (missed heartbeats or progress on a loaded machine?), so "
               "this run's numbers include recoveries nobody asked for (raise "
               "heartbeat_timeout_s, or run on a quieter machine)")
  if len(res.recoveries) < len(failures):
    late = [f.describe() for f in failures][len(res.recoveries):]
    out.append(f"{len(failures) - len(res.recoveries)} failure(s) ({late}) never fired: the run "
               f"ended at {res.wall_s:.2f} s")
  return out


MIN_SEEDS = 3   # fewer seeds give no usable spread for a comparison


def _comparison_warnings(summaries: list[dict], seeds) -> list[str]:
  out = []
  if len(seeds) < MIN_SEEDS:
    out.append(f"only {len(seeds)} seed(s) {list(seeds)}: differences between strategies may be "
               f"noise (use --config.seeds='(0,1,2)' or more)")
  bad = [s for s in summaries if s.get("warnings")]
  if bad:
    out.append(f"{len(bad)} of {len(summaries)} runs carry warnings (column 'warn'; each run's "
               "text in summary.jsonl 'warnings'): their rows do not measure what they claim")
  return out


def run_experiment(c, out_dir: str, log=print, overwrite: bool = False,
                   progress: bool | None = None) -> list[dict]:
  """Runs every (strategy, seed, rate) of the config on ONE engine (one compile); writes the
  results and what the run was (`run.json`, and in every summary row); returns the summaries.

  The config is validated whole first (`runconfig.ConfigError` naming the field), then the
  output directory is checked (`runrecord.OutputDirError` when not empty and not `overwrite`);
  nothing is built before both pass. `progress` (default: when `log` is given) shows tqdm bars.
  """
  bars = bool(log) if progress is None else progress
  log = log or (lambda *a, **k: None)
  if not tuple(c.fail_stages or ()) and (c.get("fail_after_steps") or c.get("fail_times")):
    # No stage fails: the default trigger lists (fail_after_steps=(40,)) pair with nothing, so
    # `--config.fail_stages='()'` alone means a failure-free run.
    c = c.copy_and_resolve_references()
    with c.unlocked():
      c.fail_after_steps, c.fail_times = (), ()
  runconfig.validate(c, num_devices=len(jax.devices()))
  strategies = runconfig.strategies_of(c.recovery)
  seeds = tuple(c.get("seeds", ()) or ()) or (c.seed,)
  runrecord.prepare_output_dir(out_dir, overwrite)
  failures = failures_of(c)
  info = runrecord.run_info(c, strategies=list(strategies), seeds=list(seeds))
  runrecord.write_run_info(out_dir, info)
  cfg, params = build_model(c)
  sc = serve_config(c, recovery=strategies[0])
  cost = build_cost_model(c, cfg) if sc.timing.pacing == "paced" else None
  log(f"model {cfg.name}: {cfg.num_layers} layers, d={cfg.hidden_size}, "
      f"{cfg.param_count() / 1e6:.1f}M params, {cfg.dtype}")
  if not failures:
    for strategy in strategies:
      if _keeps_state(strategy):
        runrecord.warn(log, f"failure-free run with recovery={strategy!r}: replication/snapshots "
                       "run and their overhead is in these numbers; a failure-free baseline "
                       "wants --config.recovery=restart")
  many_s, many_seeds = len(strategies) > 1, len(seeds) > 1
  if failures and len(c.fail_times or ()) and c.get("fail_after_steps"):
    runrecord.warn(log, f"both fail_after_steps {list(c.fail_after_steps)} and fail_times "
                   f"{list(c.fail_times)} are set: the failures fire after steps (wall-clock "
                   "times: --config.fail_after_steps='()')")
  # The failure-free baseline runs first on the same requests: every failure's cost is read
  # against it, and restart keeps no replicas or snapshots, so no recovery overhead is in it.
  runs = ([(BASELINE, "restart", [])] if failures and c.get("baseline", True) else [])
  runs += [(st, st, failures) for st in strategies]
  workloads = {(seed, float(rate)): make_workload(WorkloadConfig(
      rate=float(rate), num_requests=c.num_requests, prompt_len=c.prompt_len,
      output_len=c.output_len, vocab_size=cfg.vocab_size, seed=seed, max_output=c.max_output))
      for seed in seeds for rate in c.rates}
  summaries, texts, timelines, recoveries, fired, refs = [], [], {}, [], {}, {}
  t_build = time.perf_counter()
  # share_devices: every stage on the same `tensor` devices (e.g. a whole pipeline on one GPU).
  # With data_parallel R, replica r shares devices [r * tensor, (r + 1) * tensor).
  tp, reps = sc.topology.tensor, sc.topology.data_parallel
  devices = ([d for r in range(reps) for d in jax.devices()[r * tp:(r + 1) * tp] *
              sc.topology.num_stages] if c.get("share_devices") else None)
  with make_engine(cfg, params, sc, cost_model=cost, devices=devices,
                   time_scale=c.cost.time_scale) as engine:
    if sc.disagg.prompt_stages or sc.disagg.token_stages:
      path = engine.prompt_path
      log(f"disaggregated: {path.Dp} prompt stages {list(path.prompt_plan.ranges)} -> "
          f"{path.Dt} token stages {list(engine.plan.ranges)}, {path.host_slots} host slots")
    dp_text = f" x {reps} replicas (routing {sc.topology.routing})" if reps > 1 else ""
    log(f"pipeline: {engine.plan.num_stages} stages {list(engine.plan.ranges)} x tensor "
        f"{engine.plan.tensor}{dp_text}, microbatch {getattr(engine, 'microbatch_size', sc.topology.microbatch_size)}"
        f", {sc.topology.mode} mode, {sc.timing.pacing}")
    choice = getattr(engine, "swap_choice", None)
    if choice is not None and (sc.memory.swapping != "off" or sc.memory.device_kv_budget_bytes):
      log(f"swapping {'on' if choice.swapping else 'off'}: {choice.reason}")
    for replica in getattr(engine, "replicas", [engine]):   # data parallel: each compiles its own
      warm(replica, workloads.values(), recomputes=any(_recomputes(st) for _, st, _ in runs),
           log=log, bars=bars)
    log(f"engine ready in {time.perf_counter() - t_build:.1f} s; strategies {list(strategies)}"
        f"{' + failure-free baseline' if runs[0][0] == BASELINE else ''}, seeds {list(seeds)}, "
        f"rates {list(c.rates)}, failures {[f.describe() for f in failures] or 'none'}")
    for name, strategy, fails in runs:
      if engine.serve_cfg.fault.recovery != strategy:
        engine.set_recovery(strategy)   # same compiled programs, fresh workers
      for seed in seeds:
        for rate in c.rates:
          requests = workloads[(seed, float(rate))]
          tag = _tag(name, seed, float(rate), many_s or name == BASELINE, many_seeds)
          failed = None
          bar = runrecord.progress_bar(len(requests), f"serve {tag}", bars, unit="req")
          try:
            res = engine.serve(requests, progress=bar, failures=(
                {c.get("fail_replica", 0): fails} if reps > 1 and fails else fails))
          except EngineError as e:
            failed, res = e, e.result
          finally:
            bar.close()
          warnings = _run_warnings(res, fails, res.summary)
          system = f"pipeline_D{sc.topology.num_stages}" + (f"x{reps}" if reps > 1 else "")
          summary = {"rate": float(rate), "system": system,
                     "model": cfg.name,
                     **runrecord.row_info(
                         info, strategy=name, seed=seed, pacing=sc.timing.pacing,
                         injected_failures=[_failure_cell(f) for f in fails]),
                     "baseline": name == BASELINE, "warnings": warnings,
                     **res.summary}
          if c.get("slo_ttft_ms") is not None or c.get("slo_tpot_ms") is not None:
            slo = metrics.summarize(res.records, duration=res.wall_s,
                                    slo_ttft_ms=c.get("slo_ttft_ms"),
                                    slo_tpot_ms=c.get("slo_tpot_ms"))
            summary |= {k: slo[k] for k in ("request_goodput", "slo_attainment")}
          metrics.write_jsonl(os.path.join(out_dir, f"requests_{tag}.jsonl"), res.records,
                              {i: {"replica": r} for i, r in
                               getattr(res, "replica_of", {}).items()})
          recoveries += [{"rate": float(rate), "seed": seed, **ev.to_dict(),
                          "strategy": strategy} for ev in res.recoveries]
          summaries.append(summary)
          if failed is not None:
            _write_all(out_dir, summaries, recoveries)
            log(f"  serving failed [{tag}]: {res.error}; the "
                f"{sum(r.done for r in res.records)} requests served are written to {out_dir}")
            raise failed
          if c.get("check_tokens"):
            ref = oracle(cfg, params, sc, requests, refs, (seed, float(rate)))
            summary["identical"] = res.tokens() == ref
          log(run_line(summary, tag, res))
          # The recovery timeline (Ray: the killed pids, the prompt side's too).
          for line in engine.report(res):
            log(f"  {line}")
          if "identical" in summary:
            same = sum(res.tokens().get(r.request_id) == ref[r.request_id] for r in requests)
            log(f"  completions {'identical to' if summary['identical'] else 'DIFFERENT from'} "
                f"the single-device greedy run ({same}/{len(requests)} identical)")
          for why in res.rejected.values():
            log(f"  rejected: {why}")
          for w in warnings:
            runrecord.warn(log, f"[{tag}] {w}")
          if seed == seeds[0] or not many_s:
            label = _curve_label(name, seed, float(rate), len(c.rates) > 1, bool(warnings))
            timelines[label] = res.records
            fired[label] = [ev.failed_at for ev in res.recoveries]
          shown = {k: v for k, v in summary.items() if k not in ("config", "injected_failures")}
          texts.append(metrics.format_summary(shown, title=tag))
  _write_all(out_dir, summaries, recoveries)
  with open(os.path.join(out_dir, "summary.txt"), "w") as f:
    f.write("\n\n".join(texts) + "\n")
  log("\n" + runs_table(summaries))
  comparing = many_s or many_seeds or (failures and runs[0][0] == BASELINE)
  cautions = _comparison_warnings(summaries, seeds) if comparing else []
  if comparing:
    table = comparison_table(summaries)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
      f.write(table + "\n")
      if cautions:
        f.write("\n**Validity warnings**\n\n" + "".join(f"- {w}\n" for w in cautions))
        for s in summaries:
          for w in s.get("warnings", ()):
            f.write(f"- {s.get('strategy')} seed {s.get('seed')} rate {s['rate']:g}: {w}\n")
    log("\n" + table)
    for w in cautions:
      runrecord.warn(log, w)
  if len(c.rates) > 1:
    reporting.plot_latency_vs_rate(summaries, os.path.join(out_dir, "latency_vs_rate.png"),
                                 system_key="strategy" if many_s or comparing else "system")
  if failures:
    reporting.plot_failure_timeline(
        timelines, os.path.join(out_dir, "failure_timeline.png"),
        failure_times=(fired if not any(f.time_s is not None for f in failures) else
                       [f.time_s for f in failures if f.time_s is not None]),
        title=f"{', '.join(f.describe() for f in failures)}; "
              f"{' vs '.join(strategies)} recovery",
        notes=cautions + sorted({w for s in summaries for w in s.get("warnings", ())
                                 if s.get("seed") == seeds[0]}))
  return summaries


BASELINE = "failure-free"


def oracle(cfg, params, sc, requests, cache: dict, key) -> dict:
  """request_id -> the plain single-device greedy tokens of `requests` (`check_tokens`): the
  fake program's `fake_generate`, or one batched `generate` of the model (cut at each request's
  max_new_tokens and after its EOS, as the engine stops a row); computed once per workload."""
  if key in cache:
    return cache[key]
  eos = sc.sampling.eos_token_id
  if sc.topology.program == "fake":
    from dejavu_jax.pipeline.fake import fake_generate  # pylint: disable=g-import-not-at-top
    ref = {r.request_id: fake_generate(cfg, [r.prompt], r.max_new_tokens, eos)[0]
           for r in requests}
  else:
    from dejavu_jax.models.generate import generate  # pylint: disable=g-import-not-at-top
    outs = generate(cfg, params, [r.prompt for r in requests],
                    max(r.max_new_tokens for r in requests), eos_token_id=-1,
                    max_len=sc.topology.max_len)
    ref = {}
    for r, o in zip(requests, outs):
      o = list(o[:r.max_new_tokens])
      ref[r.request_id] = o[:o.index(eos) + 1] if eos is not None and eos in o else o
  cache[key] = ref
  return ref


def _recomputes(strategy: str) -> bool:
  """Whether a recovery may prefill a prompt together with its generated tokens (so longer
  prompt buckets than the workload's are compiled)."""
  return any(n.strip() in ("reprefill", "snapshot") for n in strategy.split(","))


def warm(engine, workloads, recomputes: bool, log=print, bars: bool = True) -> None:
  """Compiles only the prompt buckets these workloads can reach (every bucket up to `max_len`
  is `engine.warmup`'s, 5 for max_len 256, and each costs a minute on a loaded CPU): the buckets
  of their prompts and, when a recovery recomputes, those of prompt + generated tokens. Each
  bucket is a dummy request served before the clock starts (a compile mid-run skews latencies
  and can starve heartbeats)."""
  max_len = engine.serve_cfg.topology.max_len
  if not hasattr(engine, "generate"):
    bar = runrecord.progress_bar(0, "compile (prompt buckets)", bars, unit="bucket")
    engine.warmup(progress=bar)
    bar.close()
    return
  reqs = [r for w in workloads for r in w]
  lo = min(len(r.prompt) for r in reqs)
  hi = max(len(r.prompt) + (r.max_new_tokens if recomputes else 0) for r in reqs)
  buckets = sorted({bucket_length(n, max_len) for n in range(lo, min(hi, max_len - 1) + 1)})
  log(f"compiling {len(buckets)} prompt bucket(s) {buckets} and the decode step at the contexts "
      "they reach (cached on disk for the next run)")
  bar = runrecord.progress_bar(len(buckets), "compile (prompt buckets)", bars, unit="bucket")
  pad = engine.cfg.pad_token_id
  for i, b in enumerate(buckets):
    n = min(b, max_len - 2)   # the longest prompt of the bucket that leaves room for two tokens
    engine.generate([[pad] * n], 2)   # its prefill, and the decode at its context
    bar(i + 1, len(buckets))
  bar.close()
  # Decode compiles once per context bucket: the contexts generated tokens reach beyond the
  # longest prompt bucket are swept by one dummy request.
  top = min(max(len(r.prompt) + r.max_new_tokens for r in reqs), max_len)
  n = min(buckets[-1], max_len - 2)
  if top > bucket_length(n + 1, max_len):
    engine.generate([[pad] * n], top - n)


def _curve_label(name: str, seed: int, rate: float, many_rates: bool, warned: bool) -> str:
  label = f"{name} (seed {seed}" + (f", {rate:g} req/s)" if many_rates else ")")
  return label + (" [!]" if warned else "")


RUN_COLUMNS = (("completed", "done", "{:d}"), ("request_throughput", "req/s", "{:.3g}"),
               ("norm_latency_p50_s_per_tok", "p50 s/tok", "{:.3g}"),
               ("norm_latency_p99_s_per_tok", "p99 s/tok", "{:.3g}"),
               ("mean_ttft_ms", "TTFT ms", "{:.0f}"), ("mean_e2el_ms", "e2e ms", "{:.0f}"),
               ("mean_recovery_s", "recov s", "{:.2f}"),
               ("total_recomputed_tokens", "redone", "{:d}"))


def _fmt(v, f: str) -> str:
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return "-"
  try:
    return f.format(int(v) if "d" in f else v)
  except (TypeError, ValueError):
    return str(v)


def run_line(summary: dict, tag: str, res=None) -> str:
  """One line per finished run (the full summary is in summary.txt / summary.jsonl)."""
  cells = [f"{name} {_fmt(summary.get(k), f)}" for k, name, f in RUN_COLUMNS
           if k in summary]
  rec = ""
  if res is not None and res.recoveries:
    ev = res.recoveries[0]
    rec = (f"; stage {ev.stage} failed at {ev.failed_at:.2f} s, detected +{ev.detection_s:.2f} s,"
           f" {ev.lost_requests} req in flight")
  warn = f"; {len(summary['warnings'])} WARNING(S)" if summary.get("warnings") else ""
  return f"[{tag}] " + ", ".join(cells) + rec + warn


def runs_table(summaries: list[dict]) -> str:
  """The final table, one line per run (as vLLM's benchmark prints): strategy, seed, rate, the
  headline metrics and how many validity warnings the run carries."""
  head = ["strategy", "seed", "rate"] + [name for k, name, _ in RUN_COLUMNS
                                         if any(k in s for s in summaries)] + ["warn"]
  rows = []
  for s in summaries:
    rows.append([str(s.get("strategy", "")), str(s.get("seed", "")), f"{s['rate']:g}"] +
                [_fmt(s.get(k), f) for k, _, f in RUN_COLUMNS if any(k in x for x in summaries)]
                + [str(len(s.get("warnings", ()))) if s.get("warnings") else ""])
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
  line = lambda cells: "  ".join(c.rjust(w) if i > 0 else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  out = [line(head), "-" * len(line(head))] + [line(r) for r in rows]
  return "\n".join(out)


COMPARED = (("norm_latency_p50_s_per_tok", "norm. latency p50 (s/tok)"),
            ("norm_latency_p99_s_per_tok", "p99 (s/tok)"),
            ("mean_e2el_ms", "mean e2e (ms)"),
            ("request_throughput", "req/s"),
            ("total_recomputed_tokens", "tokens redone"),
            ("mean_recovery_s", "recovery (s)"),
            ("request_goodput", "goodput (req/s)"))


def comparison_table(summaries: list[dict]) -> str:
  """A Markdown table: one row per (strategy, rate), each metric's mean over the seeds and, with
  several seeds, its spread (± standard deviation, [min, max]); 'warn' counts the runs whose
  numbers carry a validity warning (the failure-free baseline's row is 'failure-free')."""
  groups: dict[tuple, list[dict]] = {}
  for s in summaries:
    groups.setdefault((s.get("strategy", ""), s["rate"]), []).append(s)
  cols = [(k, name) for k, name in COMPARED if any(k in s for s in summaries)]
  lines = ["| strategy | rate | seeds | " + " | ".join(n for _, n in cols) + " | warn |",
           "|---|---|---|" + "---|" * len(cols) + "---|"]
  for (strategy, rate), rows in groups.items():
    cells = []
    for k, _ in cols:
      v = np.asarray([r[k] for r in rows if r.get(k) is not None], np.float64)
      v = v[np.isfinite(v)]
      if v.size == 0:
        cells.append("-")
      elif v.size == 1:
        cells.append(f"{v[0]:.4g}")
      else:
        cells.append(f"{v.mean():.4g} ± {v.std():.2g} [{v.min():.4g}, {v.max():.4g}]")
    warned = sum(bool(r.get("warnings")) for r in rows)
    cells.append(f"{warned} of {len(rows)} runs" if warned else "")
    lines.append(f"| {strategy} | {rate:g} | {len(rows)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _write_all(out_dir: str, summaries: list[dict], recoveries: list[dict]) -> None:
  _write_summaries(out_dir, summaries)
  with open(os.path.join(out_dir, "recoveries.jsonl"), "w") as f:   # never appended
    for ev in recoveries:
      f.write(metrics.dumps(ev) + "\n")


def _write_summaries(out_dir: str, summaries: list[dict]) -> None:
  with open(os.path.join(out_dir, "summary.jsonl"), "w") as f:
    for s in summaries:
      f.write(metrics.dumps(s) + "\n")
