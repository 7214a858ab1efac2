"""Per-request records, the metrics summary, its JSONL files, its table and its latency plot.

This module owns what every serving experiment reports, for the real engine and (through
`summarize`'s duck typing) for the simulator:

* `RequestRecord`: one request's times (seconds on one clock): arrival, first token, finish, and
  optionally every token's time; the tokens generated; the tokens a recovery recomputed.
* `summarize`: throughput, TTFT, TPOT, ITL, end-to-end latency and the paper's normalized latency
  (end-to-end latency / generated tokens, s/token) over the *finished* requests; the others are
  counted in `num_unfinished` and left out of every other number.
* `write_jsonl` / `read_jsonl`, `dumps` (valid JSON: a NaN or infinite number, e.g. the latency
  of a run where nothing finished, is written as null), `format_summary`.

Metric names follow vLLM's `benchmark_serving.py` where the quantity is the same (`duration`,
`completed`, `request_throughput`, `output_throughput`, `mean_ttft_ms`, `median_ttft_ms`,
`p99_tpot_ms`, `mean_e2el_ms`, ...), so results sit beside vLLM's; the paper's metric is ours:
`norm_latency_{mean,p50,p95,p99}_s_per_tok`. Definitions, for a finished request with n
generated tokens:

    ttft         = first_token - arrival
    tpot         = (finish - first_token) / (n - 1)          (only requests with n > 1)
    itl          = gaps between consecutive token times       (only where token times were kept)
    e2el         = finish - arrival
    norm_latency = e2el / n                                   (s/token, the paper's y axis)

Throughput divides the finished requests' counts by `duration`: by default from the first arrival
(of any request) to the last finish. Percentiles interpolate linearly (numpy's default).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

PERCENTILES = (95, 99)  # besides the mean and the median


@dataclasses.dataclass
class RequestRecord:
  """One request's life. Times are seconds on the client's clock; None until they happen.

  Attributes:
    request_id: the workload's request id.
    arrival: when the client sent it.
    prompt_len: prompt tokens.
    first_token: when the first generated token was produced (the prompt step yields it).
    finish: when the last token was produced.
    output_len: tokens generated (the first one included).
    tokens: the generated token ids, when the engine reports them.
    token_times: when each generated token was produced (token_times[0] == first_token), when
      the engine reports them.
    recomputed_tokens: tokens generated again after a failure (not counted in output_len).
  """

  request_id: int
  arrival: float
  prompt_len: int
  first_token: float | None = None
  finish: float | None = None
  output_len: int = 0
  tokens: list[int] = dataclasses.field(default_factory=list)
  token_times: list[float] = dataclasses.field(default_factory=list)
  recomputed_tokens: int = 0

  @property
  def done(self) -> bool:
    return not _missing(self.finish)


def _missing(t: float | None) -> bool:
  # None is ours; NaN is how the simulator's records say "not yet".
  return t is None or (isinstance(t, float) and math.isnan(t))


def _stats(prefix: str, values: Sequence[float], scale: float, suffix: str) -> dict[str, float]:
  """mean/median/std/p95/p99 of `values` * scale, keyed vLLM-style (`mean_ttft_ms`, ...)."""
  v = np.asarray(values, np.float64) * scale
  if v.size == 0:
    out = {f"mean_{prefix}{suffix}": math.nan, f"median_{prefix}{suffix}": math.nan,
           f"std_{prefix}{suffix}": math.nan}
    return out | {f"p{p}_{prefix}{suffix}": math.nan for p in PERCENTILES}
  out = {f"mean_{prefix}{suffix}": float(v.mean()),
         f"median_{prefix}{suffix}": float(np.median(v)),
         f"std_{prefix}{suffix}": float(v.std())}
  return out | {f"p{p}_{prefix}{suffix}": float(np.percentile(v, p)) for p in PERCENTILES}


def summarize(records: Iterable[Any], duration: float | None = None, *,
              slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict:
  """The metrics of a run (module docstring for the definitions).

  Args:
    records: `RequestRecord`s, or any objects with the attributes `arrival`, `prompt_len`,
      `first_token`, `finish` (None or NaN when missing) and `output_len`, and optionally
      `token_times` and `recomputed_tokens` (the simulator's records qualify).
    duration: the run's length in seconds for the throughputs; by default from the first arrival
      to the last finish.
    slo_ttft_ms, slo_tpot_ms: service-level objectives; when either is given the summary adds
      vLLM's `request_goodput` (finished requests per second that met every given objective)
      and `slo_attainment` (their fraction of all requests).

  Returns:
    A flat dict of floats and ints. Latency metrics cover finished requests only (NaN when none
    finished); `num_unfinished` says how many were left out. The ITL keys appear only when some
    record kept its token times (the simulator's do not: no NaN placeholder).
  """
  records = list(records)
  done = [r for r in records if not _missing(r.finish)]
  if duration is None:
    duration = (max(r.finish for r in done) - min(r.arrival for r in records)
                if done else math.nan)
  in_tokens = sum(int(r.prompt_len) for r in done)
  out_tokens = sum(int(r.output_len) for r in done)

  def per_sec(x: float) -> float:
    if math.isnan(duration):
      return math.nan
    return x / duration if duration > 0 else math.inf

  started = [r for r in done if not _missing(r.first_token)]
  ttft = [r.first_token - r.arrival for r in started]
  tpot = [(r.finish - r.first_token) / (r.output_len - 1) for r in started if r.output_len > 1]
  itl = [gap for r in done for gap in np.diff(np.asarray(getattr(r, "token_times", ()) or (),
                                                         np.float64))]
  e2el = [r.finish - r.arrival for r in done]
  norm = [(r.finish - r.arrival) / r.output_len for r in done if r.output_len > 0]

  out = {
      "num_requests": len(records),
      "completed": len(done),
      "num_unfinished": len(records) - len(done),
      "duration": float(duration),
      "total_input_tokens": in_tokens,
      "total_output_tokens": out_tokens,
      "total_recomputed_tokens": sum(int(getattr(r, "recomputed_tokens", 0)) for r in records),
      "request_throughput": per_sec(len(done)),
      "output_throughput": per_sec(out_tokens),
      "total_token_throughput": per_sec(in_tokens + out_tokens),
  }
  norm = np.asarray(norm, np.float64)
  out["norm_latency_mean_s_per_tok"] = float(norm.mean()) if norm.size else math.nan
  for p in (50, *PERCENTILES):
    out[f"norm_latency_p{p}_s_per_tok"] = float(np.percentile(norm, p)) if norm.size else math.nan
  kept_times = any(getattr(r, "token_times", None) for r in done)
  for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
    if name != "itl" or kept_times:
      out |= _stats(name, values, 1e3, "_ms")
  if slo_ttft_ms is not None or slo_tpot_ms is not None:
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in done)
    out["request_goodput"] = per_sec(good)
    out["slo_attainment"] = good / len(records) if records else math.nan
  return out


def meets_slo(r, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
  """vLLM's goodput test of one finished request: TTFT and TPOT within the given objectives
  (None: no objective); a single-token request has no TPOT and meets any TPOT objective."""
  if _missing(r.finish) or _missing(r.first_token):
    return False
  if slo_ttft_ms is not None and (r.first_token - r.arrival) * 1e3 > slo_ttft_ms:
    return False
  if slo_tpot_ms is not None and r.output_len > 1:
    if (r.finish - r.first_token) / (r.output_len - 1) * 1e3 > slo_tpot_ms:
      return False
  return True


def _json_safe(x):
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, np.ndarray):
    return _json_safe(x.tolist())
  if isinstance(x, (np.integer, np.bool_)):
    return x.item()
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


def dumps(obj) -> str:
  """`obj` as strict JSON: NaN and infinities (which `json.dumps` writes as bare `NaN` and
  `Infinity`, rejected by every other JSON parser) become null; numpy scalars become numbers."""
  return json.dumps(_json_safe(obj), allow_nan=False)


def write_jsonl(path: str | os.PathLike, records: Iterable[RequestRecord],
                annotations: dict | None = None) -> None:
  """Writes one JSON object per request (the record's fields, then `annotations[request_id]`'s
  entries, e.g. the data-parallel replica that served it), one per line."""
  annotations = annotations or {}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(dumps({**dataclasses.asdict(r), **annotations.get(r.request_id, {})}) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[RequestRecord]:
  """Reads `write_jsonl`'s file. Keys that are not record fields are ignored (annotations)."""
  fields = {f.name for f in dataclasses.fields(RequestRecord)}
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      obj = json.loads(line)
      try:
        out.append(RequestRecord(**{k: v for k, v in obj.items() if k in fields}))
      except TypeError as e:
        raise ValueError(f"{path}:{lineno}: not a request record: {e}") from e
  return out


def _unit(key: str) -> str:
  if key.endswith("_ms"):
    return "ms"
  if key.endswith("_s_per_tok"):
    return "s/token"
  if key in ("request_throughput", "request_goodput"):
    return "req/s"
  if key.endswith("token_throughput") or key == "output_throughput":
    return "tok/s"
  if key == "duration":
    return "s"
  return ""


def _family(key: str) -> str:
  for name in ("norm_latency", "ttft", "tpot", "itl", "e2el", "throughput"):
    if name in key:
      return name
  return ""


def format_summary(summary: dict, title: str | None = None) -> str:
  """A readable two-column table of `summary` (units from the key names), grouped by metric."""
  width = max((len(k) for k in summary), default=0)
  lines = [title, "=" * max(len(title), width + 20)] if title else []
  family = None
  for key, value in summary.items():
    if family is not None and _family(key) != family:
      lines.append("")
    family = _family(key)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
      text = str(value)
    elif isinstance(value, (int, np.integer)):
      text = f"{value:d}"
    else:
      text = f"{value:.6g}"
    lines.append(f"{key:<{width}}  {text:>12} {_unit(key)}".rstrip())
  return "\n".join(lines)
