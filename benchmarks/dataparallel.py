"""Data-parallel pipelines on the engine vs the simulator: the planner's "D x R" baseline served.

  python benchmarks/dataparallel.py [--runs=3] [--requests=24]

On 4 devices, a saturated workload (every request waiting at t=0, batch 1, paper mode, N token
steps each) is served by one 4-stage pipeline and by 2 data-parallel replicas of a 2-stage
pipeline (serving/dataparallel.py, least_loaded routing), both paced: every stage step lasts
the table cost model's time (prompt Y, token t for the whole model, Y/t = 20, split over the
stages), the fake program computing underneath (tokens checked against `fake_generate`). The
same requests go through the simulator (`sim.simulate_colocated` with `replicas`), the model
the planner ranks its candidates with. Reported: request throughput (first arrival to last
finish) of each, `dp_over_single` on the engine and in the simulator, and their relative error.
Every throughput is modelled (paced steps sleep to the cost model); wall_s and the load averages
are measured. The last stdout line is one JSON object.
"""

import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from dejavu_jax import metrics  # noqa: E402
from dejavu_jax import sim  # noqa: E402
from dejavu_jax.config import ServeConfig, tiny_config  # noqa: E402
from dejavu_jax.costmodel import TableCostModel  # noqa: E402
from dejavu_jax.pipeline.fake import fake_generate  # noqa: E402
from dejavu_jax.serving.engine import make_engine  # noqa: E402
from dejavu_jax.workload import Request  # noqa: E402

_RUNS = flags.DEFINE_integer("runs", 3, "runs per layout (median reported)")
_REQUESTS = flags.DEFINE_integer("requests", 24, "requests per run (all waiting at t=0)")
_NEW = flags.DEFINE_integer("new_tokens", 8, "tokens generated per request")
_SCALE = flags.DEFINE_float("time_scale", 2.0, "multiplies Y and t (a loaded machine overruns "
                            "short paced steps: then the run is not a paced result)")

CFG = tiny_config("opt", num_layers=4, max_positions=128)
Y, T = 0.4, 0.02    # seconds per prompt / token step of the whole model (Y/t = 20), x time_scale
LAYOUTS = {"single_D4": (4, 1), "dp_D2x2": (2, 2)}   # (stages, replicas): 4 devices each


def _requests():
  return [Request(i, 0.0, (5, 6, 7, 8 + i % 5), _NEW.value) for i in range(_REQUESTS.value)]


def run_layout(stages: int, replicas: int, cost) -> dict:
  serve = ServeConfig(num_stages=stages, data_parallel=replicas, microbatch_size=1, max_len=32,
                      program="fake", pacing="paced", mode="paper")
  reqs = _requests()
  ref = {r.request_id: fake_generate(CFG, [r.prompt], r.max_new_tokens)[0] for r in reqs}
  tput, identical, overruns, loads = [], True, 0, []
  with make_engine(CFG, None, serve, cost_model=cost) as eng:
    eng.serve(reqs[:2 * replicas])   # compiles every replica's steps
    for _ in range(_RUNS.value):
      loads.append(os.getloadavg()[0])
      res = eng.serve(reqs)
      identical &= res.tokens() == ref
      overruns += res.summary.get("paced_overruns", 0)
      tput.append(metrics.summarize(res.records)["request_throughput"])
  simulated = sim.simulate_colocated(cost, sim.from_serving(reqs), stages, batch_size=1,
                                     replicas=replicas, microbatching="paper")
  return {"engine_rps": statistics.median(tput),
          "sim_rps": metrics.summarize(simulated.records)["request_throughput"],
          "identical": identical, "paced_overruns": overruns, "load_avg_1m": loads}


def main(argv):
  del argv
  t0 = time.perf_counter()
  y, t = Y * _SCALE.value, T * _SCALE.value
  cost = TableCostModel(CFG, prompt=y / CFG.num_layers, token=t / CFG.num_layers)
  rows = {name: run_layout(d, r, cost) for name, (d, r) in LAYOUTS.items()}
  eng_ratio = rows["dp_D2x2"]["engine_rps"] / rows["single_D4"]["engine_rps"]
  sim_ratio = rows["dp_D2x2"]["sim_rps"] / rows["single_D4"]["sim_rps"]
  result = {"layouts": rows, "prompt_s": y, "token_s": t, "new_tokens": _NEW.value,
            "requests": _REQUESTS.value, "runs": _RUNS.value,
            "dp_over_single_engine": eng_ratio, "dp_over_single_sim": sim_ratio,
            "dp_over_single_rel_error": abs(sim_ratio - eng_ratio) / eng_ratio,
            "identical": all(r["identical"] for r in rows.values()),
            "wall_s": round(time.perf_counter() - t0, 1)}
  for name, r in rows.items():
    print(f"{name:>10}: engine {r['engine_rps']:.3f} req/s, simulator {r['sim_rps']:.3f} req/s "
          f"(modelled; paced overruns {r['paced_overruns']}, tokens identical {r['identical']})")
  print(f"D=2x2 over D=4: engine {eng_ratio:.3f}x, simulator {sim_ratio:.3f}x (modelled)")
  if any(r["paced_overruns"] for r in rows.values()):
    print("warning: paced steps overran their modelled time (raise --time_scale)")
  # Which figures are measured on this machine and which are modelled (paced runs sleep to the
  # cost model's step times; the simulator is the cost model).
  result["kind"] = {"wall_s": "measured", "load_avg_1m": "measured",
                    **{k: "modelled" for k in ("engine_rps", "sim_rps", "dp_over_single_engine",
                                               "dp_over_single_sim", "dp_over_single_rel_error")}}
  print(json.dumps(result))


if __name__ == "__main__":
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  jaxcache.enable_compilation_cache()
  app.run(main)
