"""Cost model: links, byte helpers, roofline against hand-computed FLOPs/bytes, table, calibration."""

import numpy as np
import pytest

from dejavu_jax import costmodel as cm
from dejavu_jax.config import get_model_config

OPT66 = get_model_config("opt_66b", dtype="float16")


def test_link_transfer_time_is_latency_plus_bytes_over_bandwidth():
  link = cm.Link("x", bandwidth=2e9, latency=1e-3)
  assert link.transfer_time(0) == 0.0
  assert link.transfer_time(4e9) == pytest.approx(2.001)
  for name in ("pcie4", "nvlink", "inter_vm_40gbps", "inter_vm_32gbps", "host_memcpy"):
    assert cm.get_link(name).bandwidth > 0
  assert cm.LINKS["inter_vm_40gbps"].bandwidth == pytest.approx(5e9)
  with pytest.raises(ValueError, match="bandwidth"):
    cm.Link("bad", 0.0)
  with pytest.raises(ValueError, match="unknown link"):
    cm.get_link("carrier_pigeon")


def test_byte_helpers():
  per = 2 * OPT66.hidden_size * 2  # K and V, float16
  assert cm.kv_bytes(OPT66, 3, 8, 100) == 3 * 8 * 100 * per
  assert cm.prompt_kv_bytes_per_layer(OPT66, 8, 1000) == 8 * 1000 * per
  assert cm.token_kv_bytes(OPT66, 16, 8) == 16 * 8 * per
  assert cm.activation_bytes(OPT66, 8, 10) == 8 * 10 * OPT66.hidden_size * 2
  link = cm.Link("l", 1e9)
  assert cm.swap_in_time(link, OPT66, 2, 4, 50) == pytest.approx(2 * 4 * 50 * per / 1e9)
  assert cm.swap_out_time(link, OPT66, 2, 4) == pytest.approx(2 * 4 * per / 1e9)


def test_roofline_prompt_is_compute_bound_and_token_memory_bound():
  hw = cm.HARDWARE["a100_80gb"]
  cost = cm.roofline(OPT66, "a100_80gb")
  d, f = OPT66.hidden_size, OPT66.ffn_dim
  layers, p, b = 16, 1000, 8
  flops = layers * (2 * b * p * (4 * d * d + 2 * d * f) + 4 * b * p * p * d)
  expect = flops / (hw.peak_flops_16 * hw.compute_efficiency) + layers * hw.layer_overhead_s
  assert cost.prompt_time(layers, p, b) == pytest.approx(expect, rel=1e-9)
  ctx = 1000
  nbytes = layers * (OPT66.layer_weight_bytes() + b * (ctx + 1) * 4 * d)
  expect = nbytes / (hw.mem_bandwidth * hw.memory_efficiency) + layers * hw.layer_overhead_s
  assert cost.token_time(layers, b, ctx) == pytest.approx(expect, rel=1e-9)
  # The prompt/token imbalance the paper starts from: 1.4x to over 100x.
  assert 10 < cost.prompt_time(16, 1000, 8) / cost.token_time(16, 8, 1000) < 200


def test_roofline_monotone_and_presets():
  for name in ("a100_80gb", "v100_16gb", "h100_80gb"):
    cost = cm.roofline(OPT66, name)
    assert cost.prompt_time(2, 100, 4) < cost.prompt_time(4, 100, 4) < cost.prompt_time(4, 200, 4)
    assert cost.token_time(2, 4, 100) < cost.token_time(2, 8, 100) <= cost.token_time(2, 8, 900)
    assert cost.head_time(8) > 0
  # Newer hardware is faster; two GPUs per machine are faster than one.
  a, v, h = (cm.roofline(OPT66, n).token_time(8, 8, 500) for n in ("a100_80gb", "v100_16gb",
                                                                       "h100_80gb"))
  assert h < a < v
  two = cm.roofline(OPT66, "a100_80gb", gpus_per_machine=2)
  assert two.prompt_time(8, 500, 8) < cm.roofline(OPT66).prompt_time(8, 500, 8)
  assert two.machine_memory_bytes == 2 * 80 * 2**30   # 80 GiB per A100-80GB


def test_bad_hardware_and_args():
  with pytest.raises(ValueError, match="unknown hardware 'tpu_v9'"):
    cm.roofline(OPT66, "tpu_v9")
  with pytest.raises(ValueError, match="batch"):
    cm.roofline(OPT66).prompt_time(1, 10, 0)


def test_measure_cpu_rates_are_work_over_best_time(monkeypatch):
  # A clock that advances 10 ms per reading: every timed interval lasts exactly 10 ms, so the
  # rates are the work done over 10 ms, and a wrong FLOP or byte count shows.
  ticks = iter(range(10**6))
  monkeypatch.setattr(cm.time, "perf_counter", lambda: 0.01 * next(ticks))
  hw = cm.measure_cpu(matmul_size=64, copy_mb=2)
  assert hw.peak_flops_32 == hw.peak_flops_16 == pytest.approx(2 * 64**3 / 0.01)
  assert hw.mem_bandwidth == pytest.approx(2 * 2 * 2**20 / 0.01)
  assert hw.host_link.bandwidth == pytest.approx(hw.mem_bandwidth / 2)


def test_measure_cpu_is_a_plausible_cpu():
  # Its wall time (target < 1 s) is reported by benchmarks/sim_speed.py, not asserted here.
  # Bounds a real CPU (loaded or not) lies within: a broken timer or count falls outside.
  hw = cm.measure_cpu()
  assert 1e8 < hw.peak_flops_32 < 1e14 and 1e8 < hw.mem_bandwidth < 1e13


def test_table_cost_model_scalar_grid_and_errors():
  m = get_model_config("opt_125m")
  t = cm.TableCostModel(m, prompt=0.01, token=0.001, head=0.002)
  assert t.prompt_time(3, 100, 8) == pytest.approx(0.03)
  assert t.token_time(4, 8, 500) == pytest.approx(0.004)
  assert t.head_time(8) == pytest.approx(0.002)
  g = cm.TableCostModel.from_dict(m, {
      "prompt": {"100,1": 1.0, "100,8": 2.0, "200,1": 3.0, "200,8": 4.0},
      "token": {(1, 0): 0.1, (1, 1000): 0.3, (8, 0): 0.5, (8, 1000): 0.7}})
  assert g.prompt_time(1, 150, 1) == pytest.approx(2.0)
  assert g.prompt_time(2, 100, 8) == pytest.approx(4.0)
  assert g.token_time(1, 1, 500) == pytest.approx(0.2)
  assert g.token_time(1, 8, 5000) == pytest.approx(0.7)  # clamped outside the grid
  with pytest.raises(ValueError, match="full grid"):
    cm.TableCostModel(m, prompt={(100, 1): 1.0, (200, 8): 2.0}, token=0.1)
  with pytest.raises(ValueError, match="'token'"):
    cm.TableCostModel.from_dict(m, {"prompt": 1.0})


def test_calibrate_recovers_an_affine_model():
  m = get_model_config("opt_125m")
  rng = np.random.default_rng(0)
  true_p = lambda l, p, b: 1e-3 + l * (2e-4 + 3e-7 * b * p + 1e-10 * b * p * p)
  true_t = lambda l, b, c: 5e-4 + l * (1e-4 + 2e-6 * b + 1e-9 * b * c)
  recs = []
  for _ in range(40):
    l, p, b, c = rng.integers(1, 13), rng.integers(16, 512), rng.integers(1, 9), rng.integers(0, 900)
    recs.append(("prompt", l, p, b, true_p(l, p, b)))
    recs.append({"kind": "token", "layers": l, "length": c, "batch": b,
                 "seconds": true_t(l, b, c)})
  cal = cm.calibrate(m, recs)
  assert cal.prompt_time(6, 300, 4) == pytest.approx(true_p(6, 300, 4), rel=0.01)
  assert cal.token_time(6, 4, 700) == pytest.approx(true_t(6, 4, 700), rel=0.01)
  assert cal.head_time(8) == 0.0
  with pytest.raises(ValueError, match="at least one 'token'"):
    cm.calibrate(m, [("prompt", 1, 10, 1, 0.1)])
  with pytest.raises(ValueError, match="unknown measurement kind"):
    cm.calibrate(m, [("decode", 1, 10, 1, 0.1)])


def test_kv_bytes_use_kv_heads():
  """Grouped-query models cache only their KV heads: Llama-2-70B's 8 of 64 heads."""
  m = get_model_config("llama2_70b", dtype="float16")
  per = 2 * 8 * 128 * 2
  assert m.kv_bytes_per_token_per_layer() == per
  assert cm.kv_bytes(m, 3, 8, 100) == 3 * 8 * 100 * per
  assert cm.token_kv_bytes(m, 80, 4) == 80 * 4 * per
  # A decode step of the GQA model reads 8x less cache than a multi-head one of the same size.
  mha = m.replace(num_kv_heads=64)
  rl, rl_mha = cm.roofline(m, "a100_80gb"), cm.roofline(mha, "a100_80gb")
  assert rl.token_time(10, 64, 4000) < rl_mha.token_time(10, 64, 4000)
