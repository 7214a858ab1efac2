"""The OpenAI-compatible server (dejavu_jax/server) on the real SmolLM2-135M-Instruct, local
runtime, one server for the module (uvicorn in a thread, on a free loopback port): the `openai`
client streams a chat completion that names Paris; a stream survives a stage kill with the text
of the failure-free run and no error event, and the log names the kill, detection and resume;
every bad input gets its status and names its field; a full queue is a 429 with Retry-After; a
client that disconnects frees its slot. A Ray variant of the kill is marked slow."""

import asyncio
import json
import logging

import httpx
import pytest

from dejavu_jax.server import app as app_lib
from dejavu_jax.server import launch
from dejavu_jax.studies import runconfig

openai = pytest.importorskip("openai")

MODEL = "smollm2-135m-instruct"
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]


def _config(**kw):
  from configs import api_server  # pylint: disable=g-import-not-at-top
  c = api_server.get_config()
  # Small and lazy: every test prompt is a chat prompt of 37-38 tokens and max_len is 64, so one
  # prefill and one decode program per stage are compiled, on first use (warmup off; the
  # watchdog must not take a stage compiling on a loaded machine for a hung one).
  base = dict(max_len=64, microbatch_size=2, max_pending=1, warmup=False, recovery="replica",
              heartbeat_s=0.05, heartbeat_timeout_s=1.0, progress_timeout_s=600.0, port=0)
  for k, v in {**base, **kw}.items():
    c[k] = v
  runconfig.check_known_fields(c)
  return c


@pytest.fixture(scope="module")
def server():
  backend = launch.build_backend(_config())
  srv = launch.ServerThread(app_lib.create_app(backend)).start()
  yield srv, backend
  srv.stop()
  backend.engine.close()


def _client(srv):
  return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def _stream_chat(srv, messages, max_tokens, on_chunk=None):
  """The streamed text, the chunks, the usage."""
  stream = _client(srv).chat.completions.create(
      model=MODEL, messages=messages, max_tokens=max_tokens, stream=True,
      stream_options={"include_usage": True})
  text, chunks, use = "", [], None
  for ch in stream:
    chunks.append(ch)
    if ch.usage is not None:
      use = ch.usage
    for c in ch.choices:
      text += c.delta.content or ""
      if on_chunk is not None:
        on_chunk(len(chunks))
  return text, chunks, use


@pytest.mark.timeout(300)
def test_openai_client_streams_paris(server):
  srv, _ = server
  text, chunks, use = _stream_chat(
      srv, [{"role": "user", "content": "What is the capital of France?"}], 20)
  assert "Paris" in text, text
  assert chunks[-1].choices == [] and use.completion_tokens >= 1   # the usage chunk, last
  assert chunks[-2].choices[0].finish_reason in ("stop", "length")
  assert [m.id for m in _client(srv).models.list().data] == [MODEL]
  assert httpx.get(srv.url + "/health").json()["status"] == "ok"


@pytest.mark.timeout(300)
def test_stream_survives_a_stage_kill(server, caplog):
  srv, backend = server
  ref = _client(srv).chat.completions.create(model=MODEL, messages=POEM, max_tokens=24)
  ref_text = ref.choices[0].message.content
  assert ref.usage.completion_tokens >= 10   # long enough to be killed in the middle

  def kill_at_third(n):
    if n == 3:
      r = httpx.post(srv.url + "/admin/kill", json={"stage": 1})
      assert r.status_code == 200, r.text

  with caplog.at_level(logging.WARNING, logger="dejavu_jax.online"):
    text, chunks, use = _stream_chat(srv, POEM, 24, on_chunk=kill_at_third)
  assert text == ref_text
  assert use.completion_tokens == ref.usage.completion_tokens
  assert all(getattr(c, "error", None) is None for c in chunks)
  log = caplog.text
  assert "kill: stage 1 killed" in log and "detected: stage(s) [1]" in log and "resumed:" in log
  metrics = httpx.get(srv.url + "/metrics").text
  assert 'dejavu_recovered_microbatches_total{strategy="replica"}' in metrics
  assert "dejavu_failures_total 1\n" in metrics   # the kill, and no false alarm before it
  assert "dejavu_time_to_first_token_seconds_count" in metrics


def _poem_ids(server):
  """The poem's chat prompt as token ids (a completion prompt in the same bucket)."""
  tok = server[1].tokenizer
  return tok.encode(tok.apply_chat_template(POEM))


def _post(srv, path, body, raw=None):
  return httpx.post(srv.url + path, content=raw if raw is not None else json.dumps(body),
                    headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.timeout(120)
def test_bad_inputs_name_their_field(server):
  srv, _ = server
  chat = "/v1/chat/completions"
  cases = [
      (_post(srv, chat, None, raw=b"{not json"), 400, None, "invalid_json"),
      (_post(srv, chat, {"model": MODEL}), 400, "messages", "invalid_type"),
      (_post(srv, chat, {"model": "gpt-9", "messages": POEM}), 404, "model", "model_not_found"),
      (_post(srv, chat, {"model": MODEL, "messages": POEM, "max_tokens": 0}), 400, "max_tokens",
       "invalid_value"),
      (_post(srv, chat, {"model": MODEL, "messages": POEM, "max_tokens": 500}), 400,
       "max_tokens", "context_length_exceeded"),
      (_post(srv, "/v1/completions", {"model": MODEL, "prompt": [5] * 64}), 400, "prompt",
       "context_length_exceeded"),
      (_post(srv, chat, {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400,
       "messages[0].role", "invalid_value"),
  ]
  for r, status, param, code in cases:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code and err["message"], err
    if param:
      assert param.split("[")[0] in err["message"] or param == "model", err
  # The server still serves (a plain completion, not streamed).
  ok = _post(srv, "/v1/completions", {"model": MODEL, "prompt": _poem_ids(server), "max_tokens": 3})
  assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


@pytest.mark.timeout(120)
def test_full_queue_is_429_with_retry_after(server):
  srv, _ = server

  async def burst():
    async with httpx.AsyncClient(timeout=60) as client:
      body = {"model": MODEL, "prompt": _poem_ids(server), "max_tokens": 6}
      return await asyncio.gather(*[client.post(srv.url + "/v1/completions", json=body)
                                    for _ in range(8)])

  rs = asyncio.run(burst())
  codes = sorted(r.status_code for r in rs)
  # 2 microbatch slots and max_pending 1: eight at once cannot all be admitted.
  assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
  for r in rs:
    if r.status_code == 429:
      assert r.headers["Retry-After"] == "1"
      assert r.json()["error"]["code"] == "queue_full"
    else:
      assert r.json()["usage"]["completion_tokens"] == 6


@pytest.mark.timeout(120)
def test_disconnect_cancels_and_frees_the_slot(server):
  srv, backend = server
  before = backend.online.counts["cancelled"]
  body = {"model": MODEL, "messages": POEM, "max_tokens": 26, "stream": True}
  with httpx.Client(timeout=60) as client:
    with client.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
      assert r.status_code == 200
      lines = r.iter_lines()
      got = [next(lines) for _ in range(6)]   # a few chunks: it is running
      assert any(g.startswith("data: ") for g in got)
      assert backend.counts()["running"] == 1
  # Closed mid-stream: the request is cancelled and its microbatch leaves the pipeline.
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + 20
  while time.monotonic() < deadline:
    c = backend.counts()
    if c["running"] == 0 and c["in_flight_microbatches"] == 0:
      break
    time.sleep(0.05)
  assert backend.counts() == {"pending": 0, "running": 0, "in_flight_microbatches": 0}
  assert backend.online.counts["cancelled"] == before + 1
  assert httpx.get(srv.url + "/health").json()["status"] == "ok"


@pytest.mark.timeout(60)
def test_api_key(server):
  from fastapi.testclient import TestClient  # pylint: disable=g-import-not-at-top
  _, backend = server
  client = TestClient(app_lib.create_app(backend, api_key="sesame"))
  r = client.get("/v1/models")
  assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
  assert client.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stream_survives_a_sigkill_on_ray():
  ray = pytest.importorskip("ray")
  from tests.ray_util import checked_shutdown  # pylint: disable=g-import-not-at-top
  with checked_shutdown(ray.shutdown):   # and no Ray process left behind
    _kill_on_ray()


def _kill_on_ray():
  backend = launch.build_backend(_config(runtime="ray", max_pending=8))
  srv = launch.ServerThread(app_lib.create_app(backend)).start()
  try:
    ref = _client(srv).chat.completions.create(model=MODEL, messages=POEM, max_tokens=24)

    def kill_at_third(n):
      if n == 3:
        assert httpx.post(srv.url + "/admin/kill", json={"stage": 1}).status_code == 200

    text, _, use = _stream_chat(srv, POEM, 24, on_chunk=kill_at_third)
    assert text == ref.choices[0].message.content
    assert use.completion_tokens == ref.usage.completion_tokens
    assert backend.engine.runtime.kills, "no process was SIGKILLed"
  finally:
    srv.stop()
    backend.engine.close()
