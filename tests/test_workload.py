"""Tests of the open-loop client: arrival rate, output-length distributions, seeding, errors."""

import dataclasses
import json
import math

import numpy as np
import pytest

from dejavu_jax import workload as wl


def _cfg(**kw) -> wl.WorkloadConfig:
  base = dict(rate=4.0, num_requests=50, prompt_len=16, output_len="lmsys", vocab_size=100)
  return wl.WorkloadConfig(**(base | kw))


@pytest.mark.parametrize("seed", range(5))
def test_poisson_arrivals_rate_and_shape(seed):
  rate, n = 5.0, 2000
  t = wl.poisson_arrivals(rate, n, np.random.default_rng(seed))
  assert t.shape == (n,) and t[0] == 0.0 and np.all(np.diff(t) >= 0)
  # n - 1 gaps span the run; their relative sampling error is ~1/sqrt(2000) = 2.2%.
  assert (n - 1) / t[-1] == pytest.approx(rate, rel=0.07)
  gaps = np.diff(t)
  # Exponential gaps: the coefficient of variation is 1.
  assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)


def test_poisson_rate_pooled_over_seeds():
  # Pooling 5 x 2000 gaps brings the sampling error down to ~1%.
  gaps = np.concatenate([np.diff(wl.poisson_arrivals(3.0, 2000, s)) for s in range(5)])
  assert 1 / gaps.mean() == pytest.approx(3.0, rel=0.03)


def test_lognormal_fit_matches_published_mean_and_assumed_median():
  mu, sigma = wl.LMSYS_MU, wl.LMSYS_SIGMA
  assert math.exp(mu) == pytest.approx(wl.LMSYS_ASSUMED_MEDIAN_RESPONSE_TOKENS)
  assert math.exp(mu + sigma ** 2 / 2) == pytest.approx(wl.LMSYS_MEAN_RESPONSE_TOKENS)
  assert (mu, sigma) == pytest.approx((5.0106, 0.8458), abs=1e-4)


def test_lmsys_lengths_match_the_clamped_fit():
  n = 20000
  x = wl.sample_output_lengths("lmsys", n, np.random.default_rng(0))
  assert x.dtype == np.int64 and x.shape == (n,)
  assert x.min() >= 2 and x.max() == 950  # the clamp is hit: ~1.5% of the fit lies above 950
  target = wl.lognormal_clamped_mean(wl.LMSYS_MU, wl.LMSYS_SIGMA, 2, 950)
  assert target == pytest.approx(208.9, abs=0.1)
  assert x.mean() == pytest.approx(target, rel=0.03)
  assert np.median(x) == pytest.approx(150, abs=5)
  assert np.mean(x == 950) == pytest.approx(0.0145, abs=0.004)


def test_clamping_bounds_are_honoured():
  x = wl.sample_output_lengths("lognormal:300,200", 5000, 1, lo=100, hi=400)
  assert x.min() == 100 and x.max() == 400
  mu, sigma = wl.lognormal_params(300, 200)
  assert x.mean() == pytest.approx(wl.lognormal_clamped_mean(mu, sigma, 100, 400), rel=0.03)


def test_fixed_spec():
  np.testing.assert_array_equal(wl.sample_output_lengths("fixed:7", 4, 0), [7, 7, 7, 7])
  with pytest.raises(ValueError, match="outside"):
    wl.sample_output_lengths("fixed:1000", 4, 0)
  with pytest.raises(ValueError, match="fixed:N"):
    wl.sample_output_lengths("fixed:x", 4, 0)


@pytest.mark.parametrize("fmt", ["lines", "json"])
def test_file_spec_samples_the_file_and_clamps(tmp_path, fmt):
  values = [1, 10, 20, 5000]
  path = tmp_path / "lens.txt"
  if fmt == "json":
    path.write_text(json.dumps(values))
  else:
    path.write_text("# response lengths\n1\n10\n\n20  # a comment\n5000\n")
  x = wl.sample_output_lengths(f"file:{path}", 400, 0)
  # 1 -> 2 and 5000 -> 950 by the clamp; sampling with replacement reaches every value.
  assert set(x.tolist()) == {2, 10, 20, 950}
  cfg = _cfg(output_len=f"file:{path}", num_requests=20)
  assert {r.max_new_tokens for r in wl.make_workload(cfg)} <= {2, 10, 20, 950}


def test_file_spec_errors(tmp_path):
  with pytest.raises(ValueError, match="not found"):
    wl.sample_output_lengths(f"file:{tmp_path / 'missing.txt'}", 3, 0)
  bad = tmp_path / "bad.txt"
  bad.write_text("12\nabc\n")
  with pytest.raises(ValueError, match="not a list of integers"):
    wl.sample_output_lengths(f"file:{bad}", 3, 0)
  empty = tmp_path / "empty.txt"
  empty.write_text("\n# nothing\n")
  with pytest.raises(ValueError, match="no lengths"):
    wl.sample_output_lengths(f"file:{empty}", 3, 0)


def test_make_workload_requests():
  reqs = wl.make_workload(_cfg(prompt_len=(5, 9), vocab_size=10, num_requests=200))
  assert [r.request_id for r in reqs] == list(range(200))
  arrivals = [r.arrival for r in reqs]
  assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
  lens = [r.prompt_len for r in reqs]
  assert min(lens) == 5 and max(lens) == 9  # the range is inclusive
  tokens = np.concatenate([r.prompt for r in reqs])
  assert tokens.min() == 3 and tokens.max() == 9  # ids 0..2 are special
  assert all(isinstance(r.prompt, tuple) and 2 <= r.max_new_tokens <= 950 for r in reqs)
  with pytest.raises(dataclasses.FrozenInstanceError):
    reqs[0].max_new_tokens = 5  # type: ignore[misc]


def test_seed_reproducibility_and_independent_streams():
  a, b = wl.make_workload(_cfg(seed=3)), wl.make_workload(_cfg(seed=3))
  assert a == b
  c = wl.make_workload(_cfg(seed=4))
  assert [r.arrival for r in a] != [r.arrival for r in c]
  # A different prompt length leaves arrivals and output lengths as they were.
  d = wl.make_workload(_cfg(seed=3, prompt_len=64))
  assert [(r.arrival, r.max_new_tokens) for r in a] == [(r.arrival, r.max_new_tokens) for r in d]
  np.testing.assert_array_equal(wl.sample_output_lengths("lmsys", 10, 7),
                                wl.sample_output_lengths("lmsys", 10, 7))


@pytest.mark.parametrize("kw, message", [
    (dict(rate=0.0), "rate"),
    (dict(rate=-1.0), "rate"),
    (dict(num_requests=0), "num_requests"),
    (dict(prompt_len=0), "prompt_len"),
    (dict(prompt_len=(9, 5)), "prompt_len"),
    (dict(prompt_len="16"), "prompt_len"),
    (dict(output_len="sharegpt"), "unknown output_len spec"),
    (dict(output_len="file:/nonexistent/lens.txt"), "not found"),
    (dict(vocab_size=3), "vocab_size"),
    (dict(min_output=0), "bounds"),
])
def test_errors_name_the_problem(kw, message):
  with pytest.raises(ValueError, match=message):
    wl.make_workload(_cfg(**kw))


def test_group_paper_mode():
  reqs = wl.make_workload(_cfg(num_requests=10, seed=1))
  grouped = wl.group_paper_mode(reqs, 4)
  want = [reqs[0].max_new_tokens] * 4 + [reqs[4].max_new_tokens] * 4 + \
      [reqs[8].max_new_tokens] * 2
  assert [r.max_new_tokens for r in grouped] == want
  assert [(r.request_id, r.arrival, r.prompt) for r in grouped] == \
      [(r.request_id, r.arrival, r.prompt) for r in reqs]
  assert wl.group_paper_mode(reqs, 1) == reqs
  with pytest.raises(ValueError, match="microbatch_size"):
    wl.group_paper_mode(reqs, 0)
