"""Benchmark of the KV streaming library: the paper's streaming ablation, flush bandwidth, and the
cost of per-step background token streaming on a real decode loop.

Shapes: OPT-1.3B layers (32 heads x 64), prompt 500, batch 8, bfloat16, cache length 512.

1. Transfer only (the whole 24-layer prompt cache, already computed): naive (one transfer per
   layer, row and k|v) vs buffered (gather + one transfer) into a host KV log.
2. Flush bandwidth: a gathered buffer flushed into the preallocated log vs a numpy memcpy of the
   same bytes between warm host buffers, in the same run.
3. Ablation with real compute: a real OPT-1.3B-shaped model truncated to --compute_layers layers
   (a full 24-layer prefill takes minutes on a CPU) runs its prefill as one-layer groups; the
   exposed streaming time of each mode is measured from the moment the prompt's compute is done
   (the caller holds the last group's output) until the log holds the whole prompt. Per decode
   step, the synchronous modes expose the copy of one step's delta; the background mode only
   its submit (gather dispatch + enqueue) on the caller's thread.
4. Token streaming overhead: the same model's decode loop with a background append of every
   step's delta to a host log vs without, interleaved runs.

Every timing is the median of --runs runs. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import get_model_config
from dejavu_jax.kv.cache import KVCache, init_cache_for
from dejavu_jax.models import init_params
from dejavu_jax.models.generate import make_steps
from dejavu_jax.kv.buckets import bucket_length
from dejavu_jax.stream import ablation, transport
from dejavu_jax.stream.packing import gather
from dejavu_jax.stream.hostlog import HostKVLog
from dejavu_jax.stream.streamer import Streamer


def median_time(fn, runs: int, setup=None) -> float:
  times = []
  for _ in range(runs):
    if setup is not None:
      setup()
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def random_cache(cfg, layers: int, batch: int, max_len: int, length: int) -> KVCache:
  c = init_cache_for(cfg, layers, batch, max_len)
  kk, kv = jax.random.split(jax.random.key(0))
  k = jax.random.normal(kk, c.k.shape, c.k.dtype)
  v = jax.random.normal(kv, c.v.shape, c.v.dtype)
  return jax.block_until_ready(KVCache(k=k, v=v, lengths=jnp.full((batch,), length, jnp.int32)))


def log_for(cfg, layers, batch, max_len, base=0) -> HostKVLog:
  log = HostKVLog(layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_dtype,
                  layer_base=base)
  log.kv.fill(0)   # Touch every page now, so no run pays the first-touch page faults.
  return log


def transfer_only(cfg, args) -> dict:
  cache = random_cache(cfg, cfg.num_layers, args.batch, args.max_len, args.prompt)
  log = log_for(cfg, cfg.num_layers, args.batch, args.max_len)
  naive = median_time(lambda: ablation.stream_naive(cache, 0, args.prompt, log), args.runs)
  buffered = median_time(lambda: log.write(gather(cache, 0, args.prompt)), args.runs)
  # Flush bandwidth: the gathered buffer alone, into its place in the log.
  packed = jax.block_until_ready(gather(cache, 0, args.prompt))
  dst = np.empty(packed.data.shape, packed.data.dtype)
  dst.fill(0)
  flush = median_time(lambda: transport.flush(packed.data, out=dst), args.runs)
  src = np.asarray(packed.data).copy()
  memcpy = median_time(lambda: np.copyto(dst, src), args.runs)
  nbytes = packed.data.nbytes
  return dict(bytes=int(nbytes), naive_s=naive, buffered_s=buffered,
              buffered_speedup=naive / buffered, flush_GBps=nbytes / flush / 1e9,
              memcpy_GBps=nbytes / memcpy / 1e9, flush_bw_fraction=memcpy / flush,
              pieces=2 * cfg.num_layers * args.batch)


def compute_ablation(cfg, args) -> tuple[dict, dict]:
  n = args.compute_layers
  small = cfg.replace(num_layers=n)
  groups = [(l, l + 1) for l in range(n)]
  steps = [make_steps(small, a, b) for a, b in groups]
  params = [init_params(small, jax.random.key(a), a, b) for a, b in groups]
  t = bucket_length(args.prompt, args.max_len)
  tokens = jax.random.randint(jax.random.key(1), (args.batch, t), 3, cfg.vocab_size, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (args.batch, t))
  positions = jnp.where(positions < args.prompt, positions, -1)
  logs = [log_for(small, 1, args.batch, args.max_len, base=a) for a, _ in groups]
  state = {}

  def fresh():
    state["caches"] = [init_cache_for(small, 1, args.batch, args.max_len) for _ in groups]
    for log in logs:
      log.reset()

  def prefill_only():
    out = tokens
    caches = state["caches"]
    for g, ((prefill, _), p) in enumerate(zip(steps, params)):
      caches[g], out = prefill(p, caches[g], out, positions)
    jax.block_until_ready((caches, out))

  prompt, token, totals = {}, {}, {}
  with Streamer(num_threads=1) as streamer:
    def run(mode):
      # Exposed streaming time: from the moment the prompt's compute is done (the caller holds
      # the last group's output) until the log holds the whole prompt.
      def go():
        t0 = time.perf_counter()
        if ablation.overlaps_prompt(mode):
          caches, out, tickets = ablation.prefill_and_stream(
              mode, [p for p, _ in steps], params, state["caches"], groups, tokens, positions,
              logs, args.prompt, streamer=streamer, key="prompt")
          jax.block_until_ready((caches, out))
          t1 = time.perf_counter()
          for tk in tickets:
            tk.wait()
        else:
          prefill_only()
          caches = state["caches"]
          t1 = time.perf_counter()
          for cache, (a, _), log in zip(caches, groups, logs):
            ablation.stream_prompt(mode, cache, 0, args.prompt, log, layer_base=a)
        t2 = time.perf_counter()
        state["caches"] = caches
        state["times"].append((t2 - t1, t2 - t0))
      return go

    fresh()
    prefill_only()   # Compiles every group's prefill.
    base = median_time(prefill_only, args.runs, setup=fresh)
    for mode in ablation.MODES:
      fresh()
      state["times"] = []
      run(mode)()    # Warm-up: compiles the gathers.
      state["times"] = []
      for _ in range(args.runs):
        fresh()
        run(mode)()
      prompt[mode] = statistics.median(t for t, _ in state["times"])
      totals[mode] = statistics.median(t for _, t in state["times"])

    # One decode step's delta, copied synchronously (what naive/buffered/layerwise pay per step).
    caches = state["caches"]
    pos = jnp.full((args.batch,), args.prompt, jnp.int32)
    for mode in ("naive", "buffered", "layerwise"):
      def step_copy(mode=mode):
        for g, (a, _) in enumerate(groups):
          ablation.stream_token_step(mode, caches[g], pos, logs[g], layer_base=a)
      for log in logs:
        log.reset()
      step_copy()
      for log in logs:
        log.reset()
      token[mode] = median_time(step_copy, args.runs)
  return dict(prefill_s=base, totals_s=totals, prompt=prompt), token


def decode_overhead(cfg, args) -> dict:
  small = cfg.replace(num_layers=args.compute_layers)
  params = init_params(small, jax.random.key(2))
  prefill, decode = make_steps(small)
  b = args.batch
  log = log_for(small, small.num_layers, b, args.max_len)
  state = {}

  def fresh():
    c = init_cache_for(small, small.num_layers, b, args.max_len)
    c = c.replace(lengths=jnp.full((b,), args.prompt, jnp.int32))
    state["cache"] = c
    log.reset()

  def loop(stream: bool, streamer):
    def go():
      cache = state["cache"]
      tok = jnp.full((b,), 5, jnp.int32)
      tickets = []
      for s in range(args.decode_steps):
        pos = jnp.full((b,), args.prompt + s, jnp.int32)
        cache, logits = decode(params, cache, tok, pos)
        if stream:
          t0 = time.perf_counter()
          tickets.append(streamer.stream_step(cache, pos, log, key="decode"))
          state["submit"].append(time.perf_counter() - t0)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        tok.block_until_ready()   # A serving loop needs the token on the host every step.
      for t in tickets:
        t.wait()
      state["cache"] = cache
    return go

  state["submit"] = []
  with Streamer(num_threads=1) as streamer:
    fresh()
    loop(False, streamer)()
    fresh()
    loop(True, streamer)()
    plain, streamed = [], []
    for _ in range(args.decode_runs):   # Interleaved, so drifts in machine speed hit both alike.
      plain.append(median_time(loop(False, streamer), 1, setup=fresh))
      streamed.append(median_time(loop(True, streamer), 1, setup=fresh))
  p, s = statistics.median(plain), statistics.median(streamed)
  paired = statistics.median(b / a - 1.0 for a, b in zip(plain, streamed))
  return dict(steps=args.decode_steps, plain_s=p, streamed_s=s, step_s=p / args.decode_steps,
              overhead=s / p - 1.0, paired_overhead=paired,
              submit_s=statistics.median(state["submit"]))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="opt_1.3b")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--prompt", type=int, default=500)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--max_len", type=int, default=512)
  ap.add_argument("--compute_layers", type=int, default=2)
  ap.add_argument("--decode_steps", type=int, default=8)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--decode_runs", type=int, default=5)
  args = ap.parse_args()
  cfg = get_model_config(args.model, dtype=args.dtype)

  tr = transfer_only(cfg, args)
  print("transfer only:", json.dumps(tr), flush=True)
  comp, token = compute_ablation(cfg, args)
  print("ablation with compute:", json.dumps(comp), json.dumps(token), flush=True)
  dec = decode_overhead(cfg, args)
  print("decode:", json.dumps(dec), flush=True)
  # On the critical path a background step costs only its submit (gather dispatch + enqueue).
  token["background"] = dec["submit_s"]

  def entry(mode):
    return dict(prompt_stream_s=comp["prompt"][mode],
                prompt_speedup_vs_naive=comp["prompt"]["naive"] / max(comp["prompt"][mode], 1e-9),
                token_step_stream_s=token[mode],
                token_speedup_vs_naive=token["naive"] / max(token[mode], 1e-9))
  ablation_out = {m: entry(m) for m in ablation.MODES}
  result = dict(
      backend=jax.default_backend(), model=args.model, dtype=args.dtype, prompt=args.prompt,
      batch=args.batch, compute_layers=args.compute_layers, runs=args.runs,
      ablation=ablation_out, prefill_s=comp["prefill_s"],
      transfer_full_cache=dict(layers=cfg.num_layers, bytes=tr["bytes"], naive_s=tr["naive_s"],
                               buffered_s=tr["buffered_s"],
                               buffered_speedup=tr["buffered_speedup"]),
      flush_GBps=tr["flush_GBps"], memcpy_GBps=tr["memcpy_GBps"],
      flush_bw_fraction=tr["flush_bw_fraction"],
      decode_step_s=dec["step_s"], token_stream_overhead=dec["overhead"],
      token_stream_overhead_paired=dec["paired_overhead"], prompt_totals_s=comp["totals_s"])
  # Real transfers and compute on this machine's devices: every figure is measured.
  result["kind"] = {k: "measured" for k in ("ablation", "prefill_s", "transfer_full_cache",
                                            "flush_GBps", "memcpy_GBps", "flush_bw_fraction",
                                            "decode_step_s", "token_stream_overhead",
                                            "token_stream_overhead_paired", "prompt_totals_s")}
  print(json.dumps(result))


if __name__ == "__main__":
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  jaxcache.enable_compilation_cache()   # DEJAVU_JAX_CACHE_DIR=off times cold compiles
  main()
