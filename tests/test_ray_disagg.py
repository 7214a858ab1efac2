"""Disaggregation and swapping on the Ray runtime: every worker an actor process, failures real
SIGKILLs.

One Ray session for the module (actors start in seconds each here; closed pipelines' actors are
pooled, so later tests start none). Oracle: every request's tokens equal the single-device
greedy run (`fake_generate` for the fake program, `generate` for the tiny model of the serve
experiment). Disaggregation: a prompt actor SIGKILLed (only its prompts are redone, the token
actors are the same processes) and a token actor SIGKILLed (its replica restores it); every
prompt packet landed in a token actor's host slot one layer at a time, sent by a prompt actor's
process (not the driver) through the shm transport's segment (all actors on one node), every
host slot is free at the end, and no segment is left in /dev/shm after the pipeline closes
(with the object_store transport the packets ride in the call). Swapping: the policy runs
inside each actor (its swap-ins and event log come from the actors), a swapped actor is
SIGKILLed and restored from its replica. Killed pids are gone and no Ray process is left
behind.
"""

import time

import numpy as np
import pytest

from configs import serve_ray_disagg_tiny
from dejavu_jax import costmodel as cm
from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.studies import runner
from dejavu_jax.workload import Request
from tests.ray_util import (pid_gone, ray_session, session_pids,  # noqa: F401 (a module fixture)
                            shm_segments)
from tests.test_swapping import _check_prefetch_order

CFG = tiny_config("opt", num_layers=4, max_positions=128)


def _reference(reqs):
  return {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens)[0] for r in reqs}


def _ids(rt, n):
  return [rt.worker(s).worker_id for s in range(n)]


def _settled(eng, dt):
  """Waits until the last frees landed; returns each token actor's held host slots."""
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    if not any(s.inbox or s.cache_mb_ids for s in eng.worker_stats()):
      break
    time.sleep(0.05)
  return [eng.runtime.worker(s).slots_held() for s in range(dt)]


def _check_landed(eng, prompt_pids, channel="shm"):
  """Every packet in a token actor's host slots is one layer of that actor's range, sent by a
  prompt actor's process over `channel`; each microbatch's layers arrive in layer order."""
  for s, (a, b) in enumerate(eng.plan.ranges):
    log = eng.runtime.worker(s).landed_log()
    assert log, f"nothing landed on token stage {s}"
    by_mb = {}
    for mb, (lo, hi), (_, pid), how in log:
      assert hi - lo == 1 and a <= lo < b, (s, mb, lo, hi)
      assert pid in prompt_pids, f"token stage {s}: a packet from pid {pid}, not a prompt actor"
      assert how == channel, f"token stage {s}: a packet landed over {how}, not {channel}"
      by_mb.setdefault(mb, []).append(lo)
    for mb, layers in by_mb.items():
      assert layers == sorted(layers), (s, mb, layers)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_disaggregation_prompt_and_token_sigkills(ray_session):
  reqs = [Request(i, 0.0, (3 + i, 7, 11 + i, 5), 40) for i in range(12)]
  # Paced: a prompt step lasts 20 ms, a token stage's step 6 ms, whatever the machine's load.
  cost = TableCostModel(CFG, prompt=0.02, token=0.012)
  sc = ServeConfig(prompt_stages=1, token_stages=2, host_slots=2, microbatch_size=3, max_len=64,
                   program="fake", heartbeat_s=0.1, heartbeat_timeout_s=30.0,
                   recovery="replica", pacing="paced", runtime="ray")
  phases, pids = [], set()
  with PipelineEngine(CFG, None, sc, cost_model=cost) as eng:
    path, dt = eng.prompt_path, 2
    orig = path.inject

    def spy(engine, st):
      orig(engine, st)
      phases.append(len(st.path.phases))
    path.inject = spy
    prompt_pids = {path.runtime.pid(0)}
    tok0, pro0 = _ids(eng.runtime, dt), _ids(path.runtime, 1)
    # The prompt actor SIGKILLs itself right after its 2nd prefill (the 2nd never hands on).
    res = eng.serve(reqs, failures=[FailureSpec(stage=0, after_steps=2)])
    assert res.error is None and res.tokens() == _reference(reqs)
    (ev,) = res.recoveries
    assert ev.strategy == "redo prompts" and ev.stages == (0,) and ev.lost_microbatches >= 1, ev
    assert _ids(eng.runtime, dt) == tok0                 # the token actors are untouched
    assert _ids(path.runtime, 1) != pro0
    assert pid_gone(path.runtime.kills[0]["pid"])
    prompt_pids.add(path.runtime.pid(0))
    # Backpressure: never more prompts in flight than host slots.
    assert max(phases) <= path.host_slots
    assert _settled(eng, dt) == [[], []] and eng.slots_free() == [2, 2]
    # Token stage 1 (global stage 2) SIGKILLs itself after its 30th step; its replica (on token
    # stage 0) restores it; the prompt actor is untouched.
    pro1 = _ids(path.runtime, 1)
    res = eng.serve(reqs, failures=[FailureSpec(stage=2, after_steps=30)])
    assert res.error is None and res.tokens() == _reference(reqs)
    (ev,) = res.recoveries
    assert ev.stages == (1,) and ev.handled_by.get("replica", 0) >= 1, ev
    assert _ids(path.runtime, 1) == pro1
    assert pid_gone(eng.runtime.kills[0]["pid"])
    assert _settled(eng, dt) == [[], []] and eng.slots_free() == [2, 2]
    _check_landed(eng, prompt_pids)
    pids = session_pids() | {k["pid"] for k in eng.runtime.kills + path.runtime.kills}
  # Each receiver unlinked its senders' segments on their first landing; the killed prompt
  # actor's and the senders' to the killed token actor are gone too.
  assert not shm_segments(pids), shm_segments(pids)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_disaggregation_object_store_channel(ray_session):
  """With another transport than shm the prompt packets ride in the call (`put_layer`), as
  across nodes; tokens identical (the pooled actors of the test above: no process starts)."""
  reqs = [Request(i, 0.0, (5 + i, 9, 2 + i), 16) for i in range(6)]
  sc = ServeConfig(prompt_stages=1, token_stages=2, host_slots=2, microbatch_size=3, max_len=64,
                   program="fake", heartbeat_s=0.1, heartbeat_timeout_s=30.0,
                   recovery="replica", runtime="ray", ray_transport="object_store")
  with PipelineEngine(CFG, None, sc) as eng:
    path = eng.prompt_path
    prompt_pids = {path.runtime.pid(0)}
    res = eng.serve(reqs)
    assert res.error is None and res.tokens() == _reference(reqs)
    assert _settled(eng, 2) == [[], []]
    _check_landed(eng, prompt_pids, channel="object_store")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_swapping_sigkill_recovered_from_replica(ray_session):
  reqs = [Request(i, 0.0, (3 + i, 7, 11 + i), 60) for i in range(9)]
  cost = TableCostModel(CFG, prompt=0.024, token=0.012)
  sc = ServeConfig(num_stages=3, microbatch_size=3, max_len=128, heartbeat_s=0.1,
                   heartbeat_timeout_s=30.0, recovery="replica", program="fake",
                   pacing="paced", swapping="on", runtime="ray")
  with PipelineEngine(CFG, None, sc, cost_model=cost, swap_link=cm.Link("fast", 1e15)) as eng:
    assert eng.swap_choice.swapping
    res = eng.serve(reqs, failures=[FailureSpec(stage=1, after_steps=60)])
    assert res.error is None and res.tokens() == _reference(reqs)
    (ev,) = res.recoveries
    assert ev.stages == (1,) and ev.handled_by.get("replica", 0) >= 1, ev
    assert ev.restored_microbatches >= 1, ev
    assert pid_gone(eng.runtime.kills[0]["pid"])
    # The policy ran in the actors: three microbatches over two buffers were swapped in there,
    # each before the step that needed it.
    swaps = [w.stats().swap for w in (eng.runtime.worker(s) for s in range(3))]
    assert all(sw.get("swap_ins", 0) > 0 for sw in swaps), swaps
    for s in range(3):
      _check_prefetch_order(eng.runtime.worker(s).swap_events)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_experiment_disaggregated_on_ray(ray_session, tmp_path):
  """The config's run (failure-free baseline, then a SIGKILL on each side), on the fake program
  here (the config's tiny model compiles for a minute per actor on a loaded machine)."""
  lines = []
  c = serve_ray_disagg_tiny.get_config()
  c.program = "fake"
  c.heartbeat_timeout_s = 30.0   # Ray's death notice detects each kill; no false deaths under load
  summaries = runner.run_experiment(c, str(tmp_path), log=lambda *a: lines.append(" ".join(
      str(x) for x in a)))
  text = "\n".join(lines)
  (s,) = [x for x in summaries if not x["baseline"]]
  assert s["completed"] == c.num_requests and s["failures"] == 2, text
  assert all(x["identical"] for x in summaries), text
  assert "prompt stage 0: pid" in text and "token stage 1: pid" in text, text
  assert "prompt stage(s) [0]: killed" in text and "token stage(s) [1]: killed" in text, text
  assert "redo prompts" in text and "replica" in text, text
  # The default transport (shm), all actors on this node: every prompt packet through a segment.
  assert "prompt packets landed (" in text and " over shm)" in text, text
  assert "over object_store" not in text, text
  assert not any(x["warnings"] for x in summaries), text
  assert np.sum(["identical to the single-device greedy run" in x for x in lines]) == 2, text
