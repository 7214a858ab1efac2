"""Pipeline benchmark: real-mode D=2 vs D=1 throughput, and paced inverse throughput vs I_c.

  python benchmarks/pipeline.py [--runs=3]

1. real_d2_over_d1: the same OPT-125M-shaped random model served by a 1-stage and a 2-stage
   pipeline (microbatch injection, D microbatches in flight), all requests arriving at once;
   output tokens/s of D=2 over D=1, median of --runs interleaved runs. On this 2-core CPU one XLA
   device already uses both cores, so stages cannot overlap and the ratio measures the pipeline's
   overhead (expect <= 1); on D accelerators it would measure the pipeline's speedup.
2. paced_vs_formula: a saturated pipeline whose stage steps last Y (prompt) and t (token) seconds
   (pacing, real tiny-model compute underneath); the measured time between microbatch finishes
   over the analytical I_c = Y + N t + (D-1)(Y-t)/D of DEJAVU.md, for D = 2 and 4 (target: within
   +-10%).

The last stdout line is one JSON object.
"""

import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from dejavu_jax.config import ServeConfig, get_model_config, tiny_config  # noqa: E402
from dejavu_jax.costmodel import TableCostModel  # noqa: E402
from dejavu_jax.models import init_params  # noqa: E402
from dejavu_jax.serving.engine import PipelineEngine  # noqa: E402
from dejavu_jax.workload import Request  # noqa: E402

_RUNS = flags.DEFINE_integer("runs", 3, "runs per measurement (median reported)")
_REQUESTS = flags.DEFINE_integer("requests", 16, "requests per real-mode run")
_NEW = flags.DEFINE_integer("new_tokens", 16, "tokens generated per request (real mode)")


def real_mode():
  cfg = get_model_config("opt_125m", max_positions=256)
  params = init_params(cfg, jax.random.key(0))
  reqs = [Request(i, 0.0, tuple(range(3, 67)), _NEW.value) for i in range(_REQUESTS.value)]
  engines = {d: PipelineEngine(cfg, params, ServeConfig(num_stages=d, microbatch_size=4,
                                                        max_len=128, mode="paper"))
             for d in (1, 2)}
  tput = {1: [], 2: []}
  try:
    for eng in engines.values():
      eng.serve(reqs[:4])  # compile
    for _ in range(_RUNS.value):
      for d, eng in engines.items():
        res = eng.serve(reqs)
        tput[d].append(res.summary["output_throughput"])
  finally:
    for eng in engines.values():
      eng.close()
  med = {d: statistics.median(v) for d, v in tput.items()}
  return {"real_tok_s_d1": med[1], "real_tok_s_d2": med[2], "real_d2_over_d1": med[2] / med[1]}


def paced_mode():
  cfg = tiny_config("opt", num_layers=4, max_positions=128)
  params = init_params(cfg, jax.random.key(0))
  y, t, n = 0.04, 0.008, 8
  out = {}
  for d in (2, 4):
    per = cfg.num_layers // d
    cost = TableCostModel(cfg, prompt=y / per, token=t / per)
    serve = ServeConfig(num_stages=d, microbatch_size=1, max_len=32, pacing="paced",
                        mode="paper")
    formula = y + n * t + (d - 1) * (y - t) / d
    num_mb = 6 * d
    ratios = []
    with PipelineEngine(cfg, params, serve, cost_model=cost) as eng:
      eng.generate([[5, 6, 7]], 3)
      for _ in range(_RUNS.value):
        res = eng.serve([Request(i, 0.0, (5, 6, 7), n + 1) for i in range(num_mb)])
        fin = sorted(r.finish for r in res.records)
        ratios.append((fin[-1] - fin[d - 1]) / (num_mb - d) / formula)
    out[f"paced_vs_formula_d{d}"] = statistics.median(ratios)
  out["paced_vs_formula"] = max(out.values(), key=lambda r: abs(r - 1))
  return out


def main(argv):
  del argv
  t0 = time.perf_counter()
  result = {**real_mode(), **paced_mode(), "runs": _RUNS.value, "device": jax.devices()[0].platform}
  for k, v in result.items():
    print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
  result["wall_s"] = round(time.perf_counter() - t0, 1)
  # Which figures are measured on this machine and which are modelled (a cost model, the
  # simulator, or a paced run, which sleeps to the cost model's step times and so agrees
  # with the simulator by construction).
  result["kind"] = {**{k: "measured" for k in ("real_tok_s_d1", "real_tok_s_d2",
                                                "real_d2_over_d1", "wall_s")},
                    **{k: "modelled" for k in result if k.startswith("paced_vs_formula")}}
  print(json.dumps(result))


if __name__ == "__main__":
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  jaxcache.enable_compilation_cache()   # DEJAVU_JAX_CACHE_DIR=off times cold compiles
  app.run(main)
