"""The GPU check: every GPU figure the project needs, in one script, in one JSON line.

  python benchmarks/gpu_check.py                 # on a GPU: full sizes, <= 8 min
  python benchmarks/gpu_check.py --small=on      # the same code on tiny sizes (the CPU default)

Sections (every figure measured, i.e. timed on this machine's device):

0. link: one 256 MiB copy each way between host and device: host->device from a pinned
   (DMA-mapped, stream/hostmem.py) and a pageable array, device->host into the pinned_host memory
   kind and into numpy, and a host memcpy of the same size (the staging copy of the host paths).
1. decode: whole-model decode steps (one jitted loop of --steps steps, so per-step dispatch is not
   counted) of OPT-1.3B and SmolLM2-135M shaped models (random bfloat16 weights) at batch 1 and 8,
   context 512 of a 1024-position cache; the bytes a step must read (every weight once plus the
   K/V of the context) over the step time, against the device's memory bandwidth measured by a
   large on-device copy (`hbm_GBps`; null off a GPU, where "device memory" is host RAM).
2. ablation: the paper's streaming ablation (dejavu_jax/stream/ablation.py: naive / buffered /
   layerwise / background) on real device -> host copies (the transport's "auto" method: a
   pinned-host device_put on a GPU) at prompt 500 and 2000, batch 8, OPT-1.3B layers; the
   exposed streaming time of each mode after the prompt's compute, and one decode step's delta.
   Shared with benchmarks/streaming.py (its `compute_ablation` and `transfer_only`).
3. swap: one microbatch's cache swapped in by the swapping policy (runtime/swapping.py: host log
   -> used prefix -> the evicted device buffer) alone, one decode step alone, and the swap-in
   issued as a prefetch under the decode step; `hidden_fraction` = (step + swap - both) / swap.
4. pipeline: a 2-stage pipeline whose stages share the one device, serving the same requests
   with replication on (recovery "replica": every step's KV streamed to the successor's host
   memory) and off ("restart"), interleaved runs; `overhead` = off / on throughput - 1.

On a GPU the device is first kept busy for a few seconds (an idle GPU clocks down). --sections
runs a subset; --keep_going reports a failing section under "errors" and runs the rest;
--progress FILE appends each section's JSON as soon as it is done (for a run cut short).
--small=auto uses tiny configs on a CPU backend (the test does), full sizes elsewhere.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dejavu_jax.config import ServeConfig, get_model_config, tiny_config  # noqa: E402
from dejavu_jax.kv.cache import KVCache, init_cache_for  # noqa: E402
from dejavu_jax.models.decoder import param_shapes  # noqa: E402
from dejavu_jax.models.generate import make_decode_n, make_steps  # noqa: E402
from dejavu_jax.stream import hostmem, transport  # noqa: E402
from dejavu_jax.workload import Request  # noqa: E402
import streaming  # noqa: E402  benchmarks/streaming.py: the ablation's measurement, shared
from streaming import median_time  # noqa: E402


def sizes(small: bool) -> dict:
  """Every size the check uses; small: tiny configs that run in seconds on a CPU."""
  if small:
    return dict(
        dtype="float32",
        decode_models=[tiny_config(f, num_layers=2, max_positions=64) for f in ("opt", "llama")],
        batches=(1, 8), cache_len=64, context=32, steps=4, runs=3,
        ablation_model=tiny_config("opt", num_layers=2, max_positions=128), prompts=(10, 14),
        ablation_layers=2, ablation_runs=2,
        swap_model=tiny_config("llama", num_layers=2, max_positions=64), swap_batch=4, swap_len=64,
        swap_contexts=(16,), swap_runs=3,
        pipe_model=tiny_config("llama", num_layers=2, max_positions=64), pipe_batch=2, pipe_len=32,
        pipe_requests=4, pipe_prompt=8, pipe_new=4, pipe_runs=1,
        copy_bytes=8 << 20, link_bytes=1 << 20, warm_s=0.0)
  big = ("opt_1.3b", "smollm2_135m")
  return dict(
      dtype="bfloat16",
      decode_models=[get_model_config(m, dtype="bfloat16", max_positions=2048) for m in big],
      batches=(1, 8), cache_len=1024, context=512, steps=32, runs=5,
      ablation_model=get_model_config("opt_1.3b", dtype="bfloat16"), prompts=(500, 2000),
      ablation_layers=4, ablation_runs=3,
      swap_model=get_model_config("opt_1.3b", dtype="bfloat16", max_positions=2048),
      swap_batch=8, swap_len=2048, swap_contexts=(64, 512), swap_runs=5,
      pipe_model=get_model_config("smollm2_135m", dtype="bfloat16", max_positions=256),
      pipe_batch=8, pipe_len=256, pipe_requests=32, pipe_prompt=64, pipe_new=32, pipe_runs=3,
      copy_bytes=2 << 30, link_bytes=256 << 20, warm_s=3.0)


def random_params(cfg, seed: int = 0):
  """Random weights of the model's shapes, drawn on the device (nothing large crosses PCIe)."""
  shapes = param_shapes(cfg)
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [jax.jit(lambda k, s=s: (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(
      s.dtype))(k) for k, s in zip(keys, leaves)]
  return jax.block_until_ready(jax.tree.unflatten(tree, out))


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def device_bandwidth(nbytes_: int, runs: int = 5) -> float:
  """GB/s of an on-device elementwise copy (each byte read once and written once)."""
  x = jnp.zeros((nbytes_ // 4,), jnp.float32)
  f = jax.jit(lambda a: a + 1.0)
  jax.block_until_ready(f(x))
  t = median_time(lambda: jax.block_until_ready(f(x)), runs)
  return 2 * x.nbytes / t / 1e9


def warm_clocks(seconds: float) -> None:
  """Keeps the device busy for `seconds`: an idle GPU sits at a low clock and ramps up under
  load, so the first timed section would otherwise run slower than the ones after it."""
  x = jnp.zeros((64 << 20,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001 + 1.0)
  end = time.perf_counter() + seconds
  while time.perf_counter() < end:
    x = f(x)
    x.block_until_ready()


# ---- 0. the host<->device link, pinned and pageable ----
def link_bandwidth(sz: dict) -> dict:
  """GB/s of one `link_bytes` copy each way: host->device from a pinned (hostmem, DMA-mapped)
  and a pageable numpy array, device->host into the "pinned_host" memory kind (the transport's
  "auto" method on a GPU) and into numpy, and a host memcpy of the same size (the staging copy
  the swap and flush paths add on the host)."""
  dev = jax.devices()[0]
  n, runs = sz["link_bytes"], sz["runs"]
  mem = hostmem.policy(dev)
  pinned = mem.zeros((n // 4,), np.float32)
  pageable = np.zeros((n // 4,), np.float32)
  out = dict(bytes=n, host_memory_kind=mem.kind)
  for name, src in (("h2d_pinned", pinned), ("h2d_pageable", pageable)):
    jax.device_put(src, dev).block_until_ready()
    out[name + "_GBps"] = round(n / median_time(
        lambda src=src: jax.device_put(src, dev).block_until_ready(), runs) / 1e9, 3)
  x = jax.device_put(pageable, dev)
  kind = transport.host_memory_kind(dev)
  if kind == "pinned_host":
    to_host = jax.sharding.SingleDeviceSharding(dev, memory_kind=kind)
    jax.device_put(x, to_host).block_until_ready()
    out["d2h_pinned_kind_GBps"] = round(n / median_time(
        lambda: jax.device_put(x, to_host).block_until_ready(), runs) / 1e9, 3)
  else:
    out["d2h_pinned_kind_GBps"] = None
  out["d2h_numpy_GBps"] = round(n / median_time(lambda: np.asarray(x + 0), runs) / 1e9, 3)
  dst = np.empty_like(pageable)
  out["host_memcpy_GBps"] = round(n / median_time(lambda: np.copyto(dst, pageable), runs) / 1e9, 3)
  out["host_copy_threads"] = hostmem.copy_threads()
  out["host_copy_parallel_GBps"] = round(n / median_time(
      lambda: hostmem.copyto(dst, pageable), runs) / 1e9, 3)
  return out


# ---- 1. decode against the memory roofline ----
def decode_roofline(sz: dict, on_gpu: bool, hbm: float | None) -> list[dict]:
  rows = []
  for cfg in sz["decode_models"]:
    params = random_params(cfg)
    w = nbytes(params)
    loop = make_decode_n(cfg, sz["steps"])
    for b in sz["batches"]:
      ctx, s = sz["context"], sz["cache_len"]
      start = ctx - sz["steps"]   # the last step writes position ctx - 1: inside the context
      cache = init_cache_for(cfg, cfg.num_layers, b, s)
      cache = cache.replace(lengths=jnp.full((b,), start, jnp.int32))
      tok = jnp.full((b,), 5, jnp.int32)
      pos = jnp.full((b,), start, jnp.int32)
      key = jax.random.key(0)
      state = {"cache": cache}

      def run():
        state["cache"], new = loop(params, state["cache"], tok, pos, key, context=ctx)
        new.block_until_ready()
      run()   # compile
      step = median_time(run, sz["runs"]) / sz["steps"]
      kv = 2 * cfg.num_layers * b * ctx * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.jnp_dtype).itemsize
      gbps = (w + kv) / step / 1e9
      rows.append(dict(model=cfg.name, batch=b, context=ctx, cache_len=s,
                       step_ms=round(step * 1e3, 4), weight_bytes=int(w), kv_bytes=int(kv),
                       read_GBps=round(gbps, 2),
                       hbm_fraction=round(gbps / hbm, 3) if on_gpu and hbm else None))
    del params
  return rows


# ---- 2. the streaming ablation ----
def streaming_ablation(sz: dict) -> dict:

  from dejavu_jax.kv.buckets import bucket_length
  cfg = sz["ablation_model"]
  out = {}
  for prompt in sz["prompts"]:
    max_len = bucket_length(prompt + 1, 1 << 20)   # the decode step writes position `prompt`
    args = types.SimpleNamespace(batch=8, prompt=prompt, max_len=max_len,
                                 compute_layers=sz["ablation_layers"], runs=sz["ablation_runs"])
    comp, token = streaming.compute_ablation(cfg, args)
    tr = streaming.transfer_only(cfg.replace(num_layers=sz["ablation_layers"]), args)
    out[str(prompt)] = dict(
        prefill_s=comp["prefill_s"], prompt_stream_s=comp["prompt"],
        prompt_total_s=comp["totals_s"], token_step_stream_s=token,
        flush_GBps=round(tr["flush_GBps"], 3), memcpy_GBps=round(tr["memcpy_GBps"], 3),
        naive_over_buffered=round(tr["buffered_speedup"], 3))
  return out


# ---- 3. a swap-in under a decode step ----
def swap_overlap(sz: dict) -> list[dict]:
  from dejavu_jax.runtime.swapping import Swapping
  cfg, b, s = sz["swap_model"], sz["swap_batch"], sz["swap_len"]
  params = random_params(cfg, 1)
  _, decode = make_steps(cfg)
  rows = []
  for ctx in sz["swap_contexts"]:
    swap = Swapping(lambda: init_cache_for(cfg, cfg.num_layers, b, s), jax.device_put)
    try:
      k = jax.random.normal(jax.random.key(2), (cfg.num_layers, b, s, cfg.num_kv_heads,
                                                cfg.head_dim), jnp.float32).astype(cfg.jnp_dtype)
      for mb in range(3):   # three microbatches, two buffers: one always lives on the host
        swap.install(mb, KVCache(k=k + mb, v=k - mb, lengths=jnp.full((b,), ctx - 1, jnp.int32)))
      tok = jnp.full((b,), 5, jnp.int32)
      pos = np.full((b,), ctx - 1, np.int32)   # rewrites the same position: the context stays
      order = [0, 1, 2]

      def step(mb: int, nxt: int | None):
        cache = swap.get(mb)
        if nxt is not None:
          swap.prefetch(nxt, mb)
        cache, logits = decode(params, cache, tok, jnp.asarray(pos), context=ctx)
        logits.block_until_ready()
        swap.put(mb, cache)
        swap.commit(mb, "decode", pos, cache)

      def resident():
        return [mb for mb in order if swap._slot_of(mb) is not None]   # pylint: disable=protected-access

      def host_one():
        return next(mb for mb in order if swap._slot_of(mb) is None)   # pylint: disable=protected-access

      times = {"step": [], "swap": [], "both": []}
      for i in range(sz["swap_runs"] + 1):
        cur = resident()[0]
        t0 = time.perf_counter()
        step(cur, None)                                # the decode step alone
        t1 = time.perf_counter()
        swap._tickets[cur].wait()                      # pylint: disable=protected-access
        nxt = host_one()
        t2 = time.perf_counter()
        swap.prefetch(nxt, cur)                        # the swap-in alone
        swap.get(nxt)
        t3 = time.perf_counter()
        cur = nxt
        nxt = host_one()
        swap._tickets.get(cur) and swap._tickets[cur].wait()   # pylint: disable=protected-access
        t4 = time.perf_counter()
        step(cur, nxt)                                 # the swap-in issued under the step
        swap.get(nxt)
        t5 = time.perf_counter()
        if i:   # the first round compiles
          times["step"].append(t1 - t0)
          times["swap"].append(t3 - t2)
          times["both"].append(t5 - t4)
      med = {k: statistics.median(v) for k, v in times.items()}
      hidden = (med["step"] + med["swap"] - med["both"]) / med["swap"]
      rows.append(dict(model=cfg.name, batch=b, cache_len=s, context=ctx,
                       swap_in_bytes=int(swap.last_swap_in_bytes),
                       step_ms=round(med["step"] * 1e3, 3), swap_ms=round(med["swap"] * 1e3, 3),
                       both_ms=round(med["both"] * 1e3, 3),
                       swap_GBps=round(swap.last_swap_in_bytes / med["swap"] / 1e9, 3),
                       hidden_fraction=round(min(max(hidden, 0.0), 1.0), 3),
                       # the most that can hide is the shorter of the two: 1.0 = full overlap
                       overlap_of_possible=round(min(max(
                           (med["step"] + med["swap"] - med["both"])
                           / min(med["step"], med["swap"]), 0.0), 1.0), 3)))
    finally:
      swap.close()
  return rows


# ---- 4. a 2-stage pipeline on one device, replication on vs off ----
def pipeline_replication(sz: dict) -> dict:
  from dejavu_jax.serving.engine import PipelineEngine
  cfg = sz["pipe_model"]
  params = random_params(cfg, 3)
  dev = jax.devices()[0]
  prompt = tuple(range(3, 3 + sz["pipe_prompt"]))
  reqs = [Request(i, 0.0, prompt, sz["pipe_new"]) for i in range(sz["pipe_requests"])]
  engines = {}
  try:
    for rec in ("restart", "replica"):
      serve = ServeConfig(num_stages=2, microbatch_size=sz["pipe_batch"], max_len=sz["pipe_len"],
                          recovery=rec, mode="paper")
      engines[rec] = PipelineEngine(cfg, params, serve, devices=[dev, dev])
    tput = {k: [] for k in engines}
    tokens = {}
    for eng in engines.values():
      eng.serve(reqs[:sz["pipe_batch"] * 2])   # compile
    summary = {}
    for _ in range(sz["pipe_runs"]):
      for rec, eng in engines.items():
        res = eng.serve(reqs)
        tput[rec].append(res.summary["output_throughput"])
        tokens[rec] = res.tokens()
        summary[rec] = res.summary
  finally:
    for eng in engines.values():
      eng.close()
  off, on = (statistics.median(tput[k]) for k in ("restart", "replica"))
  return dict(model=cfg.name, stages=2, devices="one, shared", requests=len(reqs),
              tok_s_off=round(off, 2), tok_s_on=round(on, 2), overhead=round(off / on - 1.0, 4),
              tokens_identical=tokens["restart"] == tokens["replica"],
              host_memory_kind=summary["replica"].get("host_memory_kind"))


SECTIONS = ("link", "decode", "ablation", "swap", "pipeline")


def run(small: bool | None = None, sections: set[str] | None = None, keep_going: bool = False,
        progress: str | None = None) -> dict:
  """Every section (or those named in `sections`); small=None: tiny sizes on a CPU backend, full
  sizes elsewhere. keep_going: a section that raises is reported under "errors" (its figures
  null) and the others still run. progress: a file each section's result is appended to, one
  JSON line, as soon as it is done."""
  t0 = time.perf_counter()
  dev = jax.devices()[0]
  on_gpu = dev.platform == "gpu" or dev.platform == "cuda"
  small = (dev.platform == "cpu") if small is None else small
  sz = sizes(small)
  hbm = device_bandwidth(sz["copy_bytes"]) if on_gpu else None
  out = dict(backend=jax.default_backend(), device_kind=dev.device_kind, small=small,
             host_memory_kind=hostmem.policy(dev).kind, hbm_GBps=hbm and round(hbm, 1))
  out["section_s"] = {}
  out["errors"] = {}
  if on_gpu and sz["warm_s"]:
    warm_clocks(sz["warm_s"])
  for name, fn in (("link", lambda: link_bandwidth(sz)),
                   ("decode", lambda: decode_roofline(sz, on_gpu, hbm)),
                   ("ablation", lambda: streaming_ablation(sz)),
                   ("swap", lambda: swap_overlap(sz)),
                   ("pipeline", lambda: pipeline_replication(sz))):
    if sections is not None and name not in sections:
      continue
    t = time.perf_counter()
    try:
      out[name] = fn()
    except Exception as e:  # noqa: BLE001  GPU time comes in minutes: one broken section must
      if not keep_going:    # not cost the figures of the others (--keep_going)
        raise
      out[name] = None
      out["errors"][name] = "".join(traceback.format_exception(e))[-2000:]
    out["section_s"][name] = round(time.perf_counter() - t, 1)
    if progress:   # each section's figures as soon as they exist, for a run cut short
      with open(progress, "a", encoding="utf-8") as f:
        f.write(json.dumps({"section": name, "seconds": out["section_s"][name],
                            "result": out[name], "error": out["errors"].get(name)}) + "\n")
  out["wall_s"] = round(time.perf_counter() - t0, 1)
  out["load_average"] = round(os.getloadavg()[0], 2)
  out["kind"] = {k: "measured" for k in ("hbm_GBps", *SECTIONS, "section_s", "wall_s")}
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--small", choices=("auto", "on", "off"), default="auto",
                  help="tiny sizes (auto: on a CPU backend)")
  ap.add_argument("--sections", default=",".join(SECTIONS),
                  help="comma-separated subset of the sections to run")
  ap.add_argument("--keep_going", action="store_true",
                  help="report a failing section under 'errors' and run the rest")
  ap.add_argument("--progress", default=None,
                  help="append each section's result to this file as soon as it is done")
  args = ap.parse_args()
  small = {"auto": None, "on": True, "off": False}[args.small]
  sections = {x.strip() for x in args.sections.split(",") if x.strip()}
  unknown = sections - set(SECTIONS)
  if unknown:
    ap.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(SECTIONS)}")
  print(json.dumps(run(small, sections, args.keep_going, args.progress)))


if __name__ == "__main__":
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  jaxcache.quiet_logging()
  jaxcache.enable_compilation_cache()
  main()
