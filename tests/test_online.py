"""Online mode (serving/online.py) on the fake program: requests submitted from several threads
while the loop runs stream exactly `fake_generate`'s tokens; a stage killed mid-stream changes
none of them; cancellation frees the slot; a full queue and bad requests are rejected by name;
the replay mode still serves on the same engine afterwards."""

import threading
import time

import pytest

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request

CFG = tiny_config("opt", num_layers=4, max_positions=128)


def _prompt(i, n=5):
  return tuple(3 + (11 * i + 7 * j) % 90 for j in range(n + i % 4))


@pytest.fixture(scope="module")
def eng():
  sc = ServeConfig(num_stages=2, microbatch_size=2, max_len=64, program="fake",
                   recovery="replica", heartbeat_s=0.03, heartbeat_timeout_s=0.3, max_pending=2)
  with PipelineEngine(CFG, None, sc) as e:
    yield e


def _counts(eng):
  return eng.online.call(lambda e, st: (len(st.sched.pending), len(st.sched.in_flight)))


@pytest.mark.timeout(120)
def test_concurrent_streams_equal_the_oracle_and_replay_still_serves(eng):
  eng.start()
  got, handles = {}, {}

  def client(i):
    h = handles[i] = eng.submit(_prompt(i), 6 + i)
    got[i] = list(h)   # streamed token by token

  threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
    time.sleep(0.01)
  for t in threads:
    t.join(60)
  res = eng.stop()
  for i in range(4):   # at most 4 at once: 2 run alone, 2 wait (max_pending)
    assert got[i] == fake_generate(CFG, [_prompt(i)], 6 + i)[0], i
    assert handles[i].status == "finished"
    assert len(handles[i].token_times) == len(got[i])
  assert res.summary["num_requests"] == 4 and res.error is None
  assert eng.online is None
  # The same engine replays a workload afterwards (the loop is one).
  r = eng.serve([Request(0, 0.0, _prompt(1), 4)])
  assert r.tokens()[0] == fake_generate(CFG, [_prompt(1)], 4)[0]


@pytest.mark.timeout(120)
def test_kill_mid_stream_changes_no_token(eng, caplog):
  eng.start()
  hs = [eng.submit(_prompt(i), 40) for i in range(4)]
  first = next(iter(hs[0]))   # streaming has begun
  with caplog.at_level("WARNING", logger="dejavu_jax.online"):
    eng.online.kill(1)
    out = [list(h) for h in hs]
    res = eng.stop()
  assert out[0][0] == first
  for i, toks in enumerate(out):
    assert toks == fake_generate(CFG, [_prompt(i)], 40)[0], i
    assert hs[i].status == "finished"
  assert len(res.recoveries) == 1 and res.recoveries[0].stages == (1,)
  text = caplog.text
  assert "kill: stage 1 killed" in text and "detected:" in text and "resumed:" in text


@pytest.mark.timeout(120)
def test_failure_given_at_start_is_recovered(eng):
  """A failure from the config (engine.start(failures)): stage 0 dies after 12 of its steps."""
  from dejavu_jax.fault.inject import FailureSpec  # pylint: disable=g-import-not-at-top
  eng.start([FailureSpec(stage=0, after_steps=12)])
  hs = [eng.submit(_prompt(i), 30) for i in range(3)]
  out = [list(h) for h in hs]
  res = eng.stop()
  assert [len(r.stages) for r in res.recoveries] == [1] and res.recoveries[0].stages == (0,)
  for i, toks in enumerate(out):
    assert toks == fake_generate(CFG, [_prompt(i)], 30)[0], i


@pytest.mark.timeout(120)
def test_cancel_frees_the_slot_and_others_finish(eng):
  eng.start()
  long = eng.submit(_prompt(0), 55)
  other = eng.submit(_prompt(1), 8)
  it = iter(long)
  next(it)
  assert _counts(eng)[1] >= 1
  long.cancel()
  assert long.wait(10) == "cancelled"
  assert list(other) == fake_generate(CFG, [_prompt(1)], 8)[0]
  deadline = time.monotonic() + 10
  while _counts(eng) != (0, 0) and time.monotonic() < deadline:
    time.sleep(0.01)
  assert _counts(eng) == (0, 0)   # nothing queued, no microbatch in flight
  res = eng.stop()
  assert [r.request_id for r in res.records] == [other.request_id]   # cancelled: left out


@pytest.mark.timeout(120)
def test_full_queue_and_bad_requests_rejected(eng):
  eng.start()
  bad = eng.submit((5,) * 60, 10)
  assert bad.status == "rejected" and "longer than the context of 64" in bad.reason
  zero = eng.submit(_prompt(0), 0)
  assert zero.status == "rejected" and "max_new_tokens" in zero.reason
  # Ten at once (submitted from the loop thread, so they arrive in one turn): 2 stages x 2 rows
  # run, 2 wait (max_pending), 4 are refused.
  hs = eng.online.call(lambda e, st: [e.submit(_prompt(i), 20) for i in range(10)])
  status = [h.wait(30) for h in hs]
  assert status.count("rejected") == 4, status
  assert all("queue full" in h.reason for h in hs if h.status == "rejected")
  assert status.count("finished") == 6
  res = eng.stop()
  assert res.summary["rejected_queue_full"] == 4
  with pytest.raises(RuntimeError, match="engine.start"):
    eng.submit(_prompt(0), 3)
