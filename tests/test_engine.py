"""Engine behaviour around the tokens: paced timing against the analytical formula, metrics with
known step times, bad requests, errors and hangs surfacing."""

import jax
import pytest

from dejavu_jax.config import ServeConfig, tiny_config
from dejavu_jax.costmodel import TableCostModel
from dejavu_jax.models import init_params
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request

CFG = tiny_config("opt", num_layers=4, max_positions=128)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


# The paced pipeline's inverse throughput against I_c = Y + N t + (D-1)(Y-t)/D is a wall-clock
# measurement: benchmarks/pipeline.py reports it (paced_vs_formula_d2, _d4), not a unit test.


@pytest.mark.timeout(120)
def test_metrics_from_known_step_times(params):
  """One request on a paced 1-stage pipeline: prompt step 60 ms, token steps 20 ms."""
  cost = TableCostModel(CFG, prompt=0.06 / 4, token=0.02 / 4)
  serve = ServeConfig(num_stages=1, microbatch_size=1, max_len=32, pacing="paced")
  with PipelineEngine(CFG, params, serve, cost_model=cost) as eng:
    eng.generate([[5, 6]], 2)
    res = eng.serve([Request(0, 0.0, (5, 6, 7), 6)])
  rec, s = res.records[0], res.summary
  assert rec.tokens and len(rec.token_times) == 6 and rec.first_token == rec.token_times[0]
  # A paced step starts when the previous one ended and lasts its modelled time, or longer when
  # the real compute overran it (a loaded machine): every token is stamped at its modelled
  # instant (60 ms, then every 20 ms) shifted only by overruns, so no gap is shorter than its
  # modelled step, and every longer gap is an overrun the workers counted.
  modelled = [0.06] + [0.02] * 5
  gaps = [b - a for a, b in zip([0.0] + rec.token_times[:-1], rec.token_times)]
  assert all(g >= m - 1e-6 for g, m in zip(gaps, modelled)), gaps
  stretched = sum(g > m + 1e-6 for g, m in zip(gaps, modelled))
  assert stretched <= s["paced_overruns"], (gaps, s["paced_overruns"])
  assert rec.finish == rec.token_times[-1]
  if s["paced_overruns"] == 0:   # then the stamps are the modelled instants exactly
    assert rec.token_times == pytest.approx([0.06 + 0.02 * k for k in range(6)], abs=1e-6)
  # The summary from the same stamps: TPOT and normalized latency no better than modelled, and
  # 6 tokens cannot come faster than the modelled 160 ms.
  assert s["mean_tpot_ms"] >= 20.0 - 1e-3
  assert s["norm_latency_p50_s_per_tok"] >= 0.16 / 6 - 1e-6
  assert 0 < s["output_throughput"] <= 6 / 0.16 + 1e-6
  if s["paced_overruns"] == 0:
    assert s["mean_tpot_ms"] == pytest.approx(20.0, abs=1e-3)


@pytest.mark.timeout(120)
def test_bad_requests_rejected_others_finish(params):
  good = [Request(0, 0.0, (5, 6), 4), Request(2, 0.0, (7, 8, 9), 3), Request(4, 0.01, (9,), 2)]
  bad = [Request(1, 0.0, (5,) * 60, 10),            # 60 + 10 > max_len 64
         Request(3, 0.0, (), 3),                    # empty
         Request(5, 0.0, (5, 999), 3)]              # outside the vocabulary
  with PipelineEngine(CFG, params, ServeConfig(num_stages=2, microbatch_size=2,
                                               max_len=64)) as eng:
    res = eng.serve(good + bad)
    assert sorted(res.tokens()) == [0, 2, 4]
    assert all(len(res.tokens()[r.request_id]) == r.max_new_tokens for r in good)
    assert "longer than the context of 64" in res.rejected[1]
    assert "empty" in res.rejected[3]
    assert "token id 999 outside the vocabulary" in res.rejected[5]
    with pytest.raises(ValueError, match="request 0: prompt is empty"):
      eng.generate([[]], 3)


@pytest.mark.timeout(120)
def test_warmup_leaves_nothing_to_compile_while_serving(params):
  with PipelineEngine(CFG, params, ServeConfig(num_stages=2, microbatch_size=2,
                                               max_len=64)) as eng:
    eng.warmup()
    sizes = [(p._prefill._cache_size(), p._decode._cache_size())  # pylint: disable=protected-access
             for p in eng.programs]
    eng.generate([[5] * 40, [6] * 3, [7] * 20], 5)
    assert sizes == [(p._prefill._cache_size(), p._decode._cache_size())  # pylint: disable=protected-access
                     for p in eng.programs]
    assert sizes[0] == (3, 3)   # prompt buckets 16, 32, 64; decode at contexts 16, 32, 64


def test_bad_engine_config(params):
  with pytest.raises(ValueError, match="more stages than layers"):
    PipelineEngine(CFG, params, ServeConfig(num_stages=5))
  with pytest.raises(ValueError, match="needs a cost model"):
    PipelineEngine(CFG, params, ServeConfig(pacing="paced", max_len=64))
  with pytest.raises(ValueError, match="unknown serving mode"):
    ServeConfig(mode="fancy")
  with pytest.raises(ValueError, match="max_len 4096 exceeds"):
    PipelineEngine(CFG, params, ServeConfig(max_len=4096))


@pytest.mark.timeout(120)
def test_stage_error_surfaces_with_its_stage(params):
  with PipelineEngine(CFG, params, ServeConfig(num_stages=2, microbatch_size=1,
                                               max_len=32)) as eng:
    def boom(stage, msg):
      raise OSError("link down")
    eng.runtime.worker(1).after_step.append(boom)
    with pytest.raises(RuntimeError, match="stage 1 failed on microbatch 0: OSError"):
      eng.generate([[5, 6]], 3)


@pytest.mark.timeout(120)
def test_hang_fails_fast(params):
  serve = ServeConfig(num_stages=2, microbatch_size=1, max_len=32, step_timeout_s=1.0)
  with PipelineEngine(CFG, params, serve) as eng:
    eng.runtime.worker(1).stop()   # a dead stage: the request never comes back
    with pytest.raises(TimeoutError, match="no pipeline step finished in 1.0 s"):
      eng.generate([[5, 6]], 3)


@pytest.mark.timeout(180)
def test_a_late_free_does_not_starve_the_next_prefill(params):
  """On Ray the engine's `free` reaches a stage on another channel than the pipeline's steps, and
  can arrive after the next microbatch's prefill came down the pipeline into the freed buffer
  (seen under load: StoreFull). Here stage 1's frees arrive 0.3 s late: every request still
  finishes with the single-device greedy tokens, because steps carry the engine's frees down the pipeline."""
  import threading  # pylint: disable=g-import-not-at-top
  from tests.serving_util import greedy_references  # pylint: disable=g-import-not-at-top
  reqs = [Request(i, 0.0, (5 + i, 6, 7), 3) for i in range(5)]
  serve = ServeConfig(num_stages=2, microbatch_size=1, max_len=32)
  with PipelineEngine(CFG, params, serve) as eng:
    late = eng.runtime.worker(1)
    on_time = late.free
    late.free = lambda mb_id: threading.Timer(0.3, on_time, (mb_id,)).start()
    res = eng.serve(reqs)
  assert res.error is None
  assert res.tokens() == greedy_references(CFG, params, reqs, max_len=32)
