"""Data-parallel pipelines (serving/dataparallel.py): R replicas of a serving shape behind one
router, on the fake program.

Oracle: every request's tokens equal `fake_generate` (the fake program's single-device greedy
run), with a stage of one replica killed, with disaggregated replicas, and when a replica stops
for good and its requests are served by the other. Isolation: while replica 0 is between its
failure and its recovery (the recovery event's own timestamps), replica 1's token timestamps
show it generating. Routing: least_loaded spreads an all-at-once workload evenly and sends a
new request to the replica with fewer outstanding ones; round_robin alternates. Bad configs fail
naming the field and the numbers. The slow test runs R=2 on Ray with a real SIGKILL.
"""

import pytest

from dejavu_jax.config import ServeConfig, ServeConfigError, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving.dataparallel import (DataParallelEngine, LeastLoaded, ReplicaLoad,
                                             RoundRobin)
from dejavu_jax.serving.engine import PipelineEngine, make_engine
from dejavu_jax.workload import Request
from tests.ray_util import ray_session  # noqa: F401 (a module fixture)

CFG = tiny_config("opt", num_layers=4, max_positions=128)


def _requests(n=8, new=10, arrival=0.0):
  return [Request(i, arrival, tuple(3 + (11 * i + 7 * j) % 90 for j in range(3 + i % 4)), new)
          for i in range(n)]


def _reference(reqs):
  return {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens)[0] for r in reqs}


def _serve_config(**kw):
  base = dict(num_stages=2, microbatch_size=2, max_len=16, program="fake", recovery="replica",
              heartbeat_s=0.05, heartbeat_timeout_s=0.4, data_parallel=2, pacing="paced")
  return ServeConfig(**{**base, **kw})


def _cost(stages=2):
  # Every stage step lasts at least 20 ms: a replica's 10-token requests take >= 0.4 s, so the
  # replicas overlap for a known number of steps however loaded the machine is.
  return TableCostModel(CFG, prompt=0.04 * stages, token=0.02 * stages)


@pytest.fixture(scope="module")
def dp():
  with make_engine(CFG, None, _serve_config(), cost_model=_cost()) as eng:
    yield eng


def _warm_with_step_timeout(eng, seconds, reqs):
  """Serves `reqs` failure-free (compiling the steps they need, in every replica), then lets a
  stage that stalls past `seconds` stop its replica's loop for good (a compile on a loaded
  machine must not be taken for a hang)."""
  base = eng.serve(reqs)
  assert base.error is None and base.tokens() == _reference(reqs)
  for rep in eng.replicas:
    rep.serve_cfg = rep.serve_cfg.replace(step_timeout_s=seconds)


def _tokens_between(res, replica, lo, hi):
  return [t for rec in res.records if res.replica_of[rec.request_id] == replica
          for t in rec.token_times if lo < t < hi]


@pytest.mark.timeout(120)
def test_a_failure_in_one_replica_leaves_the_other_serving(dp):
  assert isinstance(dp, DataParallelEngine) and len(dp.replicas) == 2
  devs = [{d.id for d in eng.mesh.devices.flat} for eng in dp.replicas]
  assert not devs[0] & devs[1], "replicas must run on disjoint devices"
  reqs = _requests()
  base = dp.serve(reqs)   # failure-free; compiles each replica's buckets
  assert base.error is None and base.tokens() == _reference(reqs)
  res = dp.serve(reqs, failures={0: [FailureSpec(stage=1, after_steps=6)]})
  assert res.error is None
  assert res.tokens() == _reference(reqs)
  (ev,) = res.recoveries
  assert ev.replica == 0 and ev.stages == (1,) and sum(ev.handled_by.values()) >= 1, ev
  # Both replicas served (least_loaded alternates an all-at-once workload), replica 0 after
  # its recovery too.
  assert sorted(res.replica_of.values()) == [0] * 4 + [1] * 4
  assert _tokens_between(res, 0, ev.recovered_at, float("inf"))
  # Replica 1 generated tokens while replica 0 was failed and not yet recovered.
  during = _tokens_between(res, 1, ev.failed_at, ev.recovered_at)
  assert during, (ev, [r.token_times for r in res.records])
  rows = {row["replica"]: row for row in res.summary["replicas"]}
  assert rows[0]["failures"] == 1 and rows[1]["failures"] == 0
  assert rows[0]["completed"] == rows[1]["completed"] == 4
  s = res.summary
  assert s["completed"] == 8 and s["data_parallel"] == 2 and s["routing"] == "least_loaded"
  assert s["total_output_tokens"] == sum(r.max_new_tokens for r in reqs) and s["failures"] == 1
  lines = dp.report(res)
  assert len(lines) == 1 and lines[0].startswith("replica 0: stage(s) [1]: killed"), lines


@pytest.mark.timeout(120)
def test_online_routing_least_loaded_picks_the_idle_replica_and_kill(dp):
  dp.start()
  long = dp.submit(_requests(1)[0].prompt, 12)      # replica 0
  short = dp.submit(_requests(2)[1].prompt, 2)      # replica 1 (0 outstanding there)
  assert short.wait(30) == "finished"
  assert not long.done   # 12 paced tokens take >= 0.48 s; 2 take >= 0.08 s
  nxt = dp.submit(_requests(3)[2].prompt, 6)        # least loaded: replica 1 again
  dp.kill(0, 0)                                     # replica 0's stage 0, mid-stream
  outs = [list(h) for h in (long, short, nxt)]
  res = dp.stop()
  assert res.replica_of == {0: 0, 1: 1, 2: 1}
  assert outs == [fake_generate(CFG, [p], n)[0] for p, n in (
      (_requests(1)[0].prompt, 12), (_requests(2)[1].prompt, 2), (_requests(3)[2].prompt, 6))]
  assert [(e.replica, e.stages) for e in res.recoveries] == [(0, (0,))]


def test_routers_choose_by_load():
  loads = [ReplicaLoad(0, 2, 10), ReplicaLoad(1, 1, 50), ReplicaLoad(2, 1, 40)]
  assert LeastLoaded().choose(loads) == 2          # fewest requests, then fewest tokens
  assert LeastLoaded().choose(loads[:2]) == 1
  assert LeastLoaded().choose([ReplicaLoad(3, 0, 0), ReplicaLoad(1, 0, 0)]) == 1
  rr = RoundRobin()
  assert [rr.choose(loads) for _ in range(4)] == [0, 1, 2, 0]
  assert rr.choose([ReplicaLoad(0, 0, 0), ReplicaLoad(2, 0, 0)]) == 2   # replica 1 left
  assert rr.choose([ReplicaLoad(0, 0, 0), ReplicaLoad(2, 0, 0)]) == 0


@pytest.mark.timeout(120)
def test_round_robin_alternates_and_disaggregated_replicas_recover():
  """Two disaggregated replicas (1 prompt + 1 token stage each), round robin; replica 1's token
  stage (stage 1: prompt stages are numbered first) dies. Both replicas lay their workers on the
  same two devices (as share_devices does for stages), so their programs compile once: disjoint
  devices are the first test's."""
  import jax  # pylint: disable=g-import-not-at-top
  sc = _serve_config(prompt_stages=1, token_stages=1, routing="round_robin", pacing="real")
  reqs = _requests(6, new=10)
  with make_engine(CFG, None, sc, devices=jax.devices()[:2] * 2) as eng:
    res = eng.serve(reqs, failures={1: [FailureSpec(stage=1, after_steps=5)]})
  assert res.error is None and res.tokens() == _reference(reqs)
  assert res.replica_of == {i: i % 2 for i in range(6)}
  (ev,) = res.recoveries
  assert ev.replica == 1 and ev.side == "token", ev
  assert res.summary["token_stages"] == 1 and res.summary["routing"] == "round_robin"


@pytest.mark.timeout(120)
def test_a_replica_lost_for_good_has_its_requests_served_by_the_other():
  """Replica 0's stage 1 stalls past step_timeout_s (the watchdog is set later): its loop stops
  with an error; its unfinished requests are served again by replica 1, tokens unchanged."""
  sc = _serve_config(progress_timeout_s=60.0, recovery="restart")
  reqs = _requests(6, new=10)
  with make_engine(CFG, None, sc, cost_model=_cost()) as eng:
    _warm_with_step_timeout(eng, 1.0, reqs)
    res = eng.serve(reqs, failures=[FailureSpec(stage=1, after_steps=4, kind="stall",
                                                stall_s=3.0)])
  assert res.error is None, res.error
  assert res.tokens() == _reference(reqs)
  # Replica 0 held requests 0, 2, 4 (least_loaded alternates), none finished after 4 steps.
  assert res.summary["rerouted"] == 3 and set(res.replica_of.values()) == {1}
  (err,) = res.summary["replica_errors"]
  assert err.startswith("replica 0: TimeoutError: no pipeline step finished"), err
  assert res.summary["replicas"][0]["error"] is not None
  # What replica 0 had generated is generated again: recomputed, not output.
  assert res.summary["total_recomputed_tokens"] >= 3
  assert res.summary["total_output_tokens"] == 6 * 10


@pytest.mark.timeout(120)
def test_online_a_replica_lost_for_good_reroutes_its_streams():
  """Online mode: replica 0's stage 1 stalls past step_timeout_s after 4 steps, so its loop
  stops for good with tokens already streamed; its requests are resubmitted to replica 1 and
  each caller's handle streams on: every stream equals the single-device greedy run, the
  regenerated prefix was checked and not streamed twice. Then replica 1 is lost too: a request
  in flight ends in "error" saying no replica is left, and a new one is refused."""
  import threading  # pylint: disable=g-import-not-at-top
  sc = _serve_config(progress_timeout_s=60.0, recovery="restart")
  reqs = _requests(4, new=10)
  stall = FailureSpec(stage=1, after_steps=4, kind="stall", stall_s=3.0)
  with make_engine(CFG, None, sc, cost_model=_cost()) as eng:
    _warm_with_step_timeout(eng, 1.0, reqs)
    eng.start(failures={0: [stall]})
    handles = [eng.submit(r.prompt, r.max_new_tokens) for r in reqs]
    # Each consumer records the stream as it reads it (a repeat or a change would show here).
    outs = [[] for _ in handles]
    threads = [threading.Thread(target=lambda h=h, o=o: o.extend(h)) for h, o in zip(handles, outs)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    assert [h.status for h in handles] == ["finished"] * 4, [h.reason for h in handles]
    assert {i: o for i, o in enumerate(outs)} == _reference(reqs)
    moved = [h for h in handles if h.attempts == 2]
    assert [h.request_id for h in moved] == [0, 2] and all(h.replica == 1 for h in moved)
    # Tokens were streamed before replica 0 stopped, regenerated on replica 1 and checked.
    assert all(h.replayed >= 1 for h in moved), [h.replayed for h in moved]
    res = eng.stop()
  assert res.error is None, res.error
  assert res.tokens() == _reference(reqs) and set(res.replica_of.values()) == {1}
  assert res.summary["rerouted"] == 2 and res.summary["replica_errors"][0].startswith("replica 0")
  with make_engine(CFG, None, sc, cost_model=_cost()) as eng:
    _warm_with_step_timeout(eng, 1.0, reqs)
    eng.start(failures={0: [stall], 1: [stall]})
    h = eng.submit(reqs[0].prompt, 10)
    assert h.wait(60) == "error"
    assert "no replica is left to serve it" in h.reason and "replica 1: TimeoutError" in h.reason
    late = eng.submit(reqs[1].prompt, 10)
    assert late.status == "rejected" and "not serving" in late.reason, late.reason
    res = eng.stop()
  assert "replica 0: TimeoutError" in res.error and "replica 1: TimeoutError" in res.error


def test_routed_handle_skips_what_was_streamed_and_refuses_a_different_stream():
  """The handle's rule on its own: a new attempt's tokens over the streamed prefix are checked
  and not re-sent; a different token there ends the request in error, the stream unchanged."""
  import threading  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from dejavu_jax.serving.dataparallel import RoutedHandle  # pylint: disable=g-import-not-at-top
  from dejavu_jax.serving.online import RequestHandle  # pylint: disable=g-import-not-at-top
  run = types.SimpleNamespace(wake=threading.Event(), divergences=0)
  seen = []
  h = RoutedHandle(run, 7, 3, 5)
  h.subscribe(lambda k, v: seen.append(v) if k == "tokens" else None)
  a, b = RequestHandle(None, 0, 3, 5), RequestHandle(None, 0, 3, 5)
  h._attach(a, 0)   # pylint: disable=protected-access
  a._set("running")   # pylint: disable=protected-access
  a._emit([1, 2, 3])   # pylint: disable=protected-access
  a._set("error", "replica 0 stopped")   # pylint: disable=protected-access
  assert h.status == "running" and run.wake.is_set()
  h._attach(b, 1)   # pylint: disable=protected-access
  b._emit([1, 2])   # pylint: disable=protected-access
  b._emit([3, 4, 5])   # pylint: disable=protected-access
  b._set("finished")   # pylint: disable=protected-access
  assert h.status == "finished" and list(h) == [1, 2, 3, 4, 5] and h.replayed == 3
  assert seen == [[1, 2, 3], [4, 5]] and h.attempts == 2
  h2 = RoutedHandle(run, 8, 3, 5)
  c, d = RequestHandle(None, 0, 3, 5), RequestHandle(None, 0, 3, 5)
  h2._attach(c, 0)   # pylint: disable=protected-access
  c._emit([1, 2])   # pylint: disable=protected-access
  c._set("error", "replica 0 stopped")   # pylint: disable=protected-access
  h2._attach(d, 1)   # pylint: disable=protected-access
  d._emit([1, 9, 4])   # pylint: disable=protected-access
  assert h2.status == "error" and "token 9 at position 1 where 2" in h2.reason
  assert list(h2) == [1, 2] and run.divergences == 1


class _IdsTokenizer:
  """The fake program's tokens as text: each id as "<id>" (a prefix of ids decodes to a prefix)."""
  eos_token_id = None

  def decode(self, ids):
    return "".join(f"<{int(i)}>" for i in ids)


@pytest.mark.timeout(180)
def test_openai_server_over_two_replicas_survives_a_kill_and_a_lost_replica():
  """The OpenAI server (server/app.py) over R=2 replicas: four streamed /v1/completions and one
  plain one; replica 1's stage 1 is killed through /admin/kill once the streams have started
  (recovered inside replica 1) and replica 0 is lost for good (a stall past step_timeout_s), so
  its requests are rerouted mid-stream. Every text equals the single-device greedy run, no
  stream carries an error."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  import httpx  # pylint: disable=g-import-not-at-top
  from dejavu_jax.server import app as app_lib, launch  # pylint: disable=g-import-not-at-top
  tok = _IdsTokenizer()
  reqs = _requests(5, new=10)
  sc = _serve_config(progress_timeout_s=60.0, recovery="replica")
  with make_engine(CFG, None, sc, cost_model=_cost()) as eng:
    _warm_with_step_timeout(eng, 1.0, reqs)
    eng.start(failures={0: [FailureSpec(stage=1, after_steps=6, kind="stall", stall_s=3.0)]})
    backend = app_lib.Backend(eng, tok, "fake", default_max_tokens=10)
    srv = launch.ServerThread(app_lib.create_app(backend)).start()
    started = threading.Barrier(5, timeout=60)   # the four streams and the killer
    try:
      def stream(r):
        text, events = "", []
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60, json={
            "model": "fake", "prompt": list(r.prompt), "max_tokens": r.max_new_tokens,
            "stream": True}) as resp:
          assert resp.status_code == 200, resp.read()
          for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
              continue
            ev = json.loads(line[6:])
            events.append(ev)
            new = "".join(c["text"] for c in ev.get("choices", []))
            if new and not text:
              started.wait()
            text += new
        return text, events

      with concurrent.futures.ThreadPoolExecutor(5) as pool:
        futs = [pool.submit(stream, r) for r in reqs[:4]]
        plain = pool.submit(httpx.post, srv.url + "/v1/completions", timeout=60, json={
            "model": "fake", "prompt": list(reqs[4].prompt), "max_tokens": 10})
        started.wait()   # every stream has its first text
        r = httpx.post(srv.url + "/admin/kill", json={"stage": 1, "replica": 1})
        assert r.json() == {"killed": 1, "replica": 1}, r.text
        outs = [f.result(90) for f in futs]
        body = plain.result(90).json()
      metrics = httpx.get(srv.url + "/metrics").text
      summ = httpx.post(srv.url + "/admin/summary", json={
          "ids": [evs[0]["id"] for _, evs in outs] + [body["id"]]}).json()
      bad = httpx.post(srv.url + "/admin/kill", json={"stage": 0, "replica": 2})
    finally:
      srv.stop()
    res = eng.stop()
  want = _reference(reqs)
  assert [t for t, _ in outs] == [tok.decode(want[i]) for i in range(4)]
  assert all("error" not in ev for _, evs in outs for ev in evs)
  assert body["choices"][0]["text"] == tok.decode(want[4]), body
  assert bad.status_code == 400 and "replica must be an integer in 0..1" in bad.text
  # The engine's own records, by the response ids (numbered in the order the server submitted).
  ids = [int(evs[0]["id"].split("-")[1]) for _, evs in outs] + [int(body["id"].split("-")[1])]
  got = res.tokens()
  assert res.error is None and [got[n] for n in ids] == [want[i] for i in range(5)]
  assert res.summary["rerouted"] >= 1 and [e.replica for e in res.recoveries] == [1]
  assert summ["num_requests"] == 5 and summ["total_output_tokens"] == 50, summ
  assert "dejavu_rerouted_requests_total" in metrics and "dejavu_kills_total 1\n" in metrics


def test_ray_spares_reach_every_replicas_runtime(monkeypatch):
  """`ray_spares` (ServeConfig.cluster) is each Ray pipeline's count of warm spares, in every
  replica; no Ray session is started (the session's start and the runtime's are replaced by
  no-ops: what is checked is the runtime the engine built)."""
  import types  # pylint: disable=g-import-not-at-top
  from dejavu_jax.runtime import ray as ray_rt  # pylint: disable=g-import-not-at-top
  sessions = []
  monkeypatch.setattr(ray_rt, "init_ray", lambda address: sessions.append(address) or False)
  monkeypatch.setattr(ray_rt.RayRuntime, "start", lambda self, options: None)
  monkeypatch.setattr(ray_rt.RayRuntime, "close", lambda self: None)
  monkeypatch.setattr(ray_rt.RayRuntime, "worker",
                      lambda self, s: types.SimpleNamespace(worker_id=f"stage{s}"))
  assert ServeConfig().cluster.ray_spares == 1
  for n in (0, 3):
    with make_engine(CFG, None, _serve_config(runtime="ray", ray_spares=n, pacing="real")) as eng:
      assert [type(r.runtime) for r in eng.replicas] == [ray_rt.RayRuntime] * 2
      assert [r.runtime.num_spares for r in eng.replicas] == [n, n]
  assert sessions == [None] * 4   # each replica's runtime asked for the local session
  with pytest.raises(ServeConfigError, match=r"ray_spares: must be an integer >= 0, got -1"):
    _serve_config(runtime="ray", ray_spares=-1)
  from configs import serve_dp_tiny  # pylint: disable=g-import-not-at-top
  from dejavu_jax.studies import runconfig  # pylint: disable=g-import-not-at-top
  c = serve_dp_tiny.get_config()
  c.ray_spares = 0
  assert runconfig.serve_config(c).cluster.ray_spares == 0


def test_bad_configs_name_the_field_and_the_numbers():
  with pytest.raises(ServeConfigError, match="data_parallel: must be an integer >= 1"):
    ServeConfig(data_parallel=0)
  with pytest.raises(ServeConfigError, match=r"routing: unknown routing policy 'random'.*"
                                             r"least_loaded"):
    ServeConfig(routing="random")
  with pytest.raises(ServeConfigError, match=r"data_parallel: 3 replicas x 3 devices \(3 stages "
                                             r"x tensor 1\) need 9 devices; this process has 8"):
    DataParallelEngine(CFG, None, ServeConfig(num_stages=3, data_parallel=3, program="fake"))
  with pytest.raises(ServeConfigError, match=r"need 12 devices; this process has 8"):
    DataParallelEngine(CFG, None, ServeConfig(prompt_stages=1, token_stages=2, data_parallel=4,
                                              program="fake"))
  with pytest.raises(ValueError, match="data_parallel=2: a PipelineEngine is one replica"):
    PipelineEngine(CFG, None, ServeConfig(data_parallel=2, program="fake"))
  from configs import serve_dp_tiny  # pylint: disable=g-import-not-at-top
  from dejavu_jax.studies import runconfig  # pylint: disable=g-import-not-at-top
  c = serve_dp_tiny.get_config()
  c.data_parallel = 5
  with pytest.raises(runconfig.ConfigError, match=r"config.data_parallel: 2 stages x tensor 1 x "
                                                  r"data_parallel 5 need 10 devices"):
    runconfig.validate(c, num_devices=8)
  c.data_parallel, c.fail_replica = 2, 2
  with pytest.raises(runconfig.ConfigError, match=r"fail_replica: replica 2 is outside"):
    runconfig.validate(c, num_devices=8)


def test_bad_failures_and_routers(dp):
  with pytest.raises(ValueError, match=r"failure in replica 2, but there are replicas 0..1"):
    dp.serve(_requests(2), failures={2: [FailureSpec(stage=0, time_s=0.1)]})
  with pytest.raises(ValueError, match=r"failure at stage 2"):
    dp.serve(_requests(2), failures={1: [FailureSpec(stage=2, time_s=0.1)]})

  class Bad:
    name = "bad"

    def choose(self, loads):
      return 7
  old = dp.router
  dp.router = Bad()
  try:
    res = dp.serve(_requests(2), raise_on_error=False)
  finally:
    dp.router = old
  assert "router 'bad' chose replica 7, not one of the live replicas [0, 1]" in res.error


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_two_replicas_with_a_sigkill_in_one(ray_session):
  """R=2 pipelines of 2 actor processes each on Ray; replica 0's stage 1 actor SIGKILLs itself
  after 6 steps and is replaced by that replica's warm spare from its replica, while replica 1's
  actors keep generating; tokens identical, the killed pid gone."""
  from tests.ray_util import pid_gone  # pylint: disable=g-import-not-at-top
  sc = _serve_config(runtime="ray", max_len=32, heartbeat_s=0.1, heartbeat_timeout_s=30.0)
  reqs = _requests(8, new=20)
  with make_engine(CFG, None, sc, cost_model=_cost()) as eng:
    pids = [{w.pid for w in r.runtime._workers} for r in eng.replicas]  # pylint: disable=protected-access
    assert not pids[0] & pids[1] and all(len(p) == 2 for p in pids), pids
    base = eng.serve(reqs)   # failure-free first: every actor compiles its steps
    assert base.error is None and base.tokens() == _reference(reqs)
    res = eng.serve(reqs, failures={0: [FailureSpec(stage=1, after_steps=6)]})
    assert res.error is None and res.tokens() == _reference(reqs)
    (ev,) = res.recoveries
    assert ev.replica == 0 and ev.stages == (1,) and ev.handled_by.get("replica", 0) >= 1, ev
    (kill,) = eng.replicas[0].runtime.kills
    assert pid_gone(kill["pid"]) and not eng.replicas[1].runtime.kills
    assert _tokens_between(res, 1, ev.failed_at, ev.recovered_at), ev
    lines = eng.report(res)
    assert any(x.startswith("replica 0: stage 1: pid") for x in lines), lines


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_experiment_with_two_replicas(tmp_path):
  """configs/serve_dp_tiny.py end to end (the tiny transformer): the baseline and the run with
  replica 0's stage 1 killed both equal the single-device greedy run; each request's replica is
  in requests_*.jsonl."""
  import json  # pylint: disable=g-import-not-at-top
  from configs import serve_dp_tiny  # pylint: disable=g-import-not-at-top
  from dejavu_jax.studies import runner  # pylint: disable=g-import-not-at-top
  lines = []
  c = serve_dp_tiny.get_config()
  summaries = runner.run_experiment(c, str(tmp_path), log=lines.append, progress=False)
  assert [s["identical"] for s in summaries] == [True, True], lines
  (s,) = [x for x in summaries if not x["baseline"]]
  assert s["system"] == "pipeline_D2x2" and s["failures"] == 1 and s["data_parallel"] == 2
  assert [r["failures"] for r in s["replicas"]] == [1, 0]
  recs = [json.loads(x) for x in open(tmp_path / "requests_rate20.jsonl")]
  # Least-loaded routing follows the replicas' pace (replica 0 recovers, so it may take fewer):
  # every request has a replica, both served, and the jsonl agrees with the summary's counts.
  served = [r["replica"] for r in recs]
  assert len(served) == 8 and set(served) == {0, 1}, served
  assert [served.count(i) for i in (0, 1)] == [r["requests"] for r in s["replicas"]], served
  assert any(x.startswith("  replica 0: stage(s) [1]: killed") for x in lines), lines


def test_the_planners_recommendation_is_a_serve_config():
  """The planner's "colocated D x R" candidate names the fields that serve it here."""
  from dejavu_jax.planner import Candidate  # pylint: disable=g-import-not-at-top
  fields = Candidate("colocated", 8, depth=2, replicas=2).serve_overrides()
  assert fields == {"num_stages": 2, "data_parallel": 2, "microbatch_size": 8, "tensor": 1}
  sc = ServeConfig(program="fake", **fields)
  assert sc.topology.data_parallel == 2 and sc.topology.num_stages == 2
  split = Candidate("disaggregated", 4, Dp=1, Dt=3).serve_overrides(tensor=2)
  assert split == {"prompt_stages": 1, "token_stages": 3, "microbatch_size": 4, "tensor": 2}
