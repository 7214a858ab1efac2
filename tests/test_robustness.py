"""Bad input, bad configuration, overload and engine errors, on the fake stage program (tokens
computable by hand with `fake_generate`, steps in milliseconds): each bad request is rejected by
name while the others finish, each bad setting fails at construction naming its field, a bounded
queue rejects under overload, and an engine error never loses what was already served."""

import json
import math
import os
import time
import tracemalloc

import jax
import pytest

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.fault.controller import FailureSpec
from dejavu_jax.models import init_params
from dejavu_jax.models.checkpoint import save_params
from dejavu_jax.models.generate import validate_prompts
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax import metrics
from dejavu_jax.serving.engine import EngineError, PipelineEngine
from dejavu_jax.workload import Request

CFG = tiny_config("opt", num_layers=4, max_positions=128)
FAKE = dict(program="fake", num_stages=2, microbatch_size=2, max_len=64)


def _reference(req):
  return fake_generate(CFG, [req.prompt], req.max_new_tokens)[0]


def _strict_json(text):
  def refuse(name):
    raise ValueError(f"not JSON: {name}")
  return json.loads(text, parse_constant=refuse)


# ---- bad requests ----
BAD = [
    (Request(10, math.nan, (5, 6), 3), "arrival"),
    (Request(11, math.inf, (5, 6), 3), "arrival"),
    (Request(12, -0.5, (5, 6), 3), "arrival"),
    (Request(13, 0.0, ("5", 6), 3), "token id '5'"),
    (Request(14, 0.0, (5.7, 6), 3), "token id 5.7"),
    (Request(15, 0.0, (5, 6), None), "max_new_tokens"),
    (Request(16, 0.0, (5, 6), 0), "max_new_tokens"),
    (Request(17, 0.0, (5, 6), -2), "max_new_tokens"),
    (Request(18, 0.0, (5, 6), 2.5), "max_new_tokens"),
    (Request(19, 0.0, 5, 3), "not a sequence"),
    (Request(20, 0.0, None, 3), "not a sequence"),
    (Request(21, 0.0, "abc", 3), "not a sequence"),
    (Request(22, 0.0, (5, True), 3), "token id True"),
]


@pytest.mark.timeout(120)
def test_bad_requests_are_rejected_by_name_while_the_others_finish():
  good = [Request(i, 0.01 * i, (5 + i, 7, 9), 4 + i) for i in range(4)]
  dup = Request(1, 0.2, (40, 41), 6)   # request 1's id again, arriving later
  with PipelineEngine(CFG, None, ServeConfig(**FAKE)) as eng:
    res = eng.serve(good + [dup] + [r for r, _ in BAD])   # a NaN arrival once spun forever
  assert res.tokens() == {r.request_id: _reference(r) for r in good}
  assert res.error is None
  for req, field in BAD:
    reason = res.rejected[req.request_id]
    assert reason.startswith(f"request {req.request_id}:") and field in reason, reason
  assert "request_id 1 is already used" in res.rejected[1]
  assert res.summary["rejected"] == len(BAD) + 1 and res.summary["completed"] == len(good)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("prompts,new,match", [
    ([[5, 6]], 2.5, "max_new_tokens must be >= 1 and an integer, got 2.5"),
    ([[5, 6]], None, "max_new_tokens .* got None"),
    ([["5", 6]], 3, "request 0: prompt has token id '5' \\(str\\), not an integer"),
    ([[5.7]], 3, "token id 5.7 \\(float\\)"),
    (5, 3, "prompts must be a sequence"),
    ([5], 3, "request 0: prompt is not a sequence of token ids"),
])
def test_generate_raises_value_error_naming_the_problem(prompts, new, match):
  with PipelineEngine(CFG, None, ServeConfig(**FAKE)) as eng:
    with pytest.raises(ValueError, match=match):
      eng.generate(prompts, new)
    assert eng.generate([[5, 6]], 3) == fake_generate(CFG, [[5, 6]], 3)   # still serving


def test_validate_prompts_never_truncates():
  for prompts, new in [([[5.0]], 2), ([[5]], 2.0), ([[5]], True), ([(5, 10**30)], 2)]:
    with pytest.raises(ValueError):
      validate_prompts(CFG, prompts, new)
  import numpy as np  # pylint: disable=g-import-not-at-top
  validate_prompts(CFG, [np.array([5, 6], np.int32), (np.int64(7),)], np.int64(3))
  with pytest.raises(ValueError, match="dtype float"):
    validate_prompts(CFG, [np.array([5.0, 6.0])], 3)


# ---- configuration ----
@pytest.mark.parametrize("kw,field", [
    (dict(max_len=0), "max_len"), (dict(max_len=-3), "max_len"),
    (dict(heartbeat_s=0.0), "heartbeat_s"), (dict(heartbeat_s=-1.0), "heartbeat_s"),
    (dict(heartbeat_timeout_s=0.0), "heartbeat_timeout_s"),
    (dict(heartbeat_timeout_s=math.nan), "heartbeat_timeout_s"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=math.nan), "top_p"),
    (dict(step_timeout_s=0), "step_timeout_s"), (dict(step_timeout_s=-1.0), "step_timeout_s"),
    (dict(microbatch_size=0), "microbatch_size"), (dict(num_stages=0), "num_stages"),
    (dict(max_pending=0), "max_pending"), (dict(max_pending=2.5), "max_pending"),
])
def test_bad_serve_config_names_the_field(kw, field):
  with pytest.raises(ValueError, match=field):
    ServeConfig(**kw)


def test_engine_config_checked_against_the_model(tmp_path):
  with pytest.raises(ValueError, match="top_k 129 exceeds the model's vocabulary of 128"):
    PipelineEngine(CFG, None, ServeConfig(top_k=129, **FAKE))
  with pytest.raises(ValueError, match="params_checkpoint: no checkpoint at"):
    PipelineEngine(CFG, None, ServeConfig(**FAKE), params_checkpoint=str(tmp_path / "none"))
  other = tiny_config("opt", num_layers=4, max_positions=128, hidden_size=32)
  save_params(str(tmp_path / "other"), init_params(other, jax.random.key(0)))
  with pytest.raises(ValueError, match=r"params_checkpoint .*other.*embedding.* has shape \(130, 32\) but "
                                       r"the model needs \(130, 64\)"):
    PipelineEngine(CFG, None, ServeConfig(**FAKE), params_checkpoint=str(tmp_path / "other"))
  save_params(str(tmp_path / "mine"), init_params(CFG, jax.random.key(0)))
  with PipelineEngine(CFG, None, ServeConfig(**FAKE), params_checkpoint=str(tmp_path / "mine")):
    pass


@pytest.mark.parametrize("time_s,stage,field", [
    (math.nan, 1, "time_s"), (math.inf, 1, "time_s"), (-0.1, 1, "time_s"), (0.1, -1, "stage"),
    (0.1, 1.5, "stage")])
def test_bad_failure_spec(time_s, stage, field):
  with pytest.raises(ValueError, match=f"FailureSpec {field}"):
    FailureSpec(time_s, stage)


# ---- nothing served is lost ----
def _fail_at(eng, mb_id, action):
  def hook(stage, msg):
    if msg.mb_id == mb_id:
      action()
  eng.runtime.worker(1).after_step.append(hook)
  return hook


def _boom():
  raise OSError("link down")


@pytest.mark.timeout(120)
def test_stage_error_keeps_what_was_served():
  # One row per microbatch, all arriving at once: microbatch base + k serves request k, two in
  # flight; when microbatch 3 fails on stage 1, requests 0 and 1 are done.
  reqs = [Request(i, 0.0, (5 + i, 9), 4) for i in range(6)]
  with PipelineEngine(CFG, None, ServeConfig(**{**FAKE, "microbatch_size": 1})) as eng:
    hook = _fail_at(eng, eng._next_mb_id + 3, _boom)   # pylint: disable=protected-access
    with pytest.raises(EngineError, match="stage 1 failed on microbatch .*OSError") as info:
      eng.serve(reqs)
    res = info.value.result
    assert isinstance(info.value, RuntimeError) and "link down" in res.error
    done = {r.request_id: r.tokens for r in res.records if r.done}
    assert {0, 1} <= set(done) and 3 not in done
    assert done == {i: _reference(reqs[i]) for i in done}
    assert res.summary["completed"] == len(done) and "link down" in res.summary["error"]
    # Returned instead of raised when asked; and the engine still serves afterwards.
    hook2 = _fail_at(eng, eng._next_mb_id + 2, _boom)   # pylint: disable=protected-access
    res = eng.serve(reqs, raise_on_error=False)
    assert "link down" in res.error and res.tokens()[0] == _reference(reqs[0])
    eng.runtime.worker(1).after_step[:] = [h for h in eng.runtime.worker(1).after_step
                                           if h not in (hook, hook2)]
    res = eng.serve(reqs)
    assert res.error is None and res.tokens() == {r.request_id: _reference(r) for r in reqs}


@pytest.mark.timeout(120)
def test_hang_keeps_what_was_served():
  reqs = [Request(i, 0.0, (5 + i, 9), 3) for i in range(4)]
  serve = ServeConfig(**{**FAKE, "microbatch_size": 1})
  with PipelineEngine(CFG, None, serve) as eng:
    eng.warmup()   # compiles can outlast a 0.5 s timeout: tighten it only once they are done
    eng.serve_cfg = serve.replace(step_timeout_s=0.5)
    _fail_at(eng, eng._next_mb_id + 2, lambda: time.sleep(1.5))  # pylint: disable=protected-access
    with pytest.raises(TimeoutError, match="no pipeline step finished in 0.5 s") as info:
      eng.serve(reqs)
    res = info.value.result
    done = {r.request_id: r.tokens for r in res.records if r.done}
    assert set(done) == {0, 1} and done == {i: _reference(reqs[i]) for i in done}


# ---- admission control ----
@pytest.mark.timeout(120)
def test_bounded_queue_under_tenfold_overload():
  # Paced: a prompt step lasts 20 ms, a token step 10 ms on each of 2 stages. A stage spends
  # 20 + 3 * 10 = 50 ms per microbatch of 2 requests of 4 tokens: capacity 40 requests/s.
  stages, batch, new = 2, 2, 4
  per_layer = CFG.num_layers // stages
  cost = TableCostModel(CFG, prompt=0.02 / per_layer, token=0.01 / per_layer)
  capacity = batch / (0.02 + (new - 1) * 0.01)
  rate, n, max_pending = 10 * capacity, 200, 4
  reqs = [Request(i, i / rate, (5 + i % 50, 9, 11), new) for i in range(n)]
  serve = ServeConfig(program="fake", num_stages=stages, microbatch_size=batch, max_len=32,
                      pacing="paced", max_pending=max_pending)
  depths = []
  with PipelineEngine(CFG, None, serve, cost_model=cost) as eng:
    eng.warmup()
    tracemalloc.start()
    try:
      res = eng.serve(reqs, progress=lambda *_: depths.append(len(eng._state.sched.pending)))  # pylint: disable=protected-access
      _, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
  s = res.summary
  assert max(depths) <= max_pending and s["max_queue_depth"] <= max_pending
  assert s["rejected_queue_full"] == s["rejected"] == len(res.rejected) > n / 2
  assert all(why.endswith(f"queue full: {max_pending} pending") for why in res.rejected.values())
  # Every admitted request completes, with the hand-computed tokens.
  assert s["completed"] == len(res.records) == n - s["rejected"]
  assert res.tokens() == {r.request_id: _reference(r) for r in reqs
                          if r.request_id not in res.rejected}
  # Memory: what the engine keeps per offered request is small and does not pile up.
  assert peak / n < 5_000, peak   # measured: ~0.7 KB


# ---- valid JSON ----
def test_summary_of_nothing_finished_is_valid_json(tmp_path):
  rec = metrics.RequestRecord(request_id=0, arrival=0.0, prompt_len=3)
  summary = metrics.summarize([rec])
  assert math.isnan(summary["mean_ttft_ms"])
  back = _strict_json(metrics.dumps(summary))
  assert back["mean_ttft_ms"] is None and back["completed"] == 0
  assert _strict_json(metrics.dumps({"x": math.inf, "y": [math.nan, 1.5]})) == {
      "x": None, "y": [None, 1.5]}
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert _strict_json(metrics.dumps({"a": np.array([np.nan, 2.0]), "n": np.int64(3)})) == {
      "a": [None, 2.0], "n": 3}
  metrics.write_jsonl(tmp_path / "r.jsonl", [metrics.RequestRecord(0, 0.0, 3, finish=math.nan)])
  _strict_json((tmp_path / "r.jsonl").read_text())


@pytest.mark.timeout(180)
def test_experiment_writes_what_was_served_when_serving_fails(tmp_path, monkeypatch):
  from configs import serve_tiny  # pylint: disable=g-import-not-at-top
  from dejavu_jax.studies import runner  # pylint: disable=g-import-not-at-top
  c = serve_tiny.get_config()
  c.program, c.fail_stages, c.fail_times, c.rates = "fake", (), (), (50.0,)
  c.microbatch_size = 1
  serve = PipelineEngine.serve

  def failing_serve(self, requests, **kw):
    if "failures" in kw:   # the measured run, not warmup's
      _fail_at(self, self._next_mb_id + 3, _boom)   # pylint: disable=protected-access
    return serve(self, requests, **kw)
  monkeypatch.setattr(PipelineEngine, "serve", failing_serve)
  with pytest.raises(EngineError, match="link down"):
    runner.run_experiment(c, str(tmp_path), log=lambda *a: None)
  (summary,) = [_strict_json(line) for line in open(tmp_path / "summary.jsonl")]
  assert "link down" in summary["error"] and summary["completed"] >= 1
  recs = metrics.read_jsonl(tmp_path / "requests_rate50.jsonl")
  assert sum(r.done for r in recs) == summary["completed"]
  assert os.path.exists(tmp_path / "summary.jsonl")
