"""Discrete-event simulator: the paper's formulas as oracles, monotonicity, failure accounting."""

import math

import numpy as np
import pytest

from dejavu_jax import costmodel as cm
from dejavu_jax.config import get_model_config
from dejavu_jax.sim import (Failure, RecoveryConfig, RequestRecord, make_requests,
                            saturated_requests, simulate_colocated, simulate_disaggregated,
                            summarize)

MODEL = get_model_config("opt_125m")  # 12 layers: divisible by every depth used here
L = MODEL.num_layers


def _cost(y_layer, t_layer):
  return cm.TableCostModel(MODEL, prompt=y_layer, token=t_layer)


@pytest.mark.parametrize("D,y_layer,t_layer,N", [
    (2, 0.3, 0.1, 20), (3, 0.2, 0.05, 10), (4, 0.5, 0.01, 30), (4, 0.1, 0.1, 5), (6, 1.0, 0.02, 40)])
def test_colocated_saturated_inverse_throughput_is_Ic(D, y_layer, t_layer, N):
  # Deterministic per-stage times, all requests waiting: the formula's regime. I_c is the time
  # between consecutive microbatch finishes; N counts token steps, so output_len = N + 1.
  Y, t = y_layer * L / D, t_layer * L / D
  Ic = Y + N * t + (D - 1) * (Y - t) / D
  res = simulate_colocated(_cost(y_layer, t_layer), saturated_requests(30 * D, 10, N + 1), D,
                           batch_size=1)
  assert res.inverse_throughput(warmup=4 * D, period=D) == pytest.approx(Ic, rel=0.01)


@pytest.mark.parametrize("D,Dp,y_layer,t_layer,N,m", [
    (4, 1, 0.5, 0.01, 30, 1.0), (4, 2, 0.5, 0.01, 30, 1.5), (6, 2, 1.0, 0.02, 40, 1.2),
    (6, 3, 1.0, 0.02, 40, 1.2), (3, 1, 0.2, 0.05, 10, 1.0)])
def test_disaggregated_saturated_inverse_throughput_is_max_Ip_It(D, Dp, y_layer, t_layer, N, m):
  Y, t, Dt = y_layer * L / D, t_layer * L / D, D - Dp
  Ip, It = m * D * Y / Dp, N * D * t / Dt
  res = simulate_disaggregated(_cost(y_layer, t_layer), saturated_requests(30 * D, 10, N + 1),
                               Dp, Dt, batch_size=1, prompt_overhead=m)
  assert res.inverse_throughput(warmup=4 * D, period=D) == pytest.approx(max(Ip, It), rel=0.01)


def test_layerwise_streaming_time():
  from dejavu_jax.sim import streamed_prompt_time
  assert streamed_prompt_time(4.0, 4, 0.5) == pytest.approx(4.0 + 0.5)  # hidden under compute
  assert streamed_prompt_time(4.0, 4, 2.0) == pytest.approx(1.0 + 4 * 2.0)  # link-bound


def test_swapping_hidden_when_fast_and_link_bound_when_slow():
  cost, D, N = _cost(0.02, 0.02), 3, 20  # Y = t: no bubbles, every stage always busy
  t = 0.02 * L / D
  base = simulate_colocated(cost, saturated_requests(20 * D, 10, N + 1), D, batch_size=1)
  inv0 = base.inverse_throughput(4 * D, period=D)
  assert inv0 == pytest.approx((N + 1) * t, rel=0.01)
  fast = simulate_colocated(cost, saturated_requests(20 * D, 10, N + 1), D, batch_size=1,
                            swap_link=cm.Link("fast", 1e18, 0.1 * t))
  assert fast.inverse_throughput(4 * D, period=D) == pytest.approx(inv0, rel=0.01)
  s_in = 3 * t  # every token step waits for a serial swap-in of its cache on the link
  slow = simulate_colocated(cost, saturated_requests(20 * D, 10, N + 1), D, batch_size=1,
                            swap_link=cm.Link("slow", 1e18, s_in))
  assert slow.inverse_throughput(4 * D, period=D) == pytest.approx(t + N * s_in, rel=0.02)


def test_higher_rate_never_lowers_latency():
  cost = _cost(0.02, 0.002)
  p50 = []
  for rate in (0.5, 1.0, 2.0, 4.0, 8.0):
    lens = np.random.default_rng(3).integers(2, 40, 200)
    reqs = make_requests(rate, 200, prompt_len=64, output_lens=lens, seed=3)
    p50.append(simulate_colocated(cost, reqs, 4, batch_size=4).summary["norm_latency_p50_s_per_tok"])
  assert all(b >= a * 0.999 for a, b in zip(p50, p50[1:])), p50


def test_records_and_summary():
  r = [RequestRecord(0, 0.0, 10, 5, first_token=1.0, finish=3.0),
       RequestRecord(1, 1.0, 10, 3, first_token=1.5, finish=5.0), RequestRecord(2, 2.0, 10, 3)]
  s = summarize(r)
  assert s["num_requests"] == 3 and s["completed"] == 2 and s["num_unfinished"] == 1
  assert s["duration"] == 5.0 and s["request_throughput"] == pytest.approx(0.4)
  assert s["output_throughput"] == pytest.approx(8 / 5)
  assert s["norm_latency_p50_s_per_tok"] == pytest.approx(np.median([3 / 5, 4 / 3]))
  assert s["median_tpot_ms"] == pytest.approx(1e3 * np.median([0.5, 1.75]))
  assert s["median_ttft_ms"] == pytest.approx(750)
  # one set of names and units: no second copy in seconds, no NaN ITL (no token times kept)
  assert not {"ttft_p50", "throughput_rps", "norm_latency_p50"} & set(s) and "mean_itl_ms" not in s


def test_every_request_gets_its_tokens_and_ttft_before_finish():
  reqs = make_requests(2.0, 100, prompt_len=32, seed=1)
  res = simulate_disaggregated(_cost(0.02, 0.002), reqs, 1, 3, batch_size=4,
                               stream_link=cm.Link("s", 1e9), host_link=cm.LINKS["pcie4"])
  assert res.summary["num_unfinished"] == 0
  for r in res.records:
    assert r.arrival <= r.first_token <= r.finish


def _fail_run(strategy, latency=0.0, every=10, system="colocated"):
  cost, D, N = _cost(0.02, 0.005), 4, 60
  rec = RecoveryConfig(strategy=strategy, replica_link=cm.Link("r", 1e18, latency),
                       snapshot_every=every, snapshot_link=cm.Link("s", 1e18, 0.0),
                       weight_link=cm.Link("w", 1e18, 0.5), replacement_start_s=2.0)
  reqs = saturated_requests(8 * D, 16, N + 1)
  if system == "colocated":
    return simulate_colocated(cost, reqs, D, batch_size=1, failures=[Failure(10.3, 1)],
                              recovery=rec)
  return simulate_disaggregated(cost, reqs, 1, 3, batch_size=1,
                                failures=[Failure(10.3, 1, "token")], recovery=rec)


@pytest.mark.parametrize("system", ["colocated", "disaggregated"])
def test_failure_accounting(system):
  runs = {s: _fail_run(s, system=system) for s in ("restart", "replica", "snapshot", "reprefill")}
  for s, res in runs.items():
    assert res.summary["num_unfinished"] == 0, s
    (rec,) = res.recoveries
    assert rec["detection_s"] == pytest.approx(13.0 - 10.3)  # last heartbeat at 10 s + 3 s
    assert rec["downtime_s"] == pytest.approx(
        rec["detection_s"] + 2.0 + 0.5 + rec["restore_s"])
    assert rec["resumed_at"] == pytest.approx(10.3 + rec["downtime_s"])
  restart, replica = runs["restart"].recoveries[0], runs["replica"].recoveries[0]
  assert restart["lost_steps"] == restart["progress_steps"] > 0  # restart loses everything
  assert replica["lost_steps"] == 0  # instant acks: every completed step is replicated
  assert runs["reprefill"].recoveries[0]["lost_steps"] == 0
  assert runs["snapshot"].recoveries[0]["lost_steps"] <= 10 * restart["inflight_microbatches"]
  mean = {s: np.mean([r.latency for r in res.records]) for s, res in runs.items()}
  assert mean["replica"] < mean["restart"]


def test_recovery_parameters_and_whole_job_restart():
  # Every stage of the 4-stage pipeline holds L/4 layers; with a fixed weight load time the
  # downtime is exactly detection + replacement + that time, for a stage or a whole-job restart.
  cost, D = _cost(0.02, 0.005), 4
  runs = {}
  for scope, weight in (("requests", None), ("job", None), ("requests", 7.0)):
    rec = RecoveryConfig(strategy="restart", heartbeat_s=0.5, timeout_s=1.5,
                         replacement_start_s=4.0, weight_load_s=weight, restart_scope=scope,
                         weight_link=cm.Link("w", 1e18, 0.25))
    res = simulate_colocated(cost, saturated_requests(8 * D, 16, 41), D, batch_size=1,
                             failures=[Failure(10.3, 1)], recovery=rec)
    (runs[scope, weight],) = res.recoveries
  for (scope, weight), r in runs.items():
    assert r["scope"] == scope and r["detection_s"] == pytest.approx(10.0 + 1.5 - 10.3)  # beat at 10.0
    assert r["downtime_s"] == pytest.approx(r["detection_s"] + 4.0 + (weight or 0.25))
  assert RecoveryConfig(restart_scope="stage").restart_scope == "requests"   # its old name
  with pytest.raises(ValueError, match="restart_scope"):
    RecoveryConfig(restart_scope="cluster")
  with pytest.raises(ValueError, match="weight_load_s"):
    RecoveryConfig(weight_load_s=-1.0)


def test_whole_job_restart_waits_for_the_slowest_stage():
  # An uneven split (5 layers over 2 stages: 3 + 2): a job restart reloads the 3-layer stage
  # even when the 2-layer stage failed.
  from dejavu_jax.sim.pipeline import split_layers
  layers = split_layers(5, 2)
  small = int(np.argmin(layers))
  cost = cm.roofline(get_model_config("opt_125m", num_layers=5), "a100_80gb")
  link = cm.Link("w", 1e6, 0.0)   # 1 MB/s: weight time proportional to the layers
  per_layer = cost.model.layer_weight_bytes() / 1e6
  out = {}
  for scope in ("requests", "job"):
    rec = RecoveryConfig(strategy="restart", restart_scope=scope, weight_link=link)
    res = simulate_colocated(cost, saturated_requests(4, 16, 8), 2, batch_size=1,
                             failures=[Failure(0.01, small)], recovery=rec)
    out[scope] = res.recoveries[0]["weight_load_s"]
  assert out["requests"] == pytest.approx(min(layers) * per_layer)
  assert out["job"] == pytest.approx(max(layers) * per_layer) and min(layers) < max(layers)


def test_replica_loses_at_most_the_unreplicated_steps():
  # Acks lag by `lag`; a token step of one microbatch takes D * t = 4 * 0.015 s in steady state,
  # so at most ceil(lag / (D t)) + 1 of its completed steps can be unacknowledged.
  lag = 0.2
  res = _fail_run("replica", latency=lag)
  (rec,) = res.recoveries
  per_mb = math.ceil(lag / (4 * 0.005 * L / 4)) + 1
  assert 0 < rec["lost_steps"] <= per_mb * rec["inflight_microbatches"]
  assert res.summary["num_unfinished"] == 0


def test_bad_input_errors():
  with pytest.raises(ValueError, match="rate must be > 0"):
    make_requests(0.0, 10, 32)
  with pytest.raises(ValueError, match="unknown recovery strategy"):
    RecoveryConfig(strategy="pray")
  with pytest.raises(ValueError, match="out of range"):
    simulate_colocated(_cost(0.1, 0.1), saturated_requests(4, 8, 4), 2,
                       failures=[Failure(1.0, 5)])
  with pytest.raises(ValueError, match="cannot split"):
    simulate_colocated(_cost(0.1, 0.1), saturated_requests(4, 8, 4), 13)


@pytest.mark.slow
def test_paper_scale_run():
  # Its wall time (target < 10 s) is reported by benchmarks/sim_speed.py, not asserted here.
  cost = cm.roofline(get_model_config("opt_66b", dtype="float16"), "a100_80gb", gpus_per_machine=2)
  reqs = make_requests(0.5, 1000, prompt_len=1000, seed=0)
  res = simulate_colocated(cost, reqs, 4, batch_size=8)
  s = res.summary
  assert s["num_requests"] == s["completed"] == 1000 and s["num_unfinished"] == 0
  # Served no faster than requests arrive, and not before the last one arrived.
  span = max(r.arrival for r in reqs) - min(r.arrival for r in reqs)
  assert s["duration"] >= span and s["request_throughput"] <= 1000 / span
