"""The README main job with the real model: text prompts in, completions out, a stage killed
mid-run, and the completions checked against the failure-free single-device run.

`run_text_job(c, out_dir)` loads the packaged SmolLM2-135M-Instruct (or `c.gguf`), wraps each
prompt of `c.text_prompts` in the chat template, serves them on the pipeline of the config (an
open-loop client: one prompt every `c.text_gap_s` seconds) while `c.fail_stages` fail after
`c.fail_after_steps` steps of their workers (or at `c.fail_times`), then generates the same prompts
with plain single-device greedy decoding and says whether every completion is identical. Writes
`completions.jsonl`, `requests.jsonl`, `recoveries.jsonl` and `summary.jsonl` to `out_dir`.
"""

from __future__ import annotations

import os

from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.models.generate import generate
from dejavu_jax.models.tokenizer import encode_prompts, read_prompts
from dejavu_jax import metrics
from dejavu_jax.studies import runconfig
from dejavu_jax.studies import text
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request


def failures_of(c) -> list[FailureSpec]:
  """The config's failures: fail_stages paired with fail_after_steps, else with fail_times."""
  steps = tuple(c.get("fail_after_steps", ()) or ())
  times = tuple(c.fail_times or ())
  stages = tuple(c.fail_stages or ())
  if steps:
    if len(steps) != len(stages):
      raise ValueError(f"fail_stages {list(stages)} and fail_after_steps {list(steps)} must have "
                       "the same length")
    return [FailureSpec(stage=int(s), after_steps=int(n)) for s, n in zip(stages, steps)]
  if len(times) != len(stages):
    raise ValueError(f"fail_stages {list(stages)} and fail_times {list(times)} must have the "
                     "same length")
  return [FailureSpec(float(t), int(s)) for s, t in zip(stages, times)]


_HOW = {"replica": "from replicas", "snapshot": "from snapshots", "reprefill": "by re-prefill",
        "restart": "by restarting their requests"}


def recovered_words(handled_by: dict) -> str:
  """{'replica': 2} -> 'recovered 2 microbatches from replicas' (each strategy that served)."""
  parts = [f"{n} microbatch{'es' if n != 1 else ''} {_HOW.get(k, f'by {k}')}"
           for k, n in handled_by.items()]
  return "recovered " + (", ".join(parts) if parts else "nothing in flight")


def run_text_job(c, out_dir: str, log=print, row_info: dict | None = None) -> dict:
  """Runs the job (module doc); `row_info` (what the run was: commit, config, ...) goes into the
  summary row."""
  failures = failures_of(c)
  os.makedirs(out_dir, exist_ok=True)
  cfg, params, tok = text.load_text_model(c.gguf, c.dtype)
  prompts = read_prompts(c.text_prompts)
  ids = encode_prompts(tok, prompts, chat=True)
  max_len = text.cache_length(ids, c.text_new_tokens, cfg.max_positions)
  sc = runconfig.serve_config(c, max_len=max_len, eos_token_id=tok.eos_token_id)
  log(f"model {cfg.name}: {cfg.num_layers} layers, d={cfg.hidden_size}, "
      f"{cfg.param_count() / 1e6:.1f}M params (GGUF, dequantized to {cfg.dtype}); "
      f"{len(prompts)} prompts from {c.text_prompts}")
  reqs = [Request(i, i * c.text_gap_s, tuple(p), c.text_new_tokens) for i, p in enumerate(ids)]
  with PipelineEngine(cfg, params, sc) as engine:
    log(f"pipeline: {engine.plan.num_stages} stages {list(engine.plan.ranges)}, microbatch "
        f"{sc.topology.microbatch_size}, recovery {sc.fault.recovery}; failures: "
        f"{[f.describe() for f in failures] or 'none'}")
    engine.warmup()
    res = engine.serve(reqs, failures=failures)
  for ev in res.recoveries:
    log(f"  failure of stage(s) {list(ev.stages)}: detected after {ev.detection_s:.2f} s, "
        f"{recovered_words(ev.handled_by)} after {ev.recovery_s:.2f} s (recovery "
        f"{ev.strategy}), {ev.lost_requests} requests in flight, {ev.recomputed_tokens} tokens "
        "to redo")
  ref = generate(cfg, params, ids, c.text_new_tokens, eos_token_id=tok.eos_token_id,
                 max_len=max_len)
  got = res.tokens()
  same = [got.get(i) == ref[i] for i in range(len(prompts))]
  rows = []
  for i, p in enumerate(prompts):
    completion = tok.decode(got.get(i, []))
    rows.append({"prompt": p, "completion": completion, "token_ids": got.get(i, []),
                 "identical_to_failure_free": same[i]})
    log(f"\n> {p}\n{completion.strip()}")
  verdict = ("identical to" if all(same) else "DIFFERENT from")
  log(f"\nall {len(prompts)} completions are {verdict} the failure-free single-device greedy run "
      f"({sum(same)}/{len(prompts)} identical), with {len(res.recoveries)} failure(s) recovered")
  with open(os.path.join(out_dir, "completions.jsonl"), "w") as f:
    for r in rows:
      f.write(metrics.dumps(r) + "\n")
  metrics.write_jsonl(os.path.join(out_dir, "requests.jsonl"), res.records)
  with open(os.path.join(out_dir, "recoveries.jsonl"), "w") as f:
    for ev in res.recoveries:
      f.write(metrics.dumps(ev.to_dict()) + "\n")
  summary = {"system": f"pipeline_D{sc.topology.num_stages}", "model": cfg.name,
             "recovery": sc.fault.recovery, "identical": all(same), **(row_info or {}),
             **res.summary}
  with open(os.path.join(out_dir, "summary.jsonl"), "w") as f:
    f.write(metrics.dumps(summary) + "\n")
  return summary
