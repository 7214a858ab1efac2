"""The paper's evaluation setting, declared once for every non-failure figure, and its metric.

The setting (DEJAVU.md, "How it was measured"): a fixed prompt of 1000 tokens, microbatches of
8 requests, output lengths sampled from the LMSys-Chat-1M fit (`dejavu_jax.workload`) clamped
to [2, 950] with ONE length per microbatch (its rows finish together), machines of 2 x A100-80GB,
Poisson arrivals at rates that cross every compared system's saturation. `PAPER` holds the
values a figure config must default to (tests/test_figure_configs.py reads every config against
it). Capacities are saturated simulations of the very workload the rate sweep draws from
(`capacity`), so loads are fractions of a capacity that the swept systems really have.

The metric (`gain_at_equal_latency`): each system's throughput at the highest request rate whose
median normalized latency (seconds per generated token) is within one latency bound, the same
bound for all systems, interpolated between the measured rates; the gain is the ratio to the
baseline's. The bound is `slo_factor` x the highest light-load median among the systems: a
latency every system meets when idle, so the comparison is of how much load each carries
before its queue (not its idle latency) pushes it past the bound. A bound tied to the baseline
alone would score a system whose idle latency is higher (e.g. a split whose prompt streaming
outlasts its compute) near zero, whatever its capacity.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from dejavu_jax import costmodel as cm
from dejavu_jax import sim
from dejavu_jax import workload as wl
from dejavu_jax.sim import workload as sim_workload

PAPER = {
    "prompt_len": 1000,
    "batch_size": 8,
    "output_mean": wl.LMSYS_MEAN_RESPONSE_TOKENS,   # the LMSys fit, clamped to [2, 950]
    "output_min": 2,
    "output_max": 950,
    "lengths": "per_microbatch",
    "hardware": "a100_80gb",
    "gpus_per_machine": 2,
}


def output_lens(num_requests: int, batch: int, seed: int = 0,
                mean: float = PAPER["output_mean"]) -> np.ndarray:
  """One LMSys-fitted length per microbatch of `batch` consecutive requests, clamped to
  [2, 950 x mean / 214.5] (950 at the paper's mean); [num_requests]."""
  n_mb = -(-num_requests // batch)
  return sim_workload.per_microbatch_output_lens(n_mb, batch, mean, seed)[:num_requests]


def requests(rate: float, num_requests: int, prompt_len: int = PAPER["prompt_len"],
             batch: int = PAPER["batch_size"], seed: int = 0,
             mean: float = PAPER["output_mean"]) -> list[sim.RequestRecord]:
  """Poisson arrivals at `rate` with the paper's per-microbatch output lengths."""
  return sim.make_requests(rate, num_requests, prompt_len,
                           output_lens(num_requests, batch, seed, mean), seed=seed)


def capacity(simulate: Callable[..., sim.SimResult], period: int, batch: int,
             prompt_len: int = PAPER["prompt_len"], seed: int = 0,
             mean: float = PAPER["output_mean"], num_microbatches: int | None = None) -> float:
  """Saturated requests/s of a system on the workload `requests` draws from: every request
  waiting at t=0, the steady-state microbatch finish rate (the first and last 2 `period`s of
  finishes skipped). `simulate(requests=..., batch_size=...)` runs the system; `period` is its
  pipeline depth (finishes come in bursts of it)."""
  n_mb = num_microbatches or 8 * period + 16
  reqs = sim.saturated_requests(n_mb * batch, prompt_len, output_lens(n_mb * batch, batch,
                                                                      seed, mean))
  res = simulate(requests=reqs, batch_size=batch)
  return batch / res.inverse_throughput(warmup=2 * period, cooldown=2 * period, period=period)


def sweep_rates(capacities: Sequence[float], loads: Sequence[float]) -> list[float]:
  """Request rates from the lowest capacity x min(loads) to the highest x max(loads): with
  loads spanning past 1 every system's saturation is crossed. `loads` are spread over that
  range geometrically, one rate per load."""
  lo, hi = min(capacities) * min(loads), max(capacities) * max(loads)
  if len(loads) == 1:
    return [lo]
  return [float(x) for x in np.geomspace(lo, hi, len(loads))]


def throughput_at_latency(points: Sequence[dict], bound: float,
                          key: str = "norm_latency_p50_s_per_tok") -> float:
  """The highest request throughput at which the median normalized latency is within `bound`:
  over every rate point within it, and, between a point within it and the next (by rate) past
  it, linearly interpolated to where the latency reaches the bound. Medians need not grow with
  the rate (short runs, microbatch formation), so every crossing counts, not only the first.
  0 if no point is within the bound."""
  pts = sorted((p for p in points if p.get(key) is not None), key=lambda p: p["rate"])
  best = 0.0
  for i, a in enumerate(pts):
    if a[key] > bound:
      continue
    best = max(best, a["request_throughput"])
    if i + 1 < len(pts) and pts[i + 1][key] > bound:
      b = pts[i + 1]
      f = (bound - a[key]) / (b[key] - a[key])
      best = max(best, a["request_throughput"] + f * (b["request_throughput"]
                                                     - a["request_throughput"]))
  return best


def gain_at_equal_latency(rows: Sequence[dict], baseline: str, slo_factor: float = 2.0,
                          key: str = "norm_latency_p50_s_per_tok") -> dict:
  """{"bound": s/token, "throughput": {system: req/s}, "gain": {system: x baseline}} with the
  latency bound `slo_factor` x the highest light-load median (module docstring). Rows carry
  "system", "rate", `key` and "request_throughput"."""
  if not any(r["system"] == baseline and r.get(key) is not None for r in rows):
    raise ValueError(f"no rows of the baseline {baseline!r}")
  idle = []
  for s in dict.fromkeys(r["system"] for r in rows):
    pts = sorted((r for r in rows if r["system"] == s and r.get(key) is not None),
                 key=lambda r: r["rate"])
    if pts:
      idle.append(pts[0][key])
  bound = slo_factor * max(idle)
  thr = {s: throughput_at_latency([r for r in rows if r["system"] == s], bound, key)
         for s in dict.fromkeys(r["system"] for r in rows)}
  b = thr[baseline]
  return {"bound": bound, "throughput": thr,
          "gain": {s: (v / b if b > 0 else math.nan) for s, v in thr.items()}}


def link_gbps(gbps: float, latency: float = 50e-6) -> cm.Link:
  """A network link of `gbps` gigabits per second (the sensitivity panels' x axis)."""
  return cm.Link(f"{gbps:g}gbps", gbps * 1e9 / 8, latency)


def describe(c) -> str:
  """One line naming a config's workload setting (the index shows it beside the headline)."""
  parts = [f"variant {c['variant']}"] if "variant" in c else []
  for k, fmt in (("prompt_len", "prompt {}"), ("batch_size", "microbatch {}"),
                 ("output_mean", "LMSys mean {:g}"), ("output_max", "clamped to {}"),
                 ("lengths", "{} lengths"), ("hardware", "{}"), ("gpus_per_machine", "x{}")):
    if k in c:
      parts.append(fmt.format(c[k]))
  return ", ".join(parts)
