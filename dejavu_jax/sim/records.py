"""The simulator's per-request timing records, its run result, and its metrics summary.

A `RequestRecord` holds the times (seconds) a request arrived, got its first token and finished.
`summarize` is `dejavu_jax.metrics.summarize` (one definition of throughput, normalized
latency, TTFT and TPOT, one set of names and units, for the engine and the simulator). `SimResult` is what every simulation returns.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from dejavu_jax import metrics


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


def summarize(records: Sequence[RequestRecord]) -> dict:
  """`dejavu_jax.metrics.summarize` over `records`: every metric is computed once, by the
  engine's summary, under one set of names and units, so simulated and served runs are judged by
  the same definitions (`num_requests` counts all requests, `completed` the finished ones)."""
  return metrics.summarize(records)


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
