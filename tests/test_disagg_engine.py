"""DisaggregatedEngine on the fake stage program: a Dp-stage prompt pipeline streaming into a
Dt-stage token pipeline. Oracle: every request's tokens equal `fake_generate` (the single-device
greedy run, computed by hand), whatever the split, the mode, the host slots and the failures."""

import time

import numpy as np
import pytest

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.controller import FailureSpec
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.disagg_engine import DisaggregatedEngine, DisaggregationError
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request

CFG = tiny_config("opt", num_layers=6, max_positions=128)


def _mixed(n=10, seed=0):
  rng = np.random.default_rng(seed)
  return [Request(i, 0.002 * i, tuple(int(t) for t in rng.integers(3, 100, int(rng.integers(2, 12)))),
                  int(rng.integers(1, 16))) for i in range(n)]


def _paper(n=9):
  # Runs of equal (prompt length, output length), as paper mode groups them.
  return [Request(i, 0.0, tuple(3 + (7 * i + j) % 90 for j in range(4 + i // 3)), 5 + 3 * (i // 3))
          for i in range(n)]


def _reference(reqs, eos=None):
  return {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens, eos)[0] for r in reqs}


def _eos_for(reqs):
  """A token the reference generates mid-sequence, so EOS really cuts some rows short."""
  for r in reqs:
    toks = fake_generate(CFG, [r.prompt], r.max_new_tokens)[0]
    if len(toks) > 3:
      return toks[2]
  raise AssertionError("no request long enough")


def _config(dp, dt, **kw):
  base = dict(prompt_stages=dp, token_stages=dt, microbatch_size=3, max_len=64, program="fake",
              heartbeat_s=0.03, heartbeat_timeout_s=0.3)
  return ServeConfig(**(base | kw))


def _settle(eng):
  """Waits for the last frees to land; returns (token stats, prompt stats)."""
  deadline = time.monotonic() + 5
  while time.monotonic() < deadline:
    st = eng.worker_stats()
    if not any(s.inbox or s.cache_mb_ids for s in st):
      break
    time.sleep(0.01)
  return eng.worker_stats(), eng.prompt_path.worker_stats()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dp,dt", [(1, 1), (1, 2), (1, 3), (2, 2), (2, 4), (2, 3)])
def test_tokens_identical_any_split(dp, dt):
  mixed = _mixed()
  eos = _eos_for(mixed)
  for mode, reqs in (("mixed", mixed), ("paper", _paper())):
    with DisaggregatedEngine(CFG, None, _config(dp, dt, mode=mode, eos_token_id=eos)) as eng:
      res = eng.serve(reqs)
      assert res.error is None and not res.rejected
      assert res.tokens() == _reference(reqs, eos), (dp, dt, mode)
      tok, _ = _settle(eng)
      # Every microbatch left: no token worker holds a cache or a host slot.
      assert all(s.cache_mb_ids == [] for s in tok)
      assert all(eng.runtime.worker(s).slots.held() == [] for s in range(dt))
      assert eng.slots_free() == [eng.prompt_path.host_slots] * dt
  assert any(len(t) < r.max_new_tokens for r, t in zip(mixed, _reference(mixed, eos).values()))


@pytest.mark.timeout(120)
def test_one_host_slot_blocks_prompts_without_loss_or_deadlock():
  """One slot per token worker: a prompt waits until the previous one left the host slots for
  the device, so at most one prompt-phase microbatch exists; all are served, identical."""
  reqs = _mixed(14, seed=1)
  held = []
  with DisaggregatedEngine(CFG, None, _config(2, 2, host_slots=1)) as eng:
    path = eng.prompt_path
    orig = path.inject

    def spy(engine, st):
      orig(engine, st)
      held.append(len(st.path.phases))
    path.inject = spy
    res = eng.serve(reqs)
    assert res.tokens() == _reference(reqs)
    assert max(held) == 1 and eng.prompt_path.host_slots == 1
    _settle(eng)
    assert eng.slots_free() == [1, 1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dp,dt,prompt,token", [(1, 3, 0.02, 0.0005), (3, 1, 0.0005, 0.004)])
def test_paced_slow_and_fast_prompt_side(dp, dt, prompt, token):
  """Paced: a prompt pipeline much slower than the token pipeline, and the reverse (prompts
  pile up in the host slots, waiting for the token side)."""
  reqs = _mixed(12, seed=2)
  cost = TableCostModel(CFG, prompt=prompt, token=token)
  with DisaggregatedEngine(CFG, None, _config(dp, dt, pacing="paced"), cost_model=cost) as eng:
    res = eng.serve(reqs)
    steps = sum(st.steps_done for st in eng.worker_stats() + eng.prompt_path.worker_stats())
  assert res.tokens() == _reference(reqs)
  # A paced run reports its overruns, each one a step that ran: at most every step overran.
  assert res.error is None and 0 <= res.summary["paced_overruns"] <= steps


def _failure_run(failure, recovery="replica", **kw):
  reqs = [Request(i, 0.0, (3 + i, 7, 11 + i, 5), 40) for i in range(12)]
  cost = TableCostModel(CFG, prompt=0.01, token=0.002)
  sc = _config(2, 2, pacing="paced", recovery=recovery, **kw)
  with DisaggregatedEngine(CFG, None, sc, cost_model=cost) as eng:
    eng.generate([[5, 6, 7, 8]] * 3, 3)   # compiled before the measured run
    # (after it: a compile on a loaded machine may outlast a short progress timeout)
    tok_ids = [w.worker_id for w in (eng.runtime.worker(s) for s in range(2))]
    pro_ids = [w.worker_id for w in (eng.prompt_path.runtime.worker(s) for s in range(2))]
    res = eng.serve(reqs, failures=[failure])
    tok, _ = _settle(eng)
    after = ([eng.runtime.worker(s).worker_id for s in range(2)],
             [eng.prompt_path.runtime.worker(s).worker_id for s in range(2)])
  return reqs, res, tok, (tok_ids, pro_ids), after


@pytest.mark.timeout(120)
def test_prompt_worker_failure_redoes_its_prompts_only():
  # Prompt stage 1 dies after its 2nd prefill: later prompts are in flight there.
  reqs, res, tok, before, after = _failure_run(FailureSpec(after_steps=2, stage=1))
  assert res.tokens() == _reference(reqs)
  (ev,) = res.recoveries
  assert ev.strategy == "redo prompts" and ev.stages == (1,) and ev.lost_microbatches >= 1
  assert ev.detection_s > 0
  assert after[0] == before[0]                          # token workers untouched
  assert after[1][0] == before[1][0] and after[1][1] != before[1][1]
  assert all(s.cache_mb_ids == [] for s in tok)


@pytest.mark.timeout(60)
def test_slots_held_past_the_end_of_a_serve_are_still_counted():
  """A microbatch that ends at its first token is dropped with a `free` queued to each token
  worker; the serve then ends at once. Token worker 0 is slow to take that free (stalled), so it
  still holds the only slot when the next serve reserves one: the engine must count it held and
  wait (it once forgot every holding at a serve's start, and the worker refused the slot:
  "token stage 0 refused a host slot the engine counted free")."""
  sc = _config(1, 2, host_slots=1)
  reqs = [Request(0, 0.0, (5, 6, 7), 1)]
  with DisaggregatedEngine(CFG, None, sc) as eng:
    eng.generate([[5, 6, 7]], 2)   # compiled before
    eng.runtime.stall(0, 1.0)      # takes no inbox message for 1 s (reserve is a direct call)
    first = eng.serve(reqs)
    assert eng.runtime.worker(0).slots.held(), "the dropped microbatch's slot is still held"
    assert eng.slots_free()[0] == 0
    second = eng.serve([Request(1, 0.0, (8, 9, 10, 11), 6)])
  assert first.tokens() == _reference(reqs)
  assert second.tokens() == _reference([Request(1, 0.0, (8, 9, 10, 11), 6)])


@pytest.mark.timeout(120)
def test_stalled_prompt_worker_is_replaced():
  """Prompt stage 0 stalls (alive, heartbeating) after its 2nd prefill: the prompt side's
  progress watchdog kills and replaces it, its prompts are redone (before, nothing caught it and
  every prompt waited out the stall)."""
  reqs, res, tok, before, after = _failure_run(
      FailureSpec(after_steps=2, stage=0, kind="stall", stall_s=30.0), progress_timeout_s=2.0)
  assert res.tokens() == _reference(reqs)
  (ev,) = res.recoveries
  assert ev.strategy == "redo prompts" and ev.stages == (0,) and ev.lost_microbatches >= 1
  assert after[0] == before[0]                          # token workers untouched
  assert after[1][0] != before[1][0] and after[1][1] == before[1][1]
  assert res.wall_s < 20                                # not the stall's 30 s
  assert all(s.cache_mb_ids == [] for s in tok)


@pytest.mark.timeout(120)
def test_token_worker_failure_recovers_by_replica():
  # Global stage 3 = token stage 1, crashing after its 30th step: microbatches are in the token
  # pipeline then (each runs 40 steps there).
  reqs, res, tok, before, after = _failure_run(FailureSpec(after_steps=30, stage=3))
  assert res.tokens() == _reference(reqs)
  (ev,) = res.recoveries
  assert ev.stages == (1,) and ev.handled_by.get("replica", 0) >= 1
  assert after[1] == before[1]                          # prompt workers untouched
  assert all(s.cache_mb_ids == [] for s in tok)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kw,match", [
    (dict(prompt_stages=0, token_stages=2), "prompt_stages must be"),
    (dict(prompt_stages=2, token_stages=0), "token_stages must be"),
    (dict(prompt_stages=5, token_stages=4), "need 9 devices"),
    (dict(prompt_stages=2, token_stages=2, tensor=3), "need 12 devices"),
    (dict(prompt_stages=7, token_stages=1), "exceeds the model's 6 layers"),
    (dict(prompt_stages=1, token_stages=1, host_slots=0), "host_slots must be"),
    (dict(prompt_stages=1, token_stages=1, stream_link="carrier_pigeon"), "unknown stream_link"),
])
def test_impossible_splits_are_named(kw, match):
  with pytest.raises(DisaggregationError, match=match):
    DisaggregatedEngine(CFG, None, ServeConfig(program="fake", max_len=64, **kw))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_real_model_tokens_identical():
  """The tiny transformer (not the fake program): streamed prompt caches of real attention
  layers, uneven split (2 prompt stages into 3 token stages), equal the single-device greedy run."""
  import jax  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models import init_params  # pylint: disable=g-import-not-at-top
  from tests.serving_util import greedy_references  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("opt", num_layers=3, max_positions=32)   # prompt (0,2),(2,3) -> 3 x 1 layer
  params = init_params(cfg, jax.random.key(0))
  reqs = [Request(r.request_id, r.arrival, r.prompt, min(r.max_new_tokens, 8))
          for r in _mixed(5, seed=3)]
  serve = ServeConfig(prompt_stages=2, token_stages=3, microbatch_size=3, max_len=32)
  with DisaggregatedEngine(cfg, params, serve) as eng:
    res = eng.serve(reqs)
  assert res.tokens() == greedy_references(cfg, params, reqs, max_len=32)


@pytest.mark.timeout(60)
def test_disaggregation_refuses_swapping_by_name():
  with pytest.raises(ValueError, match="swapping"):
    PipelineEngine(CFG, None, ServeConfig(program="fake", max_len=64, prompt_stages=1,
                                          token_stages=1, swapping="on"))
