"""The HTTP server: an OpenAI-compatible ASGI app (FastAPI) over an engine in online mode.

`Backend` is what is served: the started engine (serving/online.py), the tokenizer and its chat
template, the model id, the context. `create_app(backend, api_key)` routes:

  POST /v1/completions, /v1/chat/completions   stream=true: server-sent events, one chunk per
        sampled token batch (empty text deltas skipped), a final chunk with finish_reason, a
        usage chunk with stream_options.include_usage, then `data: [DONE]`; else one JSON body
  GET  /v1/models, /health (503 once the engine stopped), /metrics (Prometheus text)
  POST /admin/kill {"stage": s}     crashes a stage now (a SIGKILL on Ray); clients keep streaming
        (data-parallel engine: {"stage": s, "replica": r}, replica 0 by default)
  POST /admin/summary {"ids": [...]}  the engine's own metrics summary over those responses' ids

The engine is one pipeline (`PipelineEngine`) or R replicas behind a router
(`DataParallelEngine`, serving/dataparallel.py): its `online` run submits, kills and is read the
same way; the counts, /metrics and summaries add up the replicas (a request that a replica lost
for good is served by another, its stream unchanged).

Errors are OpenAI error objects naming the field (protocol.py). A full queue is 429 with
Retry-After. The request is submitted only after its body checked out; a streaming response
starts once the engine admitted it (so a queue-full rejection is still a 429); a client that
disconnects cancels its request (its slot frees at the next step). With an API key every route
but /health wants `Authorization: Bearer <key>`.
"""


import asyncio
import collections
import hmac
import logging
import math
import time
import types

from dejavu_jax import metrics as metrics_lib
from dejavu_jax.serving.online import FINAL
from dejavu_jax.serving.result import record
from dejavu_jax.server import protocol
from dejavu_jax.server.prom import prometheus_text

log = logging.getLogger("dejavu_jax.server")


class Backend:
  """The served model: a started engine (online), its tokenizer and context."""

  def __init__(self, engine, tokenizer, model_id: str, default_max_tokens: int = 256,
               retry_after_s: int = 1):
    self.engine, self.tokenizer, self.model_id = engine, tokenizer, model_id
    self.max_len = engine.serve_cfg.topology.max_len
    self.temperature = float(engine.serve_cfg.sampling.temperature)
    self.eos_token_id = engine.serve_cfg.sampling.eos_token_id
    self.vocab_size = engine.cfg.vocab_size
    self.default_max_tokens = default_max_tokens
    self.retry_after_s = retry_after_s
    self.created = int(time.time())

  @property
  def online(self):
    return self.engine.online

  @property
  def replicas(self) -> int:
    """1, or the data-parallel engine's replica count."""
    return len(getattr(self.engine, "replicas", ())) or 1

  def _each(self, fn):
    """fn(engine, state) on the loop thread of every replica (one engine: its one loop)."""
    loop = self.online
    if hasattr(loop, "call_each"):
      return loop.call_each(fn, timeout=10)
    return [loop.call(fn, timeout=10)]

  def counts(self) -> dict:
    """Queue depth, requests in flight, microbatches in flight (read on the loop thread(s),
    summed over the replicas)."""
    out: dict = {}
    for part in self._each(lambda engine, st: _counts(st)):
      for k, v in part.items():
        out[k] = out.get(k, 0) + v
    return out

  def metrics_text(self) -> str:
    """The /metrics page, its figures read on the loop thread(s) (their counters move under them
    otherwise), summed over the replicas."""
    loop = self.online
    if not hasattr(loop, "call_each"):
      return loop.call(lambda engine, st: prometheus_text(loop, _counts(st)), timeout=10)
    parts = [loop.loops[i].call(lambda engine, st, i=i: _figures(loop.loops[i], st), timeout=10)
             for i in range(len(loop.loops))]
    merged = types.SimpleNamespace(counts=collections.Counter(), ttft_s=[], tpot_s=[],
                                   tokens_out=0, token_log=[])
    counts: dict = {}
    for fig, cnt in parts:
      merged.counts.update(fig.counts)
      merged.ttft_s += fig.ttft_s
      merged.tpot_s += fig.tpot_s
      merged.tokens_out += fig.tokens_out
      merged.token_log += fig.token_log
      for k, v in cnt.items():
        counts[k] = counts.get(k, 0) + v
    return prometheus_text(merged, counts) + (
        "# HELP dejavu_rerouted_requests_total Requests resubmitted to another replica.\n"
        "# TYPE dejavu_rerouted_requests_total counter\n"
        f"dejavu_rerouted_requests_total {loop.rerouted}\n"
        "# HELP dejavu_live_replicas Replicas whose loop is serving.\n"
        "# TYPE dejavu_live_replicas gauge\n"
        f"dejavu_live_replicas {len(loop.live())}\n")

  def summary(self, request_ids) -> dict:
    """The engine's summary (metrics.summarize) over the finished requests `request_ids`."""
    loop = self.online
    if hasattr(loop, "where"):   # data-parallel: each id's current attempt, per replica
      by_replica: dict = {}
      for rid in request_ids:
        at = loop.where(rid)
        if at is not None:
          by_replica.setdefault(at[0], set()).add(at[1])
      recs = []
      for r, local in by_replica.items():
        recs += loop.loops[r].call(lambda engine, st, ids=local: _records(st, ids), timeout=10)
    else:
      ids = set(request_ids)
      recs = loop.call(lambda engine, st: _records(st, ids), timeout=10)
    return metrics_lib.summarize(recs) if recs else {"num_requests": 0}


def _records(st, ids) -> list:
  return [record(s) for rid, s in st.sched.states.items() if rid in ids and s.done]


def _figures(loop, st):
  """A copy of one online loop's live figures and counts (on its thread)."""
  return types.SimpleNamespace(counts=collections.Counter(loop.counts), ttft_s=list(loop.ttft_s),
                               tpot_s=list(loop.tpot_s), tokens_out=loop.tokens_out,
                               token_log=list(loop.token_log)), _counts(st)


def _counts(st) -> dict:
  sched = st.sched
  running = sum(int((~mb.done[:len(mb.requests)]).sum()) for mb in sched.in_flight.values())
  return {"pending": len(sched.pending), "running": running,
          "in_flight_microbatches": len(sched.in_flight)}


def _request_id(rid: str) -> int:
  return int(rid.rsplit("-", 1)[1])


def create_app(backend: Backend, api_key: str | None = None):
  # FastAPI reads the handlers' annotations at run time: this module has no postponed
  # annotations, so `request: Request` resolves to the local import below.
  from fastapi import FastAPI, Request  # pylint: disable=g-import-not-at-top
  from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse  # pylint: disable=g-import-not-at-top

  app = FastAPI(title="dejavu_jax", docs_url=None, redoc_url=None, openapi_url=None)

  @app.exception_handler(protocol.ApiError)
  async def _api_error(_, e: protocol.ApiError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

  def _auth(request: Request) -> None:
    if api_key is None:
      return
    got = request.headers.get("authorization", "")
    if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
      raise protocol.ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                              None, "invalid_api_key")

  def _running():
    loop = backend.online
    if loop is None or not loop.running:
      raise protocol.ApiError(503, "the engine is not serving", None, "engine_down",
                              "server_error")
    return loop

  @app.get("/health")
  async def health():
    loop = backend.online
    if loop is None or not loop.running:
      return JSONResponse({"status": "down", "error": getattr(loop, "error", None)}, 503)
    return {"status": "ok", **await asyncio.to_thread(backend.counts)}

  @app.get("/v1/models")
  async def models(request: Request):
    _auth(request)
    return {"object": "list", "data": [{"id": backend.model_id, "object": "model",
                                        "created": backend.created, "owned_by": "dejavu_jax",
                                        "max_model_len": backend.max_len}]}

  @app.get("/metrics")
  async def metrics(request: Request):
    _auth(request)
    _running()
    return PlainTextResponse(await asyncio.to_thread(backend.metrics_text),
                             media_type="text/plain; version=0.0.4")

  @app.post("/admin/kill")
  async def kill(request: Request):
    _auth(request)
    body = protocol.parse_json(await request.body())
    stage, replica = body.get("stage"), body.get("replica", 0)
    d = backend.engine.plan.num_stages + getattr(backend.engine.prompt_path, "Dp", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < d:
      raise protocol.ApiError(400, f"stage must be an integer in 0..{d - 1}, got {stage!r}",
                              "stage", "invalid_value")
    n = backend.replicas
    if isinstance(replica, bool) or not isinstance(replica, int) or not 0 <= replica < n:
      raise protocol.ApiError(400, f"replica must be an integer in 0..{n - 1} (the engine has "
                              f"{n} replica{'s' if n > 1 else ''}), got {replica!r}", "replica",
                              "invalid_value")
    loop = _running()
    if n > 1:
      await asyncio.to_thread(loop.kill, stage, replica)
      return {"killed": stage, "replica": replica}
    await asyncio.to_thread(loop.kill, stage)
    return {"killed": stage}

  @app.post("/admin/summary")
  async def summary(request: Request):
    _auth(request)
    body = protocol.parse_json(await request.body())
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and "-" in i for i in ids):
      raise protocol.ApiError(400, "ids must be a list of response ids", "ids", "invalid_type")
    try:
      nums = [_request_id(i) for i in ids]
    except ValueError:
      raise protocol.ApiError(400, "ids must be response ids like 'chatcmpl-12'", "ids",
                              "invalid_value") from None
    _running()
    out = await asyncio.to_thread(backend.summary, nums)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()}

  async def _complete(request: Request, kind: str):
    _auth(request)
    job = protocol.parse_job(protocol.parse_json(await request.body()), kind, backend)
    loop = _running()
    aloop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    handle = loop.submit(job.prompt_ids, job.max_tokens)
    handle.subscribe(lambda k, v: aloop.call_soon_threadsafe(events.put_nowait, (k, v)))
    # Until the engine admitted it: a queue-full rejection is still an HTTP status.
    pending_tokens, ended = [], []
    while True:
      k, v = await events.get()
      if k == "tokens":
        pending_tokens.extend(v)
        continue
      if v in FINAL:   # it may end before the response starts (a short one, a loaded host)
        ended.append(v)
      if v != "queued":
        break
    if handle.status == "rejected":
      if "queue full" in (handle.reason or ""):
        raise protocol.ApiError(429, f"the server is at capacity ({handle.reason}); retry later",
                                None, "queue_full", "rate_limit_error",
                                {"Retry-After": str(backend.retry_after_s)})
      if "not serving" in (handle.reason or ""):
        raise protocol.ApiError(503, handle.reason, None, "engine_down", "server_error")
      raise protocol.ApiError(400, handle.reason or "rejected", job.echo_param, "invalid_value")
    if handle.status == "error":
      raise protocol.ApiError(503, f"the engine stopped: {handle.reason}", None, "engine_down",
                              "server_error")
    rid = protocol.response_id(job, handle.request_id)
    text = protocol.TextStream(backend.tokenizer)

    async def next_event():
      if pending_tokens:
        out = ("tokens", list(pending_tokens))
        pending_tokens.clear()
        return out
      if ended:
        return ("status", ended[0])
      return await events.get()

    if not job.stream:
      try:
        while not handle.done:
          try:
            await asyncio.wait_for(events.get(), timeout=0.25)
          except asyncio.TimeoutError:
            if await request.is_disconnected():
              handle.cancel()
              log.info("%s: client disconnected, cancelled", rid)
              return JSONResponse({}, 499)
      finally:
        if not handle.done:
          handle.cancel()
      if handle.status != "finished":
        raise protocol.ApiError(503, f"the request ended {handle.status}: {handle.reason}",
                                None, "engine_down", "server_error")
      toks = list(handle.tokens)
      return protocol.full_response(job, rid, backend.tokenizer.decode(toks),
                                    protocol.finish_reason(toks, backend.eos_token_id),
                                    len(toks))

    async def stream():
      created = int(time.time())
      finished = False
      try:
        if job.kind == "chat":
          yield protocol.sse(protocol.chunk(job, rid, created, "", role=True))
        while True:
          k, v = await next_event()
          if k == "tokens":
            delta = text.add(v)
            if delta:
              yield protocol.sse(protocol.chunk(job, rid, created, delta))
            continue
          if v in FINAL:
            break
        if handle.status != "finished":
          # The engine stopped under this stream: an error event, as OpenAI servers send.
          err = protocol.ApiError(503, f"the request ended {handle.status}: {handle.reason}",
                                  None, "engine_down", "server_error")
          yield protocol.sse(err.body())
          yield b"data: [DONE]\n\n"
          return
        tail = text.flush()
        toks = list(handle.tokens)
        yield protocol.sse(protocol.chunk(job, rid, created, tail or None,
                                          protocol.finish_reason(toks, backend.eos_token_id)))
        if job.include_usage:
          yield protocol.sse(protocol.usage_chunk(job, rid, created, len(toks)))
        yield b"data: [DONE]\n\n"
        finished = True
      finally:
        if not finished and not handle.done:
          handle.cancel()   # the client went away: its slot frees at the next step
          log.info("%s: client disconnected after %d tokens, cancelled", rid, len(handle.tokens))

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

  @app.post("/v1/chat/completions")
  async def chat(request: Request):
    return await _complete(request, "chat")

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await _complete(request, "completion")

  return app
