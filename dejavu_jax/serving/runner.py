"""Runs a serving experiment from an ml_collections config: model, engine, workload, failures,
results on disk. The experiment scripts stay thin; tests call `run_experiment` directly.

When serving fails (`EngineError`), everything already served is still written (the requests
file of the failed rate, and a summary with "error") before the error is raised again."""

from __future__ import annotations

import os
import sys
import time

import jax

from dejavu_jax import costmodel
from dejavu_jax.config import ServeConfig, get_model_config
from dejavu_jax.fault.controller import FailureSpec
from dejavu_jax.models import init_params
from dejavu_jax.models.convert import load_hf_checkpoint
from dejavu_jax.serving import metrics
from dejavu_jax.serving.engine import EngineError, PipelineEngine
from dejavu_jax.serving.workload import WorkloadConfig, make_workload


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
                     **_runtime_fields(c))


def _runtime_fields(c) -> dict:
  """ServeConfig's runtime fields from the config's `runtime` and `ray` entries (if any)."""
  ray_c = c.get("ray") or {}
  out = {"runtime": c.get("runtime", "local")}
  for key in ("address", "placement", "transport", "gpus_per_stage"):
    if ray_c.get(key) not in (None, ""):
      out[f"ray_{key}"] = ray_c[key]
  return out


def _progress(log):
  state = {"last": 0.0}

  def cb(done, total):
    now = time.perf_counter()
    if now - state["last"] > 2.0 or done == total:
      state["last"] = now
      sys.stdout.write(f"\r  {done}/{total} requests finished")
      sys.stdout.flush()
      if done == total:
        sys.stdout.write("\n")
  return cb if log else None


def run_experiment(c, out_dir: str, log=print) -> list[dict]:
  """Runs one serving run per rate in c.rates; writes results; returns the summaries."""
  if len(c.fail_stages) != len(c.fail_times):
    raise ValueError(f"fail_stages {list(c.fail_stages)} and fail_times {list(c.fail_times)} "
                     "must have the same length")
  os.makedirs(out_dir, exist_ok=True)
  cfg, params = build_model(c)
  sc = serve_config(c)
  cost = build_cost_model(c, cfg) if sc.pacing == "paced" else None
  failures = [FailureSpec(float(t), int(s)) for s, t in zip(c.fail_stages, c.fail_times)]
  log(f"model {cfg.name}: {cfg.num_layers} layers, d={cfg.hidden_size}, "
      f"{cfg.param_count() / 1e6:.1f}M params, {cfg.dtype}")
  summaries, texts, timelines = [], [], {}
  t_build = time.perf_counter()
  with PipelineEngine(cfg, params, sc, cost_model=cost,
                      time_scale=c.cost.time_scale) as engine:
    log(f"pipeline: {engine.plan.num_stages} stages {list(engine.plan.ranges)} x tensor "
        f"{engine.plan.tensor}, microbatch {sc.microbatch_size}, {sc.mode} mode, {sc.pacing}")
    engine.warmup()   # compile every prompt bucket before the clock starts
    log(f"engine ready in {time.perf_counter() - t_build:.1f} s")
    for rate in c.rates:
      wl = WorkloadConfig(rate=float(rate), num_requests=c.num_requests, prompt_len=c.prompt_len,
                          output_len=c.output_len, vocab_size=cfg.vocab_size, seed=c.seed,
                          max_output=c.max_output)
      requests = make_workload(wl)
      log(f"rate {rate} req/s: {len(requests)} requests, failures "
          f"{[(f.stage, f.time_s) for f in failures] or 'none'}, recovery {sc.recovery}")
      failed = None
      try:
        res = engine.serve(requests, progress=_progress(log), failures=failures)
      except EngineError as e:
        failed, res = e, e.result
      summary = {"rate": float(rate), "system": f"pipeline_D{sc.num_stages}",
                 "model": cfg.name, **res.summary}
      metrics.write_jsonl(os.path.join(out_dir, f"requests_rate{rate:g}.jsonl"), res.records)
      with open(os.path.join(out_dir, "recoveries.jsonl"), "a") as f:
        for ev in res.recoveries:
          f.write(metrics.dumps({"rate": float(rate), **ev.to_dict()}) + "\n")
      if failed is not None:
        summaries.append(summary)
        _write_summaries(out_dir, summaries)
        log(f"  serving failed at rate {rate:g}: {res.error}; the "
            f"{sum(r.done for r in res.records)} requests served are written to {out_dir}")
        raise failed
      for ev in res.recoveries:
        log(f"  failure of stage {ev.stage} at {ev.failed_at:.2f} s: detected after "
            f"{ev.detection_s:.2f} s, recovered ({ev.strategy}) after {ev.recovery_s:.2f} s, "
            f"{ev.lost_requests} requests in flight, {ev.recomputed_tokens} tokens to redo")
      for line in getattr(engine.runtime, "report", lambda _: [])(res):   # Ray: killed pids
        log(f"  {line}")
      for rid, why in res.rejected.items():
        log(f"  rejected: {why}")
      timelines[f"{rate:g} req/s"] = res.records
      text = metrics.format_summary(summary, title=f"rate {rate:g} req/s")
      log(text)
      texts.append(text)
      summaries.append(summary)
  _write_summaries(out_dir, summaries)
  with open(os.path.join(out_dir, "summary.txt"), "w") as f:
    f.write("\n\n".join(texts) + "\n")
  if len(summaries) > 1:
    metrics.plot_latency_vs_rate(summaries, os.path.join(out_dir, "latency_vs_rate.png"))
  if failures:
    metrics.plot_failure_timeline(
        timelines, os.path.join(out_dir, "failure_timeline.png"),
        failure_times=[f.time_s for f in failures],
        title=f"stage(s) {[f.stage for f in failures]} killed; {sc.recovery} recovery")
  return summaries


def _write_summaries(out_dir: str, summaries: list[dict]) -> None:
  with open(os.path.join(out_dir, "summary.jsonl"), "w") as f:
    for s in summaries:
      f.write(metrics.dumps(s) + "\n")
