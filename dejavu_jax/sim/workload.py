"""Simulated client: Poisson arrivals with a fixed prompt length and sampled output lengths.

`dejavu_jax.serving.workload` (the engine's LMSys-fitted sampler) supersedes the default length
sampler here; pass its lengths through `output_lens` to drive both with the same workload.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dejavu_jax.sim.records import RequestRecord


def poisson_arrivals(rate: float, num_requests: int, seed: int = 0) -> np.ndarray:
  """Arrival times (s) of an open-loop Poisson client at `rate` requests/s, starting at 0."""
  if not rate > 0:
    raise ValueError(f"request rate must be > 0 requests/s, got {rate}")
  if num_requests < 1:
    raise ValueError(f"num_requests must be >= 1, got {num_requests}")
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, num_requests)
  gaps[0] = 0.0
  return np.cumsum(gaps)


def sample_output_lens(num_requests: int, seed: int = 0, median: float = 150.0,
                       sigma: float = 1.0, low: int = 2, high: int = 950) -> np.ndarray:
  """Lognormal output lengths clamped to [low, high]: a stand-in for the LMSys-fitted sampler."""
  rng = np.random.default_rng(seed + 1)
  lens = np.exp(rng.normal(np.log(median), sigma, num_requests))
  return np.clip(np.round(lens), low, high).astype(int)


def make_requests(rate: float, num_requests: int, prompt_len: int,
                  output_lens: Sequence[int] | int | None = None,
                  seed: int = 0) -> list[RequestRecord]:
  """Requests with Poisson arrivals; `output_lens` is an array, a constant, or None (sampled)."""
  if prompt_len < 1:
    raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
  arrivals = poisson_arrivals(rate, num_requests, seed)
  if output_lens is None:
    lens = sample_output_lens(num_requests, seed)
  elif np.isscalar(output_lens):
    lens = np.full(num_requests, int(output_lens))
  else:
    lens = np.asarray(output_lens, int)
    if lens.shape != (num_requests,):
      raise ValueError(f"output_lens has shape {lens.shape}, expected ({num_requests},)")
  if (lens < 1).any():
    raise ValueError("every output length must be >= 1")
  return [RequestRecord(i, float(a), int(prompt_len), int(n))
          for i, (a, n) in enumerate(zip(arrivals, lens))]


def saturated_requests(num_requests: int, prompt_len: int, output_len: int) -> list[RequestRecord]:
  """All requests waiting at t=0: the pipeline is never starved (for throughput measurements)."""
  return [RequestRecord(i, 0.0, prompt_len, output_len) for i in range(num_requests)]
