"""The OpenAI API as this server reads and writes it: request bodies checked field by field into
a `Job` (token ids, max_tokens, stream options), errors as OpenAI error objects naming the
field, and the response / chunk bodies. No web framework here: app.py does the HTTP."""

from __future__ import annotations

import dataclasses
import json
import numbers
import time


class ApiError(Exception):
  """An HTTP error with the OpenAI error object {"error": {message, type, param, code}}."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, type_: str = "invalid_request_error",
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = (status, message, param, code,
                                                                   type_)
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass
class Job:
  kind: str                  # "chat" | "completion"
  prompt_ids: list
  max_tokens: int
  stream: bool
  include_usage: bool
  model: str
  echo_param: str            # the field holding the prompt ("messages" or "prompt")


def parse_json(raw: bytes) -> dict:
  try:
    body = json.loads(raw or b"")
  except (ValueError, UnicodeDecodeError) as e:
    raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
  if not isinstance(body, dict):
    raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                   None, "invalid_body")
  return body


def _int_field(body: dict, name: str, default):
  v = body.get(name, default)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, numbers.Integral):
    raise ApiError(400, f"{name} must be an integer, got {v!r}", name, "invalid_type")
  return int(v)


def _bool_field(body: dict, name: str) -> bool:
  v = body.get(name, False)
  if v is None:
    return False
  if not isinstance(v, bool):
    raise ApiError(400, f"{name} must be a boolean, got {v!r}", name, "invalid_type")
  return v


def parse_job(body: dict, kind: str, backend) -> Job:
  """The job of a /v1/chat/completions ("chat") or /v1/completions body, checked against the
  served model (`backend`: model_id, tokenizer, max_len, temperature, default_max_tokens)."""
  model = body.get("model")
  if not isinstance(model, str) or not model:
    raise ApiError(400, f"model must be a non-empty string, got {model!r}", "model",
                   "invalid_type")
  if model != backend.model_id:
    raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                   f"{backend.model_id!r} (GET /v1/models)", "model", "model_not_found")
  tok = backend.tokenizer
  if kind == "chat":
    param = "messages"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
      raise ApiError(400, f"messages must be a non-empty list of {{role, content}} objects, got "
                     f"{type(msgs).__name__}", "messages", "invalid_type")
    clean = []
    for i, m in enumerate(msgs):
      if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
        raise ApiError(400, f"messages[{i}] must be an object with role system, user or "
                       f"assistant, got {m!r}"[:300], f"messages[{i}].role", "invalid_value")
      content = m.get("content")
      if isinstance(content, list):   # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and
                   isinstance(p.get("text"), str) for p in content):
          raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                         f"messages[{i}].content", "invalid_value")
        content = "".join(p["text"] for p in content)
      if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string, got {content!r}"[:300],
                       f"messages[{i}].content", "invalid_type")
      clean.append({"role": m["role"], "content": content})
    ids = tok.encode(tok.apply_chat_template(clean))
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else \
        "max_tokens"
    default = None
  else:
    param = "prompt"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
      prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
      ids = tok.encode(prompt)
    elif (isinstance(prompt, list) and prompt and
          all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
      ids = list(prompt)
      bad = [t for t in ids if not 0 <= t < backend.vocab_size]
      if bad:
        raise ApiError(400, f"prompt: token id {bad[0]} outside the vocabulary "
                       f"[0, {backend.vocab_size})", "prompt", "invalid_value")
    else:
      raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt "
                     f"per request), got {prompt!r}"[:300], "prompt", "invalid_type")
    max_field, default = "max_tokens", 16   # the OpenAI default for completions
  room = backend.max_len - len(ids)
  if room < 1:
    raise ApiError(400, f"{param}: the prompt is {len(ids)} tokens, the context is "
                   f"{backend.max_len} tokens; no room for a completion", param,
                   "context_length_exceeded")
  max_tokens = _int_field(body, max_field, default)
  if max_tokens is None:   # chat without a limit: the rest of the context, capped
    max_tokens = min(room, backend.default_max_tokens)
  if max_tokens <= 0:
    raise ApiError(400, f"{max_field} must be >= 1, got {max_tokens}", max_field,
                   "invalid_value")
  if len(ids) + max_tokens > backend.max_len:
    raise ApiError(400, f"{param} ({len(ids)} tokens) + {max_field} ({max_tokens}) exceed the "
                   f"context of {backend.max_len} tokens; ask for at most {room} tokens",
                   max_field, "context_length_exceeded")
  n = _int_field(body, "n", 1)
  if n != 1:
    raise ApiError(400, f"n must be 1 (one choice per request), got {n}", "n", "invalid_value")
  temp = body.get("temperature")
  if temp is not None and (not isinstance(temp, numbers.Real) or isinstance(temp, bool) or
                           float(temp) != backend.temperature):
    raise ApiError(400, f"temperature: this server samples every request with the engine's "
                   f"temperature {backend.temperature:g}; omit it or pass that value, got "
                   f"{temp!r}", "temperature", "unsupported_value")
  if body.get("stop"):
    raise ApiError(400, "stop sequences are not supported (the engine stops at the model's "
                   "end-of-turn token or max_tokens)", "stop", "unsupported_parameter")
  stream = _bool_field(body, "stream")
  opts = body.get("stream_options")
  if opts is not None and not isinstance(opts, dict):
    raise ApiError(400, f"stream_options must be an object, got {opts!r}", "stream_options",
                   "invalid_type")
  include_usage = bool((opts or {}).get("include_usage", False))
  if include_usage and not stream:
    raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options",
                   "invalid_value")
  return Job(kind, ids, max_tokens, stream, include_usage, model, param)


def finish_reason(tokens, eos_token_id) -> str:
  return "stop" if tokens and tokens[-1] == eos_token_id else "length"


def usage(job: Job, n: int) -> dict:
  return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n,
          "total_tokens": len(job.prompt_ids) + n}


def response_id(job: Job, request_id: int) -> str:
  return f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{request_id}"


def chunk(job: Job, rid: str, created: int, text: str | None, reason: str | None = None,
          role: bool = False) -> dict:
  """One streamed chunk (chat.completion.chunk or text_completion)."""
  if job.kind == "chat":
    delta = {}
    if role:
      delta["role"] = "assistant"
    if text is not None:
      delta["content"] = text
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    obj = "chat.completion.chunk"
  else:
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    obj = "text_completion"
  return {"id": rid, "object": obj, "created": created, "model": job.model, "choices": [choice]}


def usage_chunk(job: Job, rid: str, created: int, n: int) -> dict:
  obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
  return {"id": rid, "object": obj, "created": created, "model": job.model, "choices": [],
          "usage": usage(job, n)}


def full_response(job: Job, rid: str, text: str, reason: str, n: int) -> dict:
  created = int(time.time())
  if job.kind == "chat":
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "logprobs": None, "finish_reason": reason}
    obj = "chat.completion"
  else:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    obj = "text_completion"
  return {"id": rid, "object": obj, "created": created, "model": job.model,
          "choices": [choice], "usage": usage(job, n)}


def sse(obj) -> bytes:
  return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class TextStream:
  """Token ids in, text deltas out: decodes the whole sequence each time and holds back a tail
  that ends in an incomplete UTF-8 character (shown as U+FFFD until its last byte comes)."""

  def __init__(self, tok):
    self.tok, self.ids, self.sent = tok, [], ""

  def add(self, ids) -> str:
    self.ids.extend(ids)
    text = self.tok.decode(self.ids)
    if text.endswith("\ufffd"):
      return ""
    delta, self.sent = text[len(self.sent):], text
    return delta

  def flush(self) -> str:
    text = self.tok.decode(self.ids)
    delta, self.sent = text[len(self.sent):], text
    return delta
