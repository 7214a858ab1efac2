"""Benchmark of layer-wise prompt streaming in the DisaggregatedEngine: whole-stage vs layer-wise.

A small OPT-shaped random model (default 8 layers, hidden 256) with long prompts runs in a 1-stage
prompt pipeline streaming into a 2-stage token pipeline (virtual CPU devices). Prompts arrive one
microbatch at a time, so each prefill runs alone. Per prompt microbatch, from the prompt worker's
event log (`PromptRuntime.tracer`, perf_counter stamps) and the start of its prefill:

  compute_s   prefill start -> the step computed (the worker thread holds the output)
  landed_s    prefill start -> the last layer landed in a token worker's host slot
  tail_s      step computed -> last layer landed (the streaming time the prefill does not hide)

Whole-stage streaming gathers and copies every layer after the step; layer-wise streaming copies
layer l while layer l+1 computes, so only the last layer's copy should remain in the tail (at the
price of one dispatch per layer). The modes alternate, --runs runs each; medians over every
microbatch of a mode. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dejavu_jax.config import ServeConfig, tiny_config  # noqa: E402
from dejavu_jax.models import init_params  # noqa: E402
from dejavu_jax.runtime import disagg as disagg_rt  # noqa: E402
from dejavu_jax.serving.disagg_engine import DisaggregatedEngine  # noqa: E402
from dejavu_jax.workload import Request  # noqa: E402


def _run(cfg, params, layerwise, args):
  """{mb_id: (prefill start, step computed, last layer landed)} of one serve."""
  starts, log = {}, {}
  original = disagg_rt.PromptWorker._prefill_fn

  def timed_prefill_fn(worker, msg):
    fn = original(worker, msg)

    def run(*a):
      starts[msg.mb_id] = time.perf_counter()
      return fn(*a)
    return run

  def tracer(event, stage, mb, layers, token_stage):
    del stage, token_stage
    t = time.perf_counter()
    if event == "step_done":
      log.setdefault(mb, {})["done"] = t
    elif event == "landed" and layers[1] == cfg.num_layers:
      log.setdefault(mb, {})["landed"] = t

  serve = ServeConfig(prompt_stages=1, token_stages=2, microbatch_size=args.batch,
                      max_len=args.prompt + 8, heartbeat_timeout_s=60.0,
                      layerwise_stream=layerwise, host_slots=2)
  rng = np.random.default_rng(0)
  # One microbatch at a time: arrivals far apart relative to a prefill.
  reqs = [Request(i, args.gap_s * (i // args.batch),
                  tuple(int(t) for t in rng.integers(3, cfg.vocab_size, args.prompt)), 2)
          for i in range(args.batch * args.microbatches)]
  disagg_rt.PromptWorker._prefill_fn = timed_prefill_fn
  try:
    with DisaggregatedEngine(cfg, params, serve) as eng:
      eng.prompt_path.runtime.tracer = tracer
      res = eng.serve(reqs)
  finally:
    disagg_rt.PromptWorker._prefill_fn = original
  assert res.error is None, res.error
  out = {mb: (starts[mb], e["done"], e["landed"]) for mb, e in log.items()
         if mb in starts and "landed" in e}
  return out, res.tokens()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--prompt", type=int, default=500)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--microbatches", type=int, default=6)
  parser.add_argument("--gap_s", type=float, default=1.0)
  parser.add_argument("--runs", type=int, default=2)
  args = parser.parse_args()
  cfg = tiny_config("opt", num_layers=args.layers, hidden_size=args.hidden,
                    num_heads=args.hidden // 32, ffn_dim=4 * args.hidden, vocab_size=512,
                    max_positions=args.prompt + 8)
  params = init_params(cfg, jax.random.key(0))
  samples = {True: [], False: []}
  tokens = {}
  for i in range(args.runs):
    for layerwise in (False, True):
      got, tokens[layerwise] = _run(cfg, params, layerwise, args)
      # The first microbatch of each run compiles: left out.
      samples[layerwise] += [got[mb] for mb in sorted(got)[1:]]
  result = {"layers": args.layers, "hidden": args.hidden, "prompt": args.prompt,
            "batch": args.batch, "samples_per_mode": len(samples[True]),
            "tokens_identical": tokens[True] == tokens[False]}
  for layerwise, name in ((False, "whole_stage"), (True, "layerwise")):
    s = samples[layerwise]
    result[f"{name}_compute_s"] = statistics.median(d - t0 for t0, d, _ in s)
    result[f"{name}_landed_s"] = statistics.median(l - t0 for t0, _, l in s)
    result[f"{name}_tail_s"] = statistics.median(l - d for _, d, l in s)
    print(f"{name}: compute {result[f'{name}_compute_s']:.4f} s, last layer landed "
          f"{result[f'{name}_landed_s']:.4f} s, tail {result[f'{name}_tail_s']:.4f} s "
          f"(medians of {len(s)})", flush=True)
  result["landed_speedup"] = result["whole_stage_landed_s"] / result["layerwise_landed_s"]
  result["load_average"] = os.getloadavg()[0]
  # Real prefills and transfers on this machine: every figure is measured.
  result["kind"] = {k: "measured" for k in result
                    if k not in ("layers", "hidden", "prompt", "batch")}
  print(json.dumps(result))


if __name__ == "__main__":
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  jaxcache.enable_compilation_cache()   # DEJAVU_JAX_CACHE_DIR=off times cold compiles
  main()
