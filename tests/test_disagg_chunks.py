"""The paced Fig 8's chunks (studies/disagg_experiment.py): a paced decode step costs the c
paper-scale steps it stands for, a prompt step stays one prompt, a request's tokens round up to
chunks, and the simulator runs the same chunks (or the paper-scale tokens) on the same requests.
Cost model and simulator only (no engine)."""

import math

import pytest

from dejavu_jax import costmodel as cm
from dejavu_jax.config import get_model_config
from dejavu_jax.studies import disagg_experiment as dx


def _base():
  return cm.roofline(get_model_config("opt_66b", dtype="float16"), "a100_80gb",
                     gpus_per_machine=2)


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_a_chunk_costs_the_steps_it_stands_for(chunk):
  base = _base()
  cost = dx.PaperScaleCost(base, real=16, modeled=1000, chunk=chunk)
  layers, batch = 16, 8   # batch 8: decode is memory-bound, linear in the context
  for k in (1, 2, 50):    # the k-th paced decode step: paper-scale steps (k-1)c+1 .. kc
    want = sum(base.token_time(layers, batch, 1000 + (k - 1) * chunk + j)
               for j in range(1, chunk + 1))
    assert cost.token_time(layers, batch, 16 + k) == pytest.approx(want, rel=1e-9)
  assert cost.prompt_time(layers, 16, batch) == base.prompt_time(layers, 1000, batch)
  assert cost.modeled_prompt_len(16) == 1000
  assert cost.head_time(batch) == chunk * base.head_time(batch)
  assert cost.machine_memory_bytes == base.machine_memory_bytes
  # The colocated baseline's prompt step yields the first chunk: the prompt, then c - 1 decode
  # steps; its k-th decode step then covers the contexts from 1000 + kc on.
  first = dx.PaperScaleCost(base, real=16, modeled=1000, chunk=chunk, first_chunk_in_prompt=True)
  assert first.prompt_time(layers, 16, batch) == pytest.approx(
      base.prompt_time(layers, 1000, batch)
      + sum(base.token_time(layers, batch, 1000 + j) for j in range(1, chunk)), rel=1e-9)
  for k in (1, 2, 50):
    want = sum(base.token_time(layers, batch, 1000 + k * chunk + j) for j in range(chunk))
    assert first.token_time(layers, batch, 16 + k) == pytest.approx(want, rel=1e-9)


def test_paced_lengths_and_bad_chunks():
  sc = dx.Scenario(chunk=4)
  assert [sc.paced_len(n) for n in (1, 2, 5, 6, 950)] == [1, 2, 2, 3, 1 + math.ceil(949 / 4)]
  colocated = ("colocated", 4)
  assert [sc.paced_len(n, colocated) for n in (1, 4, 5, 950)] == [1, 1, 2, math.ceil(950 / 4)]
  assert [dx.Scenario(chunk=1).paced_len(n, s) for n in (1, 7) for s in (colocated, ("disagg",
                                                                                     1, 3))] == [
      1, 1, 7, 7]
  assert sc.max_len() >= sc.real_prompt_len + sc.paced_len(sc.max_output()) + 1
  for bad in (0, 1.5):
    with pytest.raises(ValueError, match="chunk"):
      dx.Scenario(chunk=bad)


def test_the_simulator_runs_the_same_requests_chunked_and_at_paper_scale():
  sc = dx.Scenario(chunk=4, time_scale=0.1)
  system = ("colocated", 4)
  reqs = dx.make_requests(sc, 6, rate=2.0, system=system)
  lens = dict(enumerate(dx.output_lens(sc, 6)))
  assert [r.max_new_tokens for r in reqs] == [sc.paced_len(lens[r.request_id], system)
                                               for r in reqs]
  chunked = dx.simulate(sc, system, reqs)
  paper = dx.simulate(sc, system, reqs, chunked=False, output_lens=lens)
  paper_len = {r.rid: r.output_len for r in paper.records}
  assert paper_len == lens
  assert all(r.output_len == sc.paced_len(lens[r.rid], system) for r in chunked.records)
  # Arrivals in modelled time (wall / time_scale) for both; the same work to within the chunks'
  # rounding: makespans within 5%.
  assert sorted(r.arrival for r in chunked.records) == pytest.approx(
      sorted(r.arrival / sc.time_scale for r in reqs))
  span = [max(r.finish for r in res.records) for res in (chunked, paper)]
  assert span[0] == pytest.approx(span[1], rel=0.05)
  # One decode step per token: chunk 1 is the paper-scale run itself.
  one = dx.Scenario(chunk=1, time_scale=0.1)
  same = dx.simulate(one, system, dx.make_requests(one, 6, rate=2.0, system=system))
  assert [r.finish for r in same.records] == [r.finish for r in paper.records]
  # Records in modelled seconds, each of its paper-scale length.
  recs = dx.modelled_records(chunked.records, 1.0, sc.prompt_len, lens)
  assert [r.output_len for r in recs] == [lens[r.rid] for r in chunked.records]
  with pytest.raises(ValueError, match="output_lens"):
    dx.simulate(sc, system, reqs, chunked=False)
