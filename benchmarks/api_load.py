"""Load from a standard client: the `openai` async client drives the OpenAI-compatible server
(dejavu_jax/server) with Poisson arrivals (dejavu_jax/workload.py), on loopback, bounded in
requests and time; then the same requests (same prompts, lengths and arrival times) go straight
into the engine's online mode in this process.

Prints ONE JSON line (all figures measured, medians over --repeats runs):
  client_*   vLLM-named metrics (metrics.summarize) from the client's clock: TTFT = first content
             chunk, TPOT = (latency - TTFT) / (tokens - 1), tokens from the usage chunk;
  engine_*   the engine's own summary of the same requests (POST /admin/summary);
  rel_diff_* (client - engine) / engine;
  inproc_*   the same workload submitted in-process (`engine.submit`, timed from the handles);
  server_overhead_*   what HTTP + JSON + SSE + the tokenizer add: client minus in-process, per
             output token (TPOT) and on the first token (TTFT), across two runs (noisy on a
             loaded machine);
  server_delay_*_token_ms   the same cost within ONE run: from the engine handing a request's
             first (last) token to its handle until the client holds the chunk carrying it
             (the server runs in this process, so both clocks are one perf_counter).

  python benchmarks/api_load.py                      # the real SmolLM2, 2 stages
  python benchmarks/api_load.py --rate 4 --num_requests 24 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from dejavu_jax import metrics as metrics_lib  # noqa: E402
from dejavu_jax import workload  # noqa: E402

KEYS = ("mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "output_throughput",
        "request_throughput", "mean_e2el_ms")


class _Rec:
  """A request seen from one side (the fields metrics.summarize reads)."""

  def __init__(self, arrival, prompt_len, first_token, finish, output_len):
    self.arrival, self.prompt_len = arrival, prompt_len
    self.first_token, self.finish, self.output_len = first_token, finish, output_len


def plan(args, tok, prompts):
  """(arrival s, message list, prompt ids, max_tokens) per request: Poisson arrivals and
  output lengths from the workload module, prompts cycled from data/prompts.txt."""
  reqs = workload.make_workload(workload.WorkloadConfig(
      rate=args.rate, num_requests=args.num_requests, prompt_len=8, output_len=args.output_len,
      vocab_size=64, seed=args.seed, max_output=args.max_tokens))
  out = []
  for i, r in enumerate(reqs):
    msgs = [{"role": "user", "content": prompts[i % len(prompts)]}]
    ids = tok.encode(tok.apply_chat_template(msgs))
    out.append((float(r.arrival), msgs, ids, int(r.max_new_tokens)))
  return out


async def http_run(url, model, jobs, max_time_s):
  import openai  # pylint: disable=g-import-not-at-top
  client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                              timeout=max_time_s)
  t0 = time.perf_counter()

  async def one(arrival, msgs, ids, n):
    await asyncio.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
    sent = time.perf_counter() - t0
    first = None
    rid, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=msgs, max_tokens=n, stream=True,
        stream_options={"include_usage": True})
    last = None
    async for ch in stream:
      rid = ch.id
      if ch.usage is not None:
        tokens = ch.usage.completion_tokens
      if first is None and ch.choices and ch.choices[0].delta.content:
        first = time.perf_counter() - t0
      if ch.choices and ch.choices[0].finish_reason is not None:
        last = time.perf_counter()   # the chunk after the last token's
    end = time.perf_counter() - t0
    rec = _Rec(sent, len(ids), first if first is not None else end, end, tokens)
    rec.first_abs, rec.last_abs = t0 + rec.first_token, last
    return rid, rec

  tasks = [asyncio.create_task(one(*j)) for j in jobs]
  done, pending = await asyncio.wait(tasks, timeout=max_time_s)
  for t in pending:
    t.cancel()
  results = [t.result() for t in done if not t.exception()]
  await client.close()
  return results, time.perf_counter() - t0


def inproc_run(engine, jobs, max_time_s):
  """The same jobs through engine.submit, timed from the handles (submission to hand-out)."""
  t0 = time.perf_counter()
  recs, lock = [], threading.Lock()

  def one(arrival, msgs, ids, n):
    time.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
    h = engine.submit(ids, n)
    list(h)
    if h.status == "finished" and h.token_times:
      with lock:
        recs.append(_Rec(h.submitted_at - t0, len(ids), h.token_times[0] - t0,
                         h.token_times[-1] - t0, len(h.tokens)))

  threads = [threading.Thread(target=one, args=j, daemon=True) for j in jobs]
  for t in threads:
    t.start()
  for t in threads:
    t.join(max(0.1, max_time_s - (time.perf_counter() - t0)))
  return recs, time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rate", type=float, default=2.0, help="requests/s (Poisson)")
  ap.add_argument("--num_requests", type=int, default=12)
  ap.add_argument("--output_len", default="lognormal:32,24", help="workload.py output_len spec")
  ap.add_argument("--max_tokens", type=int, default=48, help="cap on output lengths")
  ap.add_argument("--max_time_s", type=float, default=300.0, help="bound on each run")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--num_stages", type=int, default=2)
  ap.add_argument("--microbatch_size", type=int, default=4)
  ap.add_argument("--max_len", type=int, default=128)
  ap.add_argument("--prompts", default="data/prompts.txt")
  args = ap.parse_args()

  from configs import api_server  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models.tokenizer import read_prompts  # pylint: disable=g-import-not-at-top
  from dejavu_jax.server import app as app_lib, launch  # pylint: disable=g-import-not-at-top
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  jaxcache.enable_compilation_cache()
  jaxcache.quiet_logging()
  c = api_server.get_config()
  c.num_stages, c.microbatch_size, c.max_len = args.num_stages, args.microbatch_size, args.max_len
  c.port, c.max_pending = 0, None
  launch.validate(c)
  t = time.perf_counter()
  backend = launch.build_backend(c)
  print(f"model loaded, engine warm in {time.perf_counter() - t:.1f} s", file=sys.stderr)
  srv = launch.ServerThread(app_lib.create_app(backend)).start()
  handles = {}   # request id -> handle: when the engine handed out each token
  submit = backend.online.submit

  def keep(*a, **kw):
    h = submit(*a, **kw)
    handles[h.request_id] = h
    return h
  backend.online.submit = keep
  jobs = plan(args, backend.tokenizer, read_prompts(args.prompts))
  runs = []
  try:
    for rep in range(args.repeats):
      got, wall = asyncio.run(http_run(srv.url, c.model_id, jobs, args.max_time_s))
      ids = [rid for rid, _ in got]
      client = metrics_lib.summarize([r for _, r in got], duration=wall)
      engine = backend.summary([int(i.rsplit("-", 1)[1]) for i in ids])
      inproc_recs, inproc_wall = inproc_run(backend.engine, jobs, args.max_time_s)
      inproc = metrics_lib.summarize(inproc_recs, duration=inproc_wall)
      row = {"completed": len(got), "inproc_completed": len(inproc_recs)}
      for k in KEYS:
        row[f"client_{k}"], row[f"engine_{k}"], row[f"inproc_{k}"] = (client[k], engine[k],
                                                                       inproc[k])
        row[f"rel_diff_{k}"] = (client[k] - engine[k]) / engine[k] if engine[k] else None
      row["server_overhead_tpot_ms"] = client["mean_tpot_ms"] - inproc["mean_tpot_ms"]
      row["server_overhead_ttft_ms"] = client["mean_ttft_ms"] - inproc["mean_ttft_ms"]
      first_d, last_d = [], []
      for rid, rec in got:
        h = handles.get(int(rid.rsplit("-", 1)[1]))
        if h is not None and h.token_times:
          first_d.append(1e3 * (rec.first_abs - h.token_times[0]))
          if rec.last_abs is not None:
            last_d.append(1e3 * (rec.last_abs - h.token_times[-1]))
      row["server_delay_first_token_ms"] = float(np.median(first_d)) if first_d else None
      row["server_delay_last_token_ms"] = float(np.median(last_d)) if last_d else None
      runs.append(row)
      print(f"run {rep + 1}/{args.repeats}: {json.dumps(row)}", file=sys.stderr)
  finally:
    srv.stop()
    backend.engine.close()
  out = {"benchmark": "api_load", "model": c.model_id, "num_stages": args.num_stages,
         "rate": args.rate, "num_requests": args.num_requests, "repeats": args.repeats,
         "load_average_1m": os.getloadavg()[0]}
  for k in runs[0]:
    vals = [r[k] for r in runs if r[k] is not None]
    out[k] = float(np.median(vals)) if vals else None
  # Which figures are measured: every one (timed on this machine, nothing modelled).
  out["kind"] = {k: "measured" for k in runs[0]}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
