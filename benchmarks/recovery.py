"""Recovery benchmark: what each strategy costs while serving, and how long it takes to recover.

  python benchmarks/recovery.py [--runs=3] [--model=opt_125m]

A 2-stage pipeline (real compute, microbatch 4, all requests at t=0) serves the same workload
under `restart` (no state kept: the baseline), `replica` (every step's KV streamed to the
successor's host memory) and `snapshot` (orbax snapshots of every worker's caches every
--snapshot_every steps):
1. `<strategy>_overhead`: 1 - output throughput / the baseline's, failure-free, median of --runs
   interleaved runs (the per-step cost of keeping the state, on the step's critical path or not).
2. `<strategy>_restore_s`: after stage 1 is killed mid-run, the time from detection to the
   microbatches resumed (replacement started, caches loaded from their source, requests
   rewound or requeued), median over runs; and the tokens that had to be generated again.
Tokens are checked against the failure-free run (`tokens_identical`).
The last stdout line is one JSON object.
"""

import json
import os
import statistics
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from dejavu_jax.config import ServeConfig, get_model_config  # noqa: E402
from dejavu_jax.fault.controller import FailureSpec  # noqa: E402
from dejavu_jax.models import init_params  # noqa: E402
from dejavu_jax.serving.engine import PipelineEngine  # noqa: E402
from dejavu_jax.workload import Request  # noqa: E402

_RUNS = flags.DEFINE_integer("runs", 3, "runs per measurement (median reported)")
_MODEL = flags.DEFINE_string("model", "opt_125m", "model preset (random weights)")
_EVERY = flags.DEFINE_integer("snapshot_every", 8, "snapshot period in worker steps")
_NEW = flags.DEFINE_integer("new_tokens", 32, "tokens generated per request")

STRATEGIES = ("restart", "replica", "snapshot")


def main(_):
  cfg = get_model_config(_MODEL.value, max_positions=256)
  params = init_params(cfg, jax.random.key(0))
  reqs = [Request(i, 0.0, tuple(range(3 + i, 35 + i)), _NEW.value) for i in range(8)]
  engines = {}
  for name in STRATEGIES:
    sc = ServeConfig(num_stages=2, microbatch_size=4, max_len=128, recovery=name,
                     heartbeat_s=0.05, heartbeat_timeout_s=0.5, snapshot_every=_EVERY.value)
    engines[name] = PipelineEngine(cfg, params, sc)
  tput = {n: [] for n in STRATEGIES}
  restore = {n: [] for n in STRATEGIES}
  redone = {n: [] for n in STRATEGIES}
  identical = True
  try:
    for eng in engines.values():
      eng.warmup()
    ref = engines["restart"].serve(reqs).tokens()
    for _ in range(_RUNS.value):
      for name, eng in engines.items():
        res = eng.serve(reqs)
        tput[name].append(res.summary["output_throughput"])
        identical &= res.tokens() == ref
    for _ in range(_RUNS.value):
      for name, eng in engines.items():
        wall = statistics.median(len(reqs) * _NEW.value / t for t in tput[name])
        res = eng.serve(reqs, failures=[FailureSpec(0.5 * wall, 1)])
        identical &= res.tokens() == ref
        for ev in res.recoveries:
          restore[name].append(ev.recovered_at - ev.detected_at)
          redone[name].append(ev.recomputed_tokens)
  finally:
    for eng in engines.values():
      eng.close()
  base = statistics.median(tput["restart"])
  out = {"model": _MODEL.value, "runs": _RUNS.value, "snapshot_every": _EVERY.value,
         "baseline_tok_s": base}
  for name in STRATEGIES:
    out[f"{name}_tok_s"] = statistics.median(tput[name])
    out[f"{name}_overhead"] = 1 - statistics.median(tput[name]) / base
    out[f"{name}_restore_s"] = statistics.median(restore[name]) if restore[name] else None
    out[f"{name}_redone_tokens"] = statistics.median(redone[name]) if redone[name] else None
  out["tokens_identical"] = bool(identical)
  # Real compute, real time (no pacing): every figure here is measured.
  out["kind"] = {k: "measured" for k in out if k not in ("model", "runs", "snapshot_every")}
  print(json.dumps(out))


if __name__ == "__main__":
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  jaxcache.enable_compilation_cache()   # DEJAVU_JAX_CACHE_DIR=off times cold compiles
  app.run(main)
