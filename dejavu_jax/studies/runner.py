"""Runs a serving experiment from an ml_collections config: model, engine, workload, failures,
results on disk. The experiment scripts stay thin; tests call `run_experiment` directly.

The config is validated whole before anything is built (`runconfig`); several strategies
(`recovery='(restart,replica)'`) and seeds (`seeds=(0,1,2)`) run on one engine compiled once,
each strategy on the same requests and failures; every summary row says what it was
(`runrecord`), and `comparison.md` gives each strategy's numbers (spread over the seeds).

When serving fails (`EngineError`), everything already served is still written (the requests
file of the failed rate, and a summary with "error") before the error is raised again."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from dejavu_jax import costmodel
from dejavu_jax.config import ServeConfig, get_model_config
from dejavu_jax.fault.controller import FailureSpec
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


def serve_config(c) -> ServeConfig:
  return ServeConfig(num_stages=c.num_stages, tensor=c.tensor, microbatch_size=c.microbatch_size,
                     max_len=c.max_len, mode=c.mode, pacing=c.pacing, seed=c.seed,
                     heartbeat_s=c.heartbeat_s, heartbeat_timeout_s=c.heartbeat_timeout_s,
                     recovery=c.recovery, snapshot_every=c.snapshot_every,
                     program=c.program, max_pending=c.get("max_pending"),
                     swapping=c.get("swapping", "off"),
                     device_kv_budget_bytes=c.get("device_kv_budget_bytes"),
                     prompt_stages=c.get("prompt_stages", 0) or 0,
                     token_stages=c.get("token_stages", 0) or 0,
                     host_slots=c.get("host_slots"),
                     **_runtime_fields(c))


def _runtime_fields(c) -> dict:
  """ServeConfig's runtime fields from the config's `runtime` and `ray` entries (if any)."""
  ray_c = c.get("ray") or {}
  out = {"runtime": c.get("runtime", "local")}
  for key in ("address", "placement", "transport", "gpus_per_stage"):
    if ray_c.get(key) not in (None, ""):
      out[f"ray_{key}"] = ray_c[key]
  return out


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


def _warn_run(log, res, failures, strategy: str, rate: float, summary: dict) -> None:
  """Loud warnings for results that are not what they claim to be (issue 15)."""
  what = f"[{strategy}, rate {rate:g}]"
  if summary.get("paced_overruns"):
    runrecord.warn(log, f"{what} {summary['paced_overruns']} paced steps overran their modelled "
                   "time: real compute did not fit, so this is NOT a paced result (raise "
                   "cost.time_scale, or use fewer stages per core)")
  for ev in res.recoveries:
    if ev.lost_requests == 0 or (ev.restored_microbatches == 0 and ev.recomputed_tokens == 0):
      runrecord.warn(log, f"{what} the failure of stage {ev.stage} at {ev.failed_at:.2f} s hit "
                     "no generated work in flight (nothing in flight, or only prompts not yet "
                     "past their first token): it measures detection, not recovery (fail "
                     "later, or send more requests)")
  if len(res.recoveries) < len(failures):
    late = [f.time_s for f in failures][len(res.recoveries):]
    runrecord.warn(log, f"{what} {len(failures) - len(res.recoveries)} failure(s) (at "
                   f"{late} s) never fired: the run ended at {res.wall_s:.2f} s")


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
  runconfig.validate(c, num_devices=len(jax.devices()))
  strategies = runconfig.strategies_of(c.recovery)
  seeds = tuple(c.get("seeds", ()) or ()) or (c.seed,)
  runrecord.prepare_output_dir(out_dir, overwrite)
  failures = [FailureSpec(float(t), int(s)) for s, t in zip(c.fail_stages, c.fail_times)]
  info = runrecord.run_info(c, strategies=list(strategies), seeds=list(seeds))
  runrecord.write_run_info(out_dir, info)
  cfg, params = build_model(c)
  sc = dataclasses.replace(serve_config(c), recovery=strategies[0])
  cost = build_cost_model(c, cfg) if sc.pacing == "paced" else None
  log(f"model {cfg.name}: {cfg.num_layers} layers, d={cfg.hidden_size}, "
      f"{cfg.param_count() / 1e6:.1f}M params, {cfg.dtype}")
  if not failures:
    for strategy in strategies:
      if _keeps_state(strategy):
        runrecord.warn(log, f"failure-free run with recovery={strategy!r}: replication/snapshots "
                       "run and their overhead is in these numbers; a failure-free baseline "
                       "wants --config.recovery=restart")
  many_s, many_seeds = len(strategies) > 1, len(seeds) > 1
  summaries, texts, timelines, recoveries = [], [], {}, []
  t_build = time.perf_counter()
  # share_devices: every stage on the same `tensor` devices (e.g. a whole pipeline on one GPU).
  devices = jax.devices()[:sc.tensor] * sc.num_stages if c.get("share_devices") else None
  with make_engine(cfg, params, sc, cost_model=cost, devices=devices,
                   time_scale=c.cost.time_scale) as engine:
    if sc.prompt_stages or sc.token_stages:
      path = engine.prompt_path
      log(f"disaggregated: {path.Dp} prompt stages {list(path.prompt_plan.ranges)} -> "
          f"{path.Dt} token stages {list(engine.plan.ranges)}, {path.host_slots} host slots")
    log(f"pipeline: {engine.plan.num_stages} stages {list(engine.plan.ranges)} x tensor "
        f"{engine.plan.tensor}, microbatch {getattr(engine, 'microbatch_size', sc.microbatch_size)}"
        f", {sc.mode} mode, {sc.pacing}")
    choice = getattr(engine, "swap_choice", None)
    if choice is not None and (sc.swapping != "off" or sc.device_kv_budget_bytes):
      log(f"swapping {'on' if choice.swapping else 'off'}: {choice.reason}")
    bar = runrecord.progress_bar(0, "compile (prompt buckets)", bars, unit="bucket")
    engine.warmup(progress=bar)   # compile every prompt bucket before the clock starts
    bar.close()
    log(f"engine ready in {time.perf_counter() - t_build:.1f} s; strategies {list(strategies)}, "
        f"seeds {list(seeds)}, rates {list(c.rates)}")
    for strategy in strategies:
      if engine.serve_cfg.recovery != strategy:
        engine.set_recovery(strategy)   # same compiled programs, fresh workers
      for seed in seeds:
        for rate in c.rates:
          wl = WorkloadConfig(rate=float(rate), num_requests=c.num_requests,
                              prompt_len=c.prompt_len, output_len=c.output_len,
                              vocab_size=cfg.vocab_size, seed=seed, max_output=c.max_output)
          requests = make_workload(wl)
          tag = _tag(strategy, seed, float(rate), many_s, many_seeds)
          log(f"[{tag}] {len(requests)} requests, failures "
              f"{[(f.stage, f.time_s) for f in failures] or 'none'}, recovery {strategy}")
          failed = None
          bar = runrecord.progress_bar(len(requests), f"serve {tag}", bars, unit="req")
          try:
            res = engine.serve(requests, progress=bar, failures=failures)
          except EngineError as e:
            failed, res = e, e.result
          finally:
            bar.close()
          summary = {"rate": float(rate), "system": f"pipeline_D{sc.num_stages}",
                     "model": cfg.name,
                     **runrecord.row_info(
                         info, strategy=strategy, seed=seed, pacing=sc.pacing,
                         injected_failures=[[f.stage, f.time_s] for f in failures]),
                     **res.summary}
          if c.get("slo_ttft_ms") is not None or c.get("slo_tpot_ms") is not None:
            slo = metrics.summarize(res.records, duration=res.wall_s,
                                    slo_ttft_ms=c.get("slo_ttft_ms"),
                                    slo_tpot_ms=c.get("slo_tpot_ms"))
            summary |= {k: slo[k] for k in ("request_goodput", "slo_attainment")}
          metrics.write_jsonl(os.path.join(out_dir, f"requests_{tag}.jsonl"), res.records)
          recoveries += [{"rate": float(rate), "seed": seed, **ev.to_dict(),
                          "strategy": strategy} for ev in res.recoveries]
          summaries.append(summary)
          if failed is not None:
            _write_all(out_dir, summaries, recoveries)
            log(f"  serving failed [{tag}]: {res.error}; the "
                f"{sum(r.done for r in res.records)} requests served are written to {out_dir}")
            raise failed
          for ev in res.recoveries:
            log(f"  failure of stage {ev.stage} at {ev.failed_at:.2f} s: detected after "
                f"{ev.detection_s:.2f} s, recovered ({ev.strategy}) after {ev.recovery_s:.2f} s, "
                f"{ev.lost_requests} requests in flight, {ev.recomputed_tokens} tokens to redo")
          for line in engine.runtime.report(res):   # Ray: killed pids
            log(f"  {line}")
          for why in res.rejected.values():
            log(f"  rejected: {why}")
          _warn_run(log, res, failures, strategy, float(rate), summary)
          if seed == seeds[0]:
            label = strategy if many_s else ""
            label = f"{label} {rate:g} req/s".strip() if len(c.rates) > 1 or not many_s else label
            timelines[label] = res.records
          shown = {k: v for k, v in summary.items() if k not in ("config", "injected_failures")}
          text = metrics.format_summary(shown, title=tag)
          log(text)
          texts.append(text)
  _write_all(out_dir, summaries, recoveries)
  with open(os.path.join(out_dir, "summary.txt"), "w") as f:
    f.write("\n\n".join(texts) + "\n")
  if many_s or many_seeds:
    table = comparison_table(summaries)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
      f.write(table + "\n")
    log("\n" + table)
  if len(c.rates) > 1:
    reporting.plot_latency_vs_rate(summaries, os.path.join(out_dir, "latency_vs_rate.png"),
                                 system_key="strategy" if many_s else "system")
  if failures:
    reporting.plot_failure_timeline(
        timelines, os.path.join(out_dir, "failure_timeline.png"),
        failure_times=[f.time_s for f in failures],
        title=f"stage(s) {[f.stage for f in failures]} killed; "
              f"{' vs '.join(strategies)} recovery")
  return summaries


COMPARED = (("norm_latency_p50_s_per_tok", "norm. latency p50 (s/tok)"),
            ("norm_latency_p99_s_per_tok", "p99 (s/tok)"),
            ("mean_e2el_ms", "mean e2e (ms)"),
            ("request_throughput", "req/s"),
            ("total_recomputed_tokens", "tokens redone"),
            ("mean_recovery_s", "recovery (s)"),
            ("request_goodput", "goodput (req/s)"))


def comparison_table(summaries: list[dict]) -> str:
  """A Markdown table: one row per (strategy, rate), each metric's mean over the seeds and, with
  several seeds, its spread (± standard deviation, [min, max])."""
  groups: dict[tuple, list[dict]] = {}
  for s in summaries:
    groups.setdefault((s.get("strategy", ""), s["rate"]), []).append(s)
  cols = [(k, name) for k, name in COMPARED if any(k in s for s in summaries)]
  lines = ["| strategy | rate | seeds | " + " | ".join(n for _, n in cols) + " |",
           "|---|---|---|" + "---|" * len(cols)]
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
