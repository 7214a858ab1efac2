"""Ray runtime benchmark: step-time overhead over the threads runtime, transports, recovery.

  python benchmarks/runtime.py [--runs=3] [--new_tokens=24]

1. `ray_over_local_step_time`: a 2-stage OPT-125M pipeline (random weights, real compute), one
   microbatch of 8 requests (prompt 32): the median time between a request's consecutive tokens
   (one decode step through both stages, the logits back to the engine, sampling, the next
   step submitted) on the Ray runtime over the same on the local runtime, median of --runs
   interleaved runs. `..._2mb`: the same with two microbatches in flight (16 requests).
   `ray_call_rtt_ms`: one driver -> actor -> driver call (what every hop costs);
   `ray_over_local_stage_busy`: the stages' own step time (compute, in the workers) on Ray over
   local: what part of the step-time ratio is compute in separate processes, not messaging.
2. `transport_GBps[transport][payload]`: actor-to-actor transfers of an OPT-1.3B-shaped stage
   (12 of 24 layers, batch 8, float16, 32 heads x 64): one decode step's KV delta (786 KB), a
   prompt block (500 tokens, 197 MB) and a decode step's activations (8 x 2048 float32, 64 KB),
   each timed from send until the receiver has it as host memory (median of --runs), for the
   object store (numpy in the call) and `jax.experimental.transfer` (offer, ticket, pull).
3. `recovery_s_ray`: replica strategy, stage 1 SIGKILLed mid-run: from the kill to the first
   token after recovery (median); `recovery_s_local` the same on the threads runtime (whose
   "kill" stops a thread), `detection_s_*` (kill -> detected) and `resumed_s_*` (kill ->
   replacement running, caches restored, steps resubmitted). Each Ray failure run starts once
   the spare (started after the previous kill) is warm (`RayRuntime.wait_spares`; the waits in
   `spare_warm_wait_s`): the recovery of the paper's setting, with a spare machine ready.
4. `tokens_identical`: every Ray run's tokens equal the local runtime's.
5. `transport_memcpy_fraction`: a 100 MB block between two actors on this node over the Ray
   runtime's default transport (shm), landed in a buffer the receiver owns, over an in-process
   memcpy of it (`memcpy_GBps`); `..._by_transport` also for the object store.
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
import numpy as np  # noqa: E402
import ray  # noqa: E402
from absl import app, flags  # noqa: E402

from dejavu_jax.config import ServeConfig, get_model_config  # noqa: E402
from dejavu_jax.fault.inject import FailureSpec  # noqa: E402
from dejavu_jax.models import init_params  # noqa: E402
from dejavu_jax.runtime import ray as ray_rt  # noqa: E402
from dejavu_jax.runtime.ray_actor import TRANSPORTS  # noqa: E402
from dejavu_jax.serving.engine import PipelineEngine  # noqa: E402
from dejavu_jax.workload import Request  # noqa: E402

_RUNS = flags.DEFINE_integer("runs", 3, "runs per measurement (median reported)")
_NEW = flags.DEFINE_integer("new_tokens", 24, "tokens generated per request")

PAYLOADS = {   # name -> (shape, dtype): an OPT-1.3B stage of 12 layers, batch 8
    "kv_delta": ((2, 12, 8, 1, 32, 64), np.float16),
    "prompt_block": ((2, 12, 8, 500, 32, 64), np.float16),
    "activations": ((8, 2048), np.float32),
}


class _Bench:
  """An actor that owns one transport and sends payloads of a given shape to a peer."""

  def __init__(self, transport: str):
    import jax as jx  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported
    self.t = TRANSPORTS[transport](jx.devices()[0], 60.0)
    self.name = transport

  def ping(self):
    return True

  def sink(self, x):
    return int(np.asarray(x).nbytes)

  def pull(self, ticket):
    (x,) = self.t.pull(ticket)
    return int(x.nbytes)

  def send(self, peer, shape, dtype, runs):
    x = np.ones(shape, dtype)
    out = []
    for _ in range(runs + 1):   # the first one warms the connection up
      t0 = time.perf_counter()
      if self.name == "object_store":
        ray.get(peer.sink.remote(x))
      else:
        ray.get(peer.pull.remote(self.t.offer([x])))
      out.append(time.perf_counter() - t0)
    return out[1:]


def _tpot(res) -> float:
  gaps = [b - a for r in res.records for a, b in zip(r.token_times, r.token_times[1:])]
  return statistics.median(gaps)


def _memcpy_fraction(runs: int) -> dict:
  """A 100 MB block from one actor to another on this node, landed by the receiver in its own
  buffer (benchmarks/transport.py's `Peer`), over an in-process memcpy of the same block, per
  transport: `transport_memcpy_fraction` is the runtime's default transport's."""
  from benchmarks.transport import Peer  # pylint: disable=g-import-not-at-top
  env = {"env_vars": ray_rt.actor_env(1, 0)}
  cls = ray.remote(num_cpus=0, runtime_env=env)(Peer)
  n = 100 * 2**20
  solo = cls.remote(None)
  memcpy = n / statistics.median(ray.get(solo.memcpy.remote(n, runs)))
  ray.kill(solo)
  out = {"memcpy_GBps": memcpy / 1e9}
  for name in ("shm", "object_store"):
    a, b = cls.remote(name), cls.remote(name)
    node = ray.get(b.node.remote())
    ray.get(b.prepare.remote(n))
    gbps = n / statistics.median(ray.get(a.send.remote(b, node, n, runs)))
    out[name] = gbps / memcpy
    for h in (a, b):
      ray.kill(h)
  return out


def _transports(runs: int) -> dict:
  env = {"env_vars": ray_rt.actor_env(1, 0)}
  out = {}
  for name in ("object_store", "jax_transfer"):   # shm: _memcpy_fraction
    cls = ray.remote(num_cpus=0, runtime_env=env)(_Bench)
    a, b = cls.remote(name), cls.remote(name)
    ray.get([a.ping.remote(), b.ping.remote()])
    out[name] = {}
    for payload, (shape, dtype) in PAYLOADS.items():
      nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
      t = statistics.median(ray.get(a.send.remote(b, shape, dtype, runs)))
      out[name][payload] = {"GBps": nbytes / t / 1e9, "ms": t * 1e3, "bytes": nbytes}
    for h in (a, b):
      ray.kill(h)
  return out


def main(_):
  ray_rt.init_ray(num_cpus=8)
  cfg = get_model_config("opt_125m", max_positions=256)
  params = init_params(cfg, jax.random.key(0))
  one = [Request(i, 0.0, tuple(range(3 + i, 35 + i)), _NEW.value) for i in range(8)]
  two = [Request(i, 0.0, tuple(range(3 + i, 35 + i)), _NEW.value) for i in range(16)]
  base = dict(num_stages=2, microbatch_size=8, max_len=128, recovery="replica",
              heartbeat_s=0.1, heartbeat_timeout_s=1.0)
  engines = {"local": PipelineEngine(cfg, params, ServeConfig(**base)),
             "ray": PipelineEngine(cfg, params, ServeConfig(**base, runtime="ray"))}
  tpot = {k: {"one": [], "two": []} for k in engines}
  busy = {k: [] for k in engines}   # stage compute per one-microbatch run (both stages)
  rec = {k: [] for k in engines}
  det = {k: [] for k in engines}
  resumed = {k: [] for k in engines}
  spare_wait = {k: [] for k in engines}
  identical = True
  try:
    for eng in engines.values():
      eng.warmup()
    ref = {"one": engines["local"].serve(one).tokens(),
           "two": engines["local"].serve(two).tokens()}
    rtt = []
    w = engines["ray"].runtime.worker(0)
    for _ in range(50):
      t0 = time.perf_counter()
      w.stats()
      rtt.append(time.perf_counter() - t0)
    for _ in range(_RUNS.value):
      for name, eng in engines.items():
        for key, reqs in (("one", one), ("two", two)):
          res = eng.serve(reqs)
          identical &= res.tokens() == ref[key]
          tpot[name][key].append(_tpot(res))
          if key == "one":
            busy[name].append(sum(res.stage_busy_s))
    for _ in range(_RUNS.value):
      for name, eng in engines.items():
        if name == "ray":   # the spare started after the last kill is warm again
          spare_wait[name].append(eng.runtime.wait_spares())
        t_fail = 0.4 * statistics.median(tpot[name]["two"]) * _NEW.value
        res = eng.serve(two, failures=[FailureSpec(t_fail, 1)])
        identical &= res.tokens() == ref["two"]
        for ev in res.recoveries:
          after = [t for r in res.records for t in r.token_times if t > ev.recovered_at]
          if after:
            rec[name].append(min(after) - ev.failed_at)
          det[name].append(ev.detection_s)
          resumed[name].append(ev.recovery_s)
  finally:
    for eng in engines.values():
      eng.close()
  transports = _transports(_RUNS.value)
  fraction = _memcpy_fraction(max(_RUNS.value, 3))
  med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
  out = {
      "model": "opt_125m", "stages": 2, "batch": 8, "runs": _RUNS.value,
      "local_step_ms": med(tpot["local"]["one"]) * 1e3,
      "ray_step_ms": med(tpot["ray"]["one"]) * 1e3,
      "ray_over_local_step_time": med(tpot["ray"]["one"]) / med(tpot["local"]["one"]),
      "ray_over_local_step_time_2mb": med(tpot["ray"]["two"]) / med(tpot["local"]["two"]),
      "ray_over_local_stage_busy": med(busy["ray"]) / med(busy["local"]),
      "ray_call_rtt_ms": med(rtt) * 1e3,
      "transport_GBps": {t: {p: v["GBps"] for p, v in d.items()} for t, d in transports.items()},
      "transport_ms": {t: {p: v["ms"] for p, v in d.items()} for t, d in transports.items()},
      "recovery_s_ray": med(rec["ray"]), "recovery_s_local": med(rec["local"]),
      "detection_s_ray": med(det["ray"]), "detection_s_local": med(det["local"]),
      "resumed_s_ray": med(resumed["ray"]), "resumed_s_local": med(resumed["local"]),
      "spare_warm_wait_s": spare_wait["ray"],
      "tokens_identical": bool(identical),
      "transport_memcpy_fraction": fraction[ServeConfig().cluster.ray_transport],
      "transport_memcpy_fraction_by_transport": {k: v for k, v in fraction.items()
                                                 if k != "memcpy_GBps"},
      "memcpy_GBps": fraction["memcpy_GBps"],
      "load_avg": list(os.getloadavg()),
  }
  # Real compute and real transports on this machine: every figure is measured.
  out["kind"] = {k: "measured" for k in out if k not in ("model", "stages", "batch", "runs")}
  ray.shutdown()
  print(json.dumps(out))


if __name__ == "__main__":
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  jaxcache.enable_compilation_cache()   # DEJAVU_JAX_CACHE_DIR=off times cold compiles
  app.run(main)
