"""The open-loop client: which requests arrive when, with which prompt and how many new tokens.

This module owns the workload of every serving experiment, as in the paper's evaluation (see
DEJAVU.md, "How it was measured"): one open-loop client whose arrivals are a Poisson process at a
given rate, a fixed (or uniformly sampled) prompt length, and output lengths sampled from a
distribution of chat response lengths, clamped to [2, 950] tokens as in the paper.

Output lengths (`WorkloadConfig.output_len` spec):

* ``'lmsys'``: a lognormal fitted to the published summary of LMSys-Chat-1M (Zheng et al., 2023,
  arXiv 2309.11998, Table 1): an average of 214.5 tokens per response (and 69.5 per prompt,
  unused here: the paper fixes the prompt length). The dataset paper publishes means only, so a
  lognormal (two parameters) needs one more number: we *assume* a median of 150 tokens, i.e. a
  mean/median ratio of 1.43, the right skew typical of chat responses (many short answers, a long
  tail of code and essays). Matching mean = exp(mu + sigma^2 / 2) and median = exp(mu) gives

      mu    = ln(150)                  = 5.0106
      sigma = sqrt(2 ln(214.5 / 150))  = 0.8458

  Under this fit about 1.5% of responses exceed the paper's 950-token cap, so the clamp trims only
  a thin tail; after clamping and rounding the mean is ~209 tokens (`lognormal_clamped_mean`) and
  the median stays 150. These are approximations of the published summary, not the dataset: to
  use real lengths, export them to a file and pass ``'file:PATH'``.
* ``'lognormal:MEAN,MEDIAN'``: the same fit to other numbers (for sensitivity studies).
* ``'fixed:N'``: every request generates N tokens (N must lie within the clamp bounds).
* ``'file:PATH'``: lengths read from a file (one integer per line, blank lines and ``#`` comments
  skipped, or a JSON list), sampled with replacement, as the paper samples the dataset; clamped.

Reproducibility: one `seed` drives everything, split (`np.random.SeedSequence.spawn`) into
independent streams for arrivals, prompt lengths, output lengths and prompt tokens, so that
changing e.g. the prompt length leaves arrivals and output lengths unchanged and two systems can
be compared on the same requests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

import numpy as np

# Published summary of LMSys-Chat-1M (Zheng et al., 2023, Table 1; Llama-2 tokenizer).
LMSYS_MEAN_RESPONSE_TOKENS = 214.5
LMSYS_MEAN_PROMPT_TOKENS = 69.5
# Not published: our assumption, see the module docstring.
LMSYS_ASSUMED_MEDIAN_RESPONSE_TOKENS = 150.0

# Token ids 0..2 are special (pad / bos / eos in our tokenizers); prompts never contain them.
FIRST_REGULAR_TOKEN = 3

RngLike = np.random.Generator | int | None


@dataclasses.dataclass(frozen=True)
class Request:
  """One client request.

  Attributes:
    request_id: position in arrival order, 0-based.
    arrival: seconds since the client started (the first request arrives at 0).
    prompt: prompt token ids, each in [3, vocab_size).
    max_new_tokens: tokens to generate, the first one included (the prompt step yields it).
  """

  request_id: int
  arrival: float
  prompt: tuple[int, ...]
  max_new_tokens: int

  @property
  def prompt_len(self) -> int:
    return len(self.prompt)


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
  """What the client sends.

  Attributes:
    rate: mean arrival rate, requests/s (> 0).
    num_requests: requests to send (>= 1).
    prompt_len: a fixed prompt length, or an inclusive (low, high) range sampled uniformly.
    output_len: 'lmsys' | 'lognormal:MEAN,MEDIAN' | 'fixed:N' | 'file:PATH' (module docstring).
    vocab_size: prompt token ids are drawn uniformly from [3, vocab_size).
    seed: drives every random choice.
    min_output: lower clamp of the output length (the paper's 2).
    max_output: upper clamp of the output length (the paper's 950).
  """

  rate: float
  num_requests: int
  prompt_len: int | tuple[int, int]
  output_len: str
  vocab_size: int
  seed: int = 0
  min_output: int = 2
  max_output: int = 950


def lognormal_params(mean: float, median: float) -> tuple[float, float]:
  """(mu, sigma) of the lognormal with this mean and median (needs mean >= median > 0)."""
  if not median > 0 or mean < median:
    raise ValueError(f"a lognormal needs mean >= median > 0, got mean {mean}, median {median}")
  return math.log(median), math.sqrt(2.0 * math.log(mean / median))


def lognormal_clamped_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
  """E[clip(X, lo, hi)] for X ~ LogNormal(mu, sigma): the target of the clamped sampler."""
  def phi(z):  # standard normal CDF
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
  za, zb = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
  # E[X; lo < X < hi] = exp(mu + sigma^2/2) * (Phi(zb - sigma) - Phi(za - sigma)).
  inside = math.exp(mu + sigma ** 2 / 2) * (phi(zb - sigma) - phi(za - sigma))
  return lo * phi(za) + inside + hi * (1.0 - phi(zb))


LMSYS_MU, LMSYS_SIGMA = lognormal_params(LMSYS_MEAN_RESPONSE_TOKENS,
                                         LMSYS_ASSUMED_MEDIAN_RESPONSE_TOKENS)


def poisson_arrivals(rate: float, n: int, rng: RngLike = None) -> np.ndarray:
  """Arrival times (s) of `n` requests from an open-loop Poisson client at `rate` requests/s.

  The gaps are i.i.d. exponential with mean 1/rate. The first request arrives at 0 (the clock
  starts with the client's first send, so no run begins with an idle lead-in), hence the empirical
  rate is (n - 1) / arrivals[-1].

  Args:
    rate: requests/s, > 0.
    n: number of requests, >= 1.
    rng: a `np.random.Generator` (used as is) or a seed.

  Returns:
    [n] float64, non-decreasing, starting at 0.
  """
  if not rate > 0 or not math.isfinite(rate):
    raise ValueError(f"rate must be a finite number of requests/s > 0, got {rate}")
  if n < 1:
    raise ValueError(f"num_requests must be >= 1, got {n}")
  gaps = np.random.default_rng(rng).exponential(1.0 / rate, n)
  gaps[0] = 0.0
  return np.cumsum(gaps)


def read_lengths_file(path: str) -> np.ndarray:
  """Integers from a file: a JSON list, or one per line (blank lines and '#' comments skipped)."""
  if not os.path.isfile(path):
    raise ValueError(f"output length file not found: {path!r}")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    if text.lstrip().startswith("["):
      values = json.loads(text)
    else:
      lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
      values = [int(line) for line in lines if line]
    lengths = np.asarray(values)
  except (ValueError, TypeError) as e:
    raise ValueError(f"output length file {path!r} is not a list of integers: {e}") from e
  if lengths.ndim != 1 or lengths.size == 0:
    raise ValueError(f"output length file {path!r} holds no lengths")
  if not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"output length file {path!r} holds non-integer values")
  return lengths.astype(np.int64)


def sample_output_lengths(spec: str, n: int, rng: RngLike = None, lo: int = 2,
                          hi: int = 950) -> np.ndarray:
  """`n` output lengths (tokens to generate) drawn as `spec` says, clamped to [lo, hi].

  Args:
    spec: 'lmsys' | 'lognormal:MEAN,MEDIAN' | 'fixed:N' | 'file:PATH' (module docstring).
    n: how many.
    rng: a `np.random.Generator` (used as is) or a seed.
    lo: lower clamp, >= 1.
    hi: upper clamp, >= lo.

  Returns:
    [n] int64 in [lo, hi].

  Raises:
    ValueError: on an unknown or malformed spec, a missing or bad file, bad bounds, or a fixed
      length outside [lo, hi] (asking for N and silently getting another number would mislead).
  """
  if not 1 <= lo <= hi:
    raise ValueError(f"output length bounds must satisfy 1 <= min <= max, got [{lo}, {hi}]")
  if n < 0:
    raise ValueError(f"cannot sample {n} output lengths")
  rng = np.random.default_rng(rng)
  kind, _, arg = spec.partition(":")
  if kind == "lmsys" and not arg:
    raw = rng.lognormal(LMSYS_MU, LMSYS_SIGMA, n)
  elif kind == "lognormal":
    try:
      mean, median = (float(x) for x in arg.split(","))
    except ValueError as e:
      raise ValueError(f"output_len spec {spec!r}: expected 'lognormal:MEAN,MEDIAN'") from e
    raw = rng.lognormal(*lognormal_params(mean, median), n)
  elif kind == "fixed":
    try:
      fixed = int(arg)
    except ValueError as e:
      raise ValueError(f"output_len spec {spec!r}: expected 'fixed:N' with an integer N") from e
    if not lo <= fixed <= hi:
      raise ValueError(f"output_len spec {spec!r}: {fixed} lies outside [{lo}, {hi}]")
    return np.full(n, fixed, np.int64)
  elif kind == "file" and arg:
    raw = rng.choice(read_lengths_file(arg), size=n, replace=True)
  else:
    raise ValueError(f"unknown output_len spec {spec!r}: expected 'lmsys', "
                     "'lognormal:MEAN,MEDIAN', 'fixed:N' or 'file:PATH'")
  return np.clip(np.rint(raw), lo, hi).astype(np.int64)


def _prompt_lengths(prompt_len: int | Sequence[int], n: int, rng: np.random.Generator
                    ) -> np.ndarray:
  if isinstance(prompt_len, (int, np.integer)) and not isinstance(prompt_len, bool):
    if prompt_len < 1:
      raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    return np.full(n, int(prompt_len), np.int64)
  if (isinstance(prompt_len, (tuple, list)) and len(prompt_len) == 2
      and all(isinstance(x, (int, np.integer)) for x in prompt_len)):
    low, high = (int(x) for x in prompt_len)
    if not 1 <= low <= high:
      raise ValueError(f"prompt_len range must satisfy 1 <= low <= high, got {prompt_len}")
    return rng.integers(low, high, size=n, endpoint=True)
  raise ValueError(f"prompt_len must be an int or an inclusive (low, high) pair of ints, "
                   f"got {prompt_len!r}")


def make_workload(cfg: WorkloadConfig) -> list[Request]:
  """The requests `cfg` describes, sorted by arrival (request ids follow arrival order).

  Raises:
    ValueError: naming the problem, for rate <= 0, num_requests < 1, a bad prompt_len, a
      vocabulary with no regular token, an unknown output_len spec or a missing length file.
  """
  if cfg.vocab_size <= FIRST_REGULAR_TOKEN:
    raise ValueError(f"vocab_size must be > {FIRST_REGULAR_TOKEN} (ids 0..2 are special), "
                     f"got {cfg.vocab_size}")
  # Separate streams: each choice stays fixed when another part of the config changes.
  arrival_rng, prompt_len_rng, output_rng, token_rng = (
      np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(4))
  arrivals = poisson_arrivals(cfg.rate, cfg.num_requests, arrival_rng)
  prompt_lens = _prompt_lengths(cfg.prompt_len, cfg.num_requests, prompt_len_rng)
  outputs = sample_output_lengths(cfg.output_len, cfg.num_requests, output_rng,
                                  cfg.min_output, cfg.max_output)
  tokens = token_rng.integers(FIRST_REGULAR_TOKEN, cfg.vocab_size, size=int(prompt_lens.sum()))
  starts = np.concatenate([[0], np.cumsum(prompt_lens)])
  return [Request(request_id=i, arrival=float(arrivals[i]),
                  prompt=tuple(tokens[starts[i]:starts[i + 1]].tolist()),
                  max_new_tokens=int(outputs[i]))
          for i in range(cfg.num_requests)]


def group_paper_mode(requests: Sequence[Request], microbatch_size: int) -> list[Request]:
  """The paper's setting: every request of a microbatch generates the same number of tokens.

  In the paper's runs a microbatch of `microbatch_size` requests moves through the pipeline as
  one unit and all its requests stop together, so no row idles while others finish. Here the
  requests, in arrival order, are cut into consecutive groups of `microbatch_size` (the last one
  may be shorter), and every member of a group takes the first member's `max_new_tokens`.
  Arrivals, ids and prompts are unchanged. This assumes the engine forms microbatches from
  consecutive arrivals, as a FIFO batcher does.

  Args:
    requests: in arrival order (as `make_workload` returns them).
    microbatch_size: requests per microbatch, >= 1.

  Returns:
    A new list of requests; the input is not modified.
  """
  if microbatch_size < 1:
    raise ValueError(f"microbatch_size must be >= 1, got {microbatch_size}")
  out = []
  for start in range(0, len(requests), microbatch_size):
    group = requests[start:start + microbatch_size]
    n = group[0].max_new_tokens
    out.extend(dataclasses.replace(r, max_new_tokens=n) for r in group)
  return out
