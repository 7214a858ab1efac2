"""Greedy tokens of the pipeline equal single-device generation, for any depth, tensor split,
microbatch size and mode."""

import jax
import numpy as np
import pytest

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.models import init_params
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request
from tests.serving_util import greedy_references

CFG = tiny_config("opt", num_layers=4, max_positions=128)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def _requests(n, mode, seed=0):
  rng = np.random.default_rng(seed)
  reqs = []
  for i in range(n):
    if mode == "paper":  # groups of 4 share prompt and output length
      plen, new = 6 + (i // 4) % 3, 5 + 2 * ((i // 4) % 2)
    else:
      plen, new = int(rng.integers(1, 20)), int(rng.integers(1, 12))
    prompt = tuple(int(t) for t in rng.integers(3, CFG.vocab_size, plen))
    reqs.append(Request(i, 0.002 * i, prompt, new))
  return reqs


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stages,tensor,mb,mode", [
    (1, 1, 1, "mixed"),
    (2, 1, 2, "mixed"),
    (4, 1, 3, "mixed"),
    (2, 2, 4, "mixed"),
    (4, 2, 8, "paper"),
    (1, 2, 5, "paper"),
    (2, 1, 8, "paper"),
    (4, 1, 6, "mixed"),
])
def test_pipeline_tokens_identical_to_single_device(params, stages, tensor, mb, mode):
  reqs = _requests(14, mode, seed=stages * 10 + mb)
  serve = ServeConfig(num_stages=stages, tensor=tensor, microbatch_size=mb, max_len=64,
                      mode=mode)
  with PipelineEngine(CFG, params, serve) as eng:
    result = eng.serve(reqs)
  assert not result.rejected
  assert result.tokens() == greedy_references(CFG, params, reqs)
  assert result.summary["completed"] == len(reqs)


@pytest.mark.timeout(120)
def test_explicit_uneven_ranges_and_eos(params):
  reqs = _requests(6, "mixed", seed=3)
  ref = greedy_references(CFG, params, reqs)
  # Pick an EOS id that some reference output contains, to exercise early per-row stops.
  eos = next(t for r in reqs for t in ref[r.request_id][:-1])
  serve = ServeConfig(num_stages=3, stage_ranges=((0, 1), (1, 3), (3, 4)), microbatch_size=4,
                      max_len=64, eos_token_id=eos)
  with PipelineEngine(CFG, params, serve) as eng:
    got = eng.serve(reqs).tokens()
  for r in reqs:
    want = ref[r.request_id]
    if eos in want:
      want = want[:want.index(eos) + 1]
    assert got[r.request_id] == want


@pytest.mark.timeout(120)
def test_mixed_mode_rows_return_as_soon_as_they_finish(params):
  short = Request(0, 0.0, (5, 6, 7), 2)
  long = Request(1, 0.0, (8, 9, 10), 20)
  with PipelineEngine(CFG, params, ServeConfig(num_stages=2, microbatch_size=2,
                                               max_len=64)) as eng:
    recs = {r.request_id: r for r in eng.serve([short, long]).records}
  assert recs[0].finish < recs[1].finish
  assert recs[0].output_len == 2 and recs[1].output_len == 20
