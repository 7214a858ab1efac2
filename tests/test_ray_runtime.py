"""The Ray runtime (runtime/ray.py): stage workers as actor processes, failures as real SIGKILLs.

One Ray session for the module (actors start in seconds each on this machine, so the cases are
combined: each engine serves twice, with different failures). Oracle: every request's tokens
equal `fake_generate` (the fake program's single-device greedy tokens, computed by hand), for
D = 2, 3, 4 and after killing the last stage, stage 0 and a middle stage under replica,
snapshot and restart, and after a kill during a recovery. A killed actor's pid must be gone, and
the session must leave no process behind, nor a shm segment in /dev/shm. The session listens
on loopback only (last test).
"""

import collections

import numpy as np
import pytest
import ray

from configs import serve_ray_tiny
from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.models import init_params
from dejavu_jax.models.checkpoint import save_params
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.serving import cache_oracle
from dejavu_jax.studies import runner
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request
from tests.ray_util import (is_loopback, pid_gone, ray_session,  # noqa: F401 (a module fixture)
                            session_pids, shm_segments, tcp_listeners)
from tests.serving_util import greedy_references

CFG = tiny_config("opt", num_layers=4, max_positions=128)


def _requests(n=6, new=50):
  rng = np.random.default_rng(n)
  return [Request(i, 0.0, tuple(int(t) for t in rng.integers(3, 128, 2 + i % 4)), new)
          for i in range(n)]


def _reference(reqs):
  return {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens)[0] for r in reqs}


def _engine(stages, recovery, **kw):
  # A 30 s heartbeat timeout: every SIGKILL here must be detected by Ray's actor-death notice
  # (and a compile holding an actor's GIL on a loaded machine is never mistaken for a death).
  # Paced: every stage step lasts 6 ms (token) / 12 ms (prompt), so a run lasts 1-2 s and
  # failures by time land mid-run however fast or loaded the machine is.
  cost = TableCostModel(CFG, prompt=0.012 * stages, token=0.006 * stages)
  serve = ServeConfig(num_stages=stages, microbatch_size=3, max_len=64, heartbeat_s=0.1,
                      heartbeat_timeout_s=30.0, recovery=recovery, program="fake",
                      pacing="paced", runtime="ray", **kw)
  return PipelineEngine(CFG, None, serve, cost_model=cost)


def _check(eng, reqs, res, kills_before):
  assert res.error is None
  assert res.tokens() == _reference(reqs)
  # One node: every Worker message, step and event went on lanes (runtime/ray_lane.py) with
  # the shm transport; the other transports keep Ray's calls.
  lanes = eng.runtime.transport == "shm"
  assert (eng.runtime.lane_events > 0) == lanes
  assert all((w.lane is not None) == lanes for w in eng.runtime._workers)  # pylint: disable=protected-access
  for k in eng.runtime.kills[kills_before:]:
    assert pid_gone(k["pid"]), f"killed actor pid {k['pid']} still exists"
    assert k["pid"] not in [w.pid for w in eng.runtime._workers]  # pylint: disable=protected-access


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_d2_replica_last_stage_then_stage0_with_a_kill_during_recovery(ray_session):
  reqs = _requests()
  with _engine(2, "replica", cache_probe=True) as eng:
    base = eng.serve(reqs)   # the cache oracle's reference (probes travel on the actors' events)
    _check(eng, reqs, base, 0)
    res = eng.serve(reqs, failures=[FailureSpec(stage=1, after_steps=30)])   # armed: self-kill
    _check(eng, reqs, res, 0)
    (ev,) = res.recoveries
    assert ev.stages == (1,) and ev.handled_by == {"replica": 2}, ev
    assert ev.restored_microbatches == 2, ev
    # The replacement actor's caches, sent over the transport from the holder's replica, equal
    # the failure-free run's at the restored step, row by row.
    verdict = cache_oracle.compare(base, res)
    assert verdict.identical is True and verdict.by_point.get("replica", 0) >= 2, \
        verdict.describe()
    # SIGKILL of stage 0 from the driver at a time, and of stage 1 (which holds stage 0's
    # replica) while that recovery loads caches: the chain falls back to restart.
    n = len(eng.runtime.kills)
    res = eng.serve(reqs, failures=[FailureSpec(time_s=0.2, stage=0),
                                    FailureSpec(stage=1, during_recovery=True)])
    _check(eng, reqs, res, n)
    what = (eng.runtime.kills[n:], res.recoveries)
    assert len(eng.runtime.kills) - n == 2, what
    assert sum(sum(e.handled_by.values()) for e in res.recoveries) >= 2, what
    assert any("restart" in e.handled_by for e in res.recoveries), what
    pids = session_pids() | {k["pid"] for k in eng.runtime.kills}
  # The replica writes' shm segments: none of them outlives the pipeline, killed senders' too.
  assert not shm_segments(pids), shm_segments(pids)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_d3_snapshot_middle_stage(ray_session, tmp_path):
  reqs = _requests(new=56)
  with _engine(3, "snapshot", snapshot_every=4, snapshot_dir=str(tmp_path)) as eng:
    # Failure-free first: it compiles, and a fresh process's first orbax save takes seconds.
    short = _requests(new=20)
    res = eng.serve(short)
    _check(eng, short, res, 0)
    # Stage 1 dies after 80 of its ~114 steps (>= 0.5 s of 6 ms paced steps: several snapshots
    # complete by then).
    res = eng.serve(reqs, failures=[FailureSpec(stage=1, after_steps=80)])
    _check(eng, reqs, res, 0)
    (ev,) = res.recoveries
    assert ev.stages == (1,) and ev.handled_by.get("snapshot", 0) >= 1, ev


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_d4_restart_stage0_and_last_over_jax_transfer(ray_session):
  reqs = _requests(n=9)
  with _engine(4, "restart", ray_transport="jax_transfer") as eng:
    res = eng.serve(reqs, failures=[FailureSpec(time_s=0.3, stage=0),
                                    FailureSpec(stage=3, after_steps=40)])
    _check(eng, reqs, res, 0)
    assert sorted(s for e in res.recoveries for s in e.stages) == [0, 3]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_serve_experiment_on_ray(ray_session, tmp_path):
  lines = []
  c = serve_ray_tiny.get_config()
  summaries = runner.run_experiment(c, str(tmp_path), log=lambda *a: lines.append(" ".join(
      str(x) for x in a)))
  (s,) = [x for x in summaries if not x["baseline"]]   # the failure-free baseline runs too
  assert s["completed"] == c.num_requests and s["failures"] == 1
  text = "\n".join(lines)
  assert "pid" in text and "killed by SIGKILL" in text, text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_model_replacement_loads_its_stage_from_the_checkpoint(ray_session, tmp_path):
  """The tiny transformer on Ray: stage 1 SIGKILLed; its replacement reads only its stage's
  weights from the orbax checkpoint; tokens equal the single-device greedy run."""
  import jax  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("opt", num_layers=2, max_positions=128)
  params = init_params(cfg, jax.random.key(3))
  save_params(str(tmp_path / "orbax"), params)
  reqs = [Request(i, 0.0, tuple(range(5 + i, 12 + i)), 16) for i in range(4)]
  serve = ServeConfig(num_stages=2, microbatch_size=2, max_len=64, heartbeat_s=0.1,
                      heartbeat_timeout_s=30.0, recovery="restart", runtime="ray")
  with PipelineEngine(cfg, params, serve, params_checkpoint=str(tmp_path / "orbax")) as eng:
    res = eng.serve(reqs, failures=[FailureSpec(stage=1, after_steps=6)])
    assert res.error is None
    assert res.tokens() == greedy_references(cfg, params, reqs)
    (ev,) = res.recoveries
    assert ev.stages == (1,)
    assert pid_gone(eng.runtime.kills[0]["pid"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_session_listens_on_loopback_only(ray_session):
  """Every listening TCP socket of the session's processes (driver, GCS, raylet, agents, the
  actors of an open pipeline and the pool's, their `jax.experimental.transfer` servers) is on
  loopback. Runs last: the module's pooled actors are alive by then."""
  with _engine(2, "replica", ray_transport="jax_transfer") as eng:
    socks = tcp_listeners()
    names = {name for _, name, _, _ in socks}
    # Ray's servers are really there (gRPC, with an IPv6 socket: "::" before this was fixed).
    assert {"gcs_server", "raylet"} <= names, socks
    # Each stage actor listens twice: its Ray worker gRPC server and its transfer server.
    per_pid = collections.Counter(pid for pid, _, _, _ in socks)
    actors = [w.pid for w in eng.runtime._workers]  # pylint: disable=protected-access
    assert all(per_pid[pid] >= 2 for pid in actors), (actors, socks)
    wide = [s for s in socks if not is_loopback(s[2])]
    assert not wide, f"listening beyond loopback: {wide}"
    assert ray.util.get_node_ip_address() == "127.0.0.1"
