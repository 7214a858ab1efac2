"""Planner: the formulas' split, memory constraints, monotonicity, clear errors."""

import math

import pytest

from dejavu_jax import costmodel as cm
from dejavu_jax import planner
from dejavu_jax.config import get_model_config

MODEL = get_model_config("opt_125m")  # 12 layers, float32
L = MODEL.num_layers
BIG = 1e12  # memory that never binds


def _cost(y_layer=0.05, t_layer=0.001):
  return cm.TableCostModel(MODEL, prompt=y_layer, token=t_layer)


@pytest.mark.parametrize("D,y_layer,t_layer,out,m", [
    (4, 0.05, 0.001, 101, 1.0), (6, 0.05, 0.001, 201, 1.3), (4, 0.02, 0.004, 31, 1.0),
    (3, 0.5, 0.001, 41, 1.5)])
def test_analytical_split_is_the_formula(D, y_layer, t_layer, out, m):
  wl = planner.Workload(prompt_len=32, output_len=out, batch_size=2)
  ap = planner.analytical_plan(_cost(y_layer, t_layer), D, wl, BIG, m=m)
  Y, t, N = y_layer * L / D, t_layer * L / D, out - 1
  Dt = min(max(math.ceil(D * N * t / (m * Y + N * t)), 1), D - 1)
  assert (ap.Dt, ap.Dp) == (Dt, D - Dt)
  assert ap.binding.startswith("balance")
  assert ap.Ic == pytest.approx(Y + N * t + (D - 1) * (Y - t) / D)
  assert ap.Ip == pytest.approx(m * D * Y / ap.Dp) and ap.It == pytest.approx(N * D * t / ap.Dt)
  assert ap.helps == (Y / t > (D - 1) / (D * (2 - m) - 1))


def test_token_memory_binds_and_is_respected():
  wl = planner.Workload(prompt_len=512, output_len=101, batch_size=8)
  W0 = MODEL.layer_weight_bytes()
  C0 = cm.prompt_kv_bytes_per_layer(MODEL, 8, 512)
  K0 = cm.kv_bytes(MODEL, 1, 8, 100)
  M = L * (C0 + K0) + 3 * W0  # a token machine holds 3 layers -> Dt >= 4
  D = 6
  ap = planner.analytical_plan(_cost(0.5, 0.0001), D, wl, M, reserve=0.0)
  assert ap.Dt_balance < 4 and ap.Tn == 3 and ap.Dt == 4 and ap.Dp == 2
  assert ap.binding.startswith("token memory")
  assert math.ceil(L / ap.Dt) * W0 + L * (C0 + K0) <= M
  assert math.ceil(L / ap.Dp) * (W0 + C0) <= M


def test_prompt_memory_binds():
  wl = planner.Workload(prompt_len=64, output_len=101, batch_size=1)
  W0, C0 = MODEL.layer_weight_bytes(), cm.prompt_kv_bytes_per_layer(MODEL, 1, 64)
  M = 4.5 * (W0 + C0)  # a prompt machine holds 4 layers -> Dp >= 3
  ap = planner.analytical_plan(_cost(0.001, 0.01), 6, wl, M, reserve=0.0)
  assert ap.Dt_balance == 5 and ap.Pn == 4 and ap.Dp == 3 and ap.Dt == 3
  assert ap.binding.startswith("prompt memory")
  assert math.ceil(L / ap.Dp) * (W0 + C0) <= M


def test_no_feasible_plan_errors():
  big = get_model_config("opt_66b", dtype="float16")
  cost = cm.roofline(big, "v100_16gb")
  wl = planner.Workload(1000, 250, 8)
  with pytest.raises(ValueError, match="no feasible plan.*weights"):
    planner.analytical_plan(cost, 2, wl, 16e9)
  with pytest.raises(ValueError, match="no feasible plan"):
    planner.search(cost, 2, wl, 16e9)
  with pytest.raises(ValueError, match="unknown hardware"):
    planner.plan_report(big, 4, "a200_1tb", wl)
  with pytest.raises(ValueError, match="output_len"):
    planner.Workload(1000, 1, 8)


def test_search_matches_formula_and_more_machines_never_slower():
  wl = planner.Workload(prompt_len=32, output_len=21, batch_size=1, output_dist="equal")
  cost = _cost(0.05, 0.002)
  best = []
  for D in (2, 3, 4):
    cands = planner.search(cost, D, wl, BIG, batch_sizes=(1,))
    best.append(cands[0].throughput_rps)
    Y, t, N = 0.05 * L / D, 0.002 * L / D, 20
    for c in cands:
      if c.system == "disaggregated" and c.Dp + c.Dt == D:
        inv = max(D * Y / c.Dp, N * D * t / c.Dt)
        assert c.inverse_throughput == pytest.approx(inv, rel=0.01)
      if c.system == "colocated" and c.depth == D:
        Ic = Y + N * t + (D - 1) * (Y - t) / D
        assert c.inverse_throughput == pytest.approx(Ic, rel=0.01)
  assert best == sorted(best), best


def test_plan_report_smoke():
  text, summary = planner.plan_report(get_model_config("opt_13b", dtype="float16"), 2,
                                      "a100_80gb", planner.Workload(1000, 50, 8),
                                      batch_sizes=(8,))
  best = summary["best"]
  # The recommendation is the fastest candidate, and the text names it with its throughput.
  assert best["throughput_rps"] >= max(summary["best_disaggregated"]["throughput_rps"],
                                       summary["plain_baseline"]["throughput_rps"])
  assert best["throughput_rps"] == pytest.approx(best["batch"] / best["inverse_throughput"],
                                                rel=1e-6)
  (rec,) = [ln for ln in text.splitlines() if ln.startswith("Recommended:")]
  assert f"({best['throughput_rps']:.3f} req/s" in rec
  # Here m > 2: no Y/t makes disaggregation pay, and the report says why.
  a = summary["analytical"]
  assert a["m"] > 2 and not a["helps"] and a["threshold"] == math.inf
  assert "disaggregation does not pay" in text


def test_why_explains_the_recommendation_and_the_paper_comparison_is_shown():
  """The explanation once spoke of the split (Dp=1, Dt=3) while recommending colocated
  replicas, and the split was never simulated. Now the why names the recommended system, and the
  split is simulated beside the same machines without data-parallel replicas."""
  text, summary = planner.plan_report(get_model_config("opt_66b", dtype="float16"), 4,
                                      "a100_80gb", planner.Workload(1000, 250, 8),
                                      batch_sizes=(8, 16))
  best = summary["best"]
  why = next(line for line in text.splitlines() if line.strip().startswith("why:"))
  if best["system"] == "colocated":
    assert f"colocated D={best['depth']} x{best['replicas']}" in why
    assert "the split is bound by" not in why   # not the split's own explanation
  paper = summary["paper_comparison"]
  ap = summary["analytical"]
  assert (paper["split"]["Dp"], paper["split"]["Dt"]) == (ap["Dp"], ap["Dt"])
  assert paper["no_replicas"]["depth"] == 4 and paper["no_replicas"]["replicas"] == 1
  assert paper["split"]["batch"] == paper["no_replicas"]["batch"] == 8
  assert paper["gain"] == pytest.approx(paper["split"]["throughput_rps"] /
                                        paper["no_replicas"]["throughput_rps"])
  assert f"Dp={ap['Dp']} Dt={ap['Dt']}" in text and "paper's comparison" in text
  assert summary["why"] == why.strip()[len("why: "):]


def test_why_follows_the_recommended_system():
  ap = planner.analytical_plan(_cost(0.05, 0.001), 4, planner.Workload(32, 101, 2), BIG)
  split = planner.Candidate("disaggregated", 2, Dp=ap.Dp, Dt=ap.Dt, inverse_throughput=1.0)
  plain = planner.Candidate("colocated", 2, depth=4, replicas=1, inverse_throughput=2.0)
  reps = planner.Candidate("colocated", 2, depth=2, replicas=2, inverse_throughput=0.5)
  assert "the split is bound by" in planner._why(ap, None, split, split, plain, 4)
  why = planner._why(ap, None, reps, split, plain, 4)
  assert why.startswith("colocated D=2 x2") and "replicas" in why and "0.50x of it" in why
  other = planner.Candidate("disaggregated", 2, Dp=ap.Dp + 1, Dt=ap.Dt - 1,
                            inverse_throughput=0.8)
  assert f"Dp={other.Dp} Dt={other.Dt} beats the analytical" in planner._why(
      ap, None, other, split, plain, 4)


def test_max_replicas_caps_the_colocated_candidates():
  """Without data-parallel replicas (the paper's baseline) no colocated plan has any; with
  them allowed, the best colocated plan of a model one machine holds uses every machine."""
  wl = planner.Workload(prompt_len=32, output_len=21, batch_size=2, output_dist="equal")
  cost = _cost(0.002, 0.001)
  free = planner.search(cost, 4, wl, BIG, batch_sizes=(2,))
  one = planner.search(cost, 4, wl, BIG, batch_sizes=(2,), max_replicas=1)
  best_free = next(c for c in free if c.system == "colocated")
  assert best_free.depth * best_free.replicas == 4 and best_free.replicas > 1
  assert all(c.replicas == 1 for c in one if c.system == "colocated")
  assert one[0].throughput_rps <= free[0].throughput_rps * (1 + 1e-9)
