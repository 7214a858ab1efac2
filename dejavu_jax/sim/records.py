"""Per-request timing records and the metrics summary shared by the simulator and the engine.

A `RequestRecord` holds the times (seconds) a request arrived, got its first token and finished;
`summarize` turns a list of them into the result dict every experiment writes:
throughput (requests/s and tokens/s), normalized latency (end-to-end latency / generated tokens,
seconds per token) at p50/p95/p99, TTFT p50/p95 and TPOT p50.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class RequestRecord:
  """One request's life. Times are NaN until they happen.

  Attributes:
    rid: request id.
    arrival: when the client sent it.
    prompt_len: prompt tokens.
    output_len: tokens to generate (the prompt step yields the first one).
    first_token: when the first generated token was produced.
    finish: when the last token was produced.
  """

  rid: int
  arrival: float
  prompt_len: int
  output_len: int
  first_token: float = math.nan
  finish: float = math.nan

  @property
  def done(self) -> bool:
    return not math.isnan(self.finish)

  @property
  def latency(self) -> float:
    return self.finish - self.arrival

  @property
  def norm_latency(self) -> float:
    """End-to-end seconds per generated token."""
    return self.latency / self.output_len

  @property
  def ttft(self) -> float:
    return self.first_token - self.arrival

  @property
  def tpot(self) -> float:
    """Seconds per output token after the first (NaN for single-token requests)."""
    if self.output_len <= 1:
      return math.nan
    return (self.finish - self.first_token) / (self.output_len - 1)


def _pct(values: Sequence[float], q: float) -> float:
  v = np.asarray([x for x in values if not math.isnan(x)], float)
  return float(np.percentile(v, q)) if v.size else math.nan


def summarize(records: Sequence[RequestRecord]) -> dict:
  """Metrics over the finished requests in `records`.

  Throughput is measured from the first arrival to the last finish; unfinished requests are
  counted in `num_unfinished` and left out of every other number.
  """
  done = [r for r in records if r.done]
  out = {"num_requests": len(done), "num_unfinished": len(records) - len(done)}
  if not done:
    return out | {k: math.nan for k in (
        "duration_s", "throughput_rps", "throughput_tok_s", "norm_latency_p50",
        "norm_latency_p95", "norm_latency_p99", "ttft_p50", "ttft_p95", "tpot_p50")}
  start = min(r.arrival for r in done)
  duration = max(r.finish for r in done) - start
  tokens = sum(r.output_len for r in done)
  norm = [r.norm_latency for r in done]
  ttft = [r.ttft for r in done]
  return out | {
      "duration_s": duration,
      "throughput_rps": len(done) / duration if duration > 0 else math.inf,
      "throughput_tok_s": tokens / duration if duration > 0 else math.inf,
      "norm_latency_p50": _pct(norm, 50),
      "norm_latency_p95": _pct(norm, 95),
      "norm_latency_p99": _pct(norm, 99),
      "ttft_p50": _pct(ttft, 50),
      "ttft_p95": _pct(ttft, 95),
      "tpot_p50": _pct([r.tpot for r in done], 50),
  }


@dataclasses.dataclass
class SimResult:
  """What a simulation run returns.

  Attributes:
    records: every request (finished or not).
    recoveries: one breakdown dict per failure (see `dejavu_jax.sim.failures`).
    mb_finish_times: when each microbatch finished, in order.
    end_time: simulated time when the run stopped.
    events: number of events processed (a cost measure of the run itself).
    info: the system's description (depths, batch size, ...).
  """

  records: list[RequestRecord]
  recoveries: list[dict]
  mb_finish_times: list[float]
  end_time: float
  events: int
  info: dict

  @property
  def summary(self) -> dict:
    return summarize(self.records)

  def inverse_throughput(self, warmup: int, cooldown: int | None = None,
                         period: int = 1) -> float:
    """Steady-state seconds per finished microbatch.

    Skips the first `warmup` finishes (pipeline filling) and the last `cooldown` (default
    `warmup`: the drain once the queue is empty, when stages idle and finishes speed up), and
    spans a whole number of `period`s (finishes come in bursts of the pipeline depth).
    """
    t = self.mb_finish_times
    cooldown = warmup if cooldown is None else cooldown
    span = (len(t) - 1 - warmup - cooldown) // period * period
    if span < 1:
      raise ValueError(f"{len(t)} finished microbatches are too few for warmup {warmup}, "
                       f"cooldown {cooldown} and period {period}")
    return (t[warmup + span] - t[warmup]) / span

  def to_json_dict(self) -> dict:
    return {**self.info, **self.summary, "recoveries": self.recoveries,
            "sim_events": self.events, "sim_end_time_s": self.end_time}
