"""Simulated client: Poisson arrivals with a fixed prompt length and sampled output lengths.

The random draws are `dejavu_jax.workload`'s (`poisson_arrivals`, re-exported here, and
`sample_output_lengths`): the engine and the simulator share one client. This module only shapes
them into the simulator's `RequestRecord`s; `from_serving` converts a served workload (same
arrivals, prompt lengths and output lengths) so both can run the very same requests.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from dejavu_jax.workload import Request, poisson_arrivals, sample_output_lengths
from dejavu_jax.sim.records import RequestRecord


def sample_output_lens(num_requests: int, seed: int = 0, median: float = 150.0,
                       sigma: float = 1.0, low: int = 2, high: int = 950) -> np.ndarray:
  """Lognormal output lengths (median, sigma) clamped to [low, high].

  The sampling is `serving.workload.sample_output_lengths` with the lognormal given by its mean
  and median; this signature stays because the simulator's configs speak in (median, sigma).
  """
  if sigma < 0:
    raise ValueError(f"sigma must be >= 0, got {sigma}")
  mean = median * math.exp(sigma**2 / 2)
  # seed + 1: the arrivals draw from `seed`, and the two streams must differ.
  return sample_output_lengths(f"lognormal:{mean!r},{median!r}", num_requests, seed + 1,
                               low, high)


def make_requests(rate: float, num_requests: int, prompt_len: int,
                  output_lens: Sequence[int] | int | None = None,
                  seed: int = 0, per_microbatch: int | None = None) -> list[RequestRecord]:
  """Requests with Poisson arrivals; `output_lens` is an array, a constant, or None (sampled).
  With `per_microbatch` = B, each run of B consecutive requests takes its first one's length
  (the paper's setting: the rows of a microbatch finish together)."""
  if not rate > 0:  # checked here too, for the simulator's own message
    raise ValueError(f"request rate must be > 0 requests/s, got {rate}")
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
  if per_microbatch is not None:
    if per_microbatch < 1:
      raise ValueError(f"per_microbatch must be >= 1, got {per_microbatch}")
    lens = np.repeat(lens[::per_microbatch], per_microbatch)[:num_requests]
  return [RequestRecord(i, float(a), int(prompt_len), int(n))
          for i, (a, n) in enumerate(zip(arrivals, lens))]


def saturated_requests(num_requests: int, prompt_len: int,
                       output_len: int | Sequence[int]) -> list[RequestRecord]:
  """All requests waiting at t=0: the pipeline is never starved (for throughput measurements).
  `output_len`: one length for all, or one per request."""
  lens = ([int(output_len)] * num_requests if np.isscalar(output_len)
          else [int(n) for n in output_len])
  if len(lens) != num_requests:
    raise ValueError(f"{len(lens)} output lengths for {num_requests} requests")
  return [RequestRecord(i, 0.0, prompt_len, n) for i, n in enumerate(lens)]


# The LMSys-Chat-1M fit's shape (serving.workload): median / mean and the upper clamp / mean.
_LMSYS_MEDIAN_OVER_MEAN = 150.0 / 214.5
_LMSYS_MAX_OVER_MEAN = 950 / 214.5


def per_microbatch_output_lens(num_microbatches: int, batch_size: int, mean: float,
                               seed: int = 0) -> np.ndarray:
  """One output length per microbatch, shared by its `batch_size` rows (the paper's setting: the
  rows of a microbatch finish together, different microbatches at different times), drawn from
  the LMSys-fitted lognormal scaled to `mean`. Returns [num_microbatches * batch_size]."""
  if mean < 2:
    raise ValueError(f"mean output length must be >= 2, got {mean}")
  per_mb = sample_output_lengths(
      f"lognormal:{float(mean)!r},{mean * _LMSYS_MEDIAN_OVER_MEAN!r}", num_microbatches,
      seed + 2, 2, max(2, int(round(mean * _LMSYS_MAX_OVER_MEAN))))
  return np.repeat(per_mb, batch_size)


def from_serving(requests: Sequence[Request]) -> list[RequestRecord]:
  """Fresh simulator records for the engine's `requests` (ids, arrivals and lengths kept)."""
  return [RequestRecord(r.request_id, float(r.arrival), r.prompt_len, int(r.max_new_tokens))
          for r in sorted(requests, key=lambda r: (r.arrival, r.request_id))]
