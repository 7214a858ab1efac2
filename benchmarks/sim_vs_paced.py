"""Does the simulator predict the engine? Paced engine runs against simulated runs, same requests.

For each scenario (pipeline depth D, microbatch size B, a request rate) one request list is drawn
(`serving.workload.make_workload`: Poisson arrivals, a fixed prompt, lognormal output lengths,
then `group_paper_mode` so that each run of B consecutive requests shares its output length, as
in the paper). The same list is served twice:

* by the real `PipelineEngine` in paced mode on the tiny OPT model: every stage step computes for
  real (~1-3 ms) and then lasts exactly what the cost model says (tens of ms), so wall-clock time
  follows the modeled schedule;
* by `sim.simulate_colocated` with the same cost model, in the engine's semantics: paper-mode
  microbatch formation (`microbatching="paper"`), D microbatches in flight with injection when
  one finishes, the head time on the last stage, the first token at the end of the prompt step.

Both runs are summarized by `serving.metrics.summarize` with the same duration rule (first
arrival to last finish; the engine's own `ServeResult.summary` divides by its wall time instead).
The cost model is a `TableCostModel` whose per-stage step times do not depend on D (its per-layer
times are the per-stage ones divided by the layers per stage), and depend on batch, prompt length
and context through small grids, so a disagreement about which batch or context a step is
charged for would show. The rates are fractions of the saturated capacity from the paper's
formula I_c = Y + N t + (D-1)(Y-t)/D (DEJAVU.md).

Where the two can still differ, and why. The engine keeps its paced clock from modeled instants
(a prefill is ready at max(the modeled end of the step that freed its slot, its last request's
arrival); a decode or inter-stage step at the previous step's modeled end; tokens are stamped at
the step's end; a step charges the context already cached), so host lag on the engine thread does
not leak into the schedule. With no pace overruns the two agree to rounding (measured: relative
errors ~1e-12 on every scenario). What remains possible:

1. Overruns. A step whose real compute outlasts its modeled time ends when it really ended (the
   engine counts these as `paced_overruns`); the simulator knows nothing of it. Keep the modeled
   step times well above the real ones (here: tens of ms against ~1-3 ms).
2. Arrival races. The engine admits requests on its real clock, so a request arriving within the
   engine thread's lag of an injection can join a different microbatch than in the simulator;
   paper-mode grouping then splits later groups differently for a while.
3. Ties. Steps ready at a stage at the same modeled instant run in event order in the simulator,
   in inbox (real-time) order in the engine.
4. Mixed mode (`--mode=mixed`): the engine pads finished rows but charges a decode step (and the
   head) for the live rows only; the simulator follows with `live_rows_only=True`.

Swapping (`--swapping`): the engine keeps 2 device cache buffers per worker and, in paced mode,
times each swap-in on the modeled link as the simulator does (it starts when the stage's previous
step started, the microbatch's last swap-out landed and the link is free; the step waits for it).
The engine charges a swap-in only when the microbatch really was not resident (with 2 in flight
both stay on the device); the simulator skips swap-ins when at most 2 microbatches are in flight.

Failures (`--failures`): for each recovery strategy (restart, reprefill, replica, snapshot) and
for one and for three crashes, the paced engine (fake stage program, `FailureSpec(after_steps=n)`:
placed by step count, so load on this machine does not move them) against the simulator with the
same failures (`sim.Failure(after_steps=n)`), the same strategy objects (fault/strategies.py) and
the engine's recovery configuration: heartbeat period and timeout, snapshot period, a replica
link and a snapshot link standing for the in-process host copy and the local orbax disk (their
write side decides which replica or snapshot is complete when a stage dies). What the cost model
does not model is the engine's own recovery work on this machine: starting a worker thread,
placing its weights, loading the restored caches (host copies, orbax reads, on 2 cores shared
with other jobs: 0.05 to 0.5 s, varying from run to run). It is measured in each engine run
(detection -> recovered, per failure) and given to the simulator as `replacement_start_s`, as
the design asks for measured constants; compared is everything else: detection, which work is
lost and redone, the rollback of the other stages, requeue and re-batching, and the schedule
after the recovery.
Compared: the makespan (first arrival to last finish) and the mean end-to-end latency, within
10%: they are what a failure costs the workload, and they integrate every piece of the recovery
(which work is lost, when it resumes, how the requeued work is re-batched). The recomputed tokens
and the failures' lost time (failure -> resumed) are reported beside them, not asserted: both
hinge on single events (one step more or less done when the dead stage is noticed changes the
recomputed tokens by a microbatch's rows; the engine's heartbeat phase is not the simulator's,
so detection differs by up to one heartbeat period). Both runs replay the cost model: the
figures are `modelled`.

Run: python benchmarks/sim_vs_paced.py [--quick] [--swapping] [--failures]. Prints a table per
scenario; the last stdout line is one JSON object with `max_rel_error_throughput` and
`max_rel_error_p50_latency` (with --failures: `max_rel_error_makespan`,
`max_rel_error_mean_latency` and one row per strategy and failure count).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dejavu_jax import costmodel as cm  # noqa: E402
from dejavu_jax import sim  # noqa: E402
from dejavu_jax.config import ServeConfig, tiny_config  # noqa: E402
from dejavu_jax.costmodel import TableCostModel  # noqa: E402
from dejavu_jax.fault.inject import FailureSpec  # noqa: E402
from dejavu_jax.models import init_params  # noqa: E402
from dejavu_jax import metrics  # noqa: E402
from dejavu_jax import workload as wl  # noqa: E402
from dejavu_jax.serving.engine import PipelineEngine  # noqa: E402

CFG = tiny_config("opt", num_layers=4, max_positions=128)
PROMPT_LEN = 16
OUTPUT_SPEC = "lognormal:12,10"   # mean 12, median 10 tokens; clamped to [2, 24]
MIN_OUT, MAX_OUT = 2, 24
MAX_LEN = 48                      # prompt + longest output fits

# Per-stage step times in seconds, whatever D (tens of ms: the tiny model's real compute, 1-3 ms,
# stays well under them, so the pacing is exact). Grids: (prompt_len, batch), (batch, context).
STAGE_PROMPT = {(1, 1): 0.040, (1, 8): 0.050, (64, 1): 0.080, (64, 8): 0.160}
STAGE_TOKEN = {(1, 1): 0.020, (1, 64): 0.024, (8, 1): 0.028, (8, 64): 0.036}
HEAD = {1: 0.002, 8: 0.006}       # last stage, per step, by rows

TARGET = 0.10
SWAP_REF_CONTEXT = 24


def swap_link(sc: "Scenario") -> cm.Link | None:
  """The scenario's device<->host link (see `Scenario.swap_ms`), or None without swapping."""
  if sc.swap_ms is None:
    return None
  nbytes = cm.kv_bytes(CFG, CFG.num_layers // sc.stages, sc.batch, SWAP_REF_CONTEXT)
  return cm.Link(f"swap_{sc.swap_ms:g}ms", nbytes / (sc.swap_ms * sc.stretch * 1e-3))


@dataclasses.dataclass(frozen=True)
class Scenario:
  """One comparison point.

  Attributes:
    stages: pipeline depth D.
    batch: microbatch size B.
    load: request rate as a fraction of the saturated capacity.
    span_s: the arrivals span about this long (sets the number of requests).
    min_requests: at least this many requests.
    mode: the engine's serving mode, "paper" or "mixed".
    seed: workload seed.
    swap_ms: microbatch swapping on, over a device<->host link on which swapping in a whole
      microbatch of B rows at context SWAP_REF_CONTEXT takes this many ms (None: off). The
      engine keeps 2 device buffers per worker and paces swap-ins on that link; the simulator
      gets the same link as `swap_link`.
    stretch: every modeled duration (steps, head, swap transfers) x this, so that real compute
      on a loaded machine stays inside the modeled steps (pace overruns break the agreement).
  """

  stages: int
  batch: int
  load: float
  span_s: float = 4.0
  min_requests: int = 12
  mode: str = "paper"
  seed: int = 0
  swap_ms: float | None = None
  stretch: float = 1.0


def cost_model(stages: int, stretch: float = 1.0) -> TableCostModel:
  """`STAGE_*` per-stage times as a per-layer table for a D-stage split of the 4 layers."""
  per_stage = CFG.num_layers // stages
  scale = lambda table: {k: v * stretch / per_stage for k, v in table.items()}  # noqa: E731
  return TableCostModel(CFG, prompt=scale(STAGE_PROMPT), token=scale(STAGE_TOKEN),
                        head={k: v * stretch for k, v in HEAD.items()})


def capacity_rps(cost: TableCostModel, stages: int, batch: int) -> float:
  """Saturated requests/s from I_c = Y + N t + (D-1)(Y-t)/D with the mean output length."""
  layers = CFG.num_layers // stages
  mean_out = wl.lognormal_clamped_mean(*wl.lognormal_params(12, 10), MIN_OUT, MAX_OUT)
  n = mean_out - 1                                       # token steps after the prompt step
  head = cost.head_time(batch)
  y = cost.prompt_time(layers, PROMPT_LEN, batch) + head / stages
  t = cost.token_time(layers, batch, PROMPT_LEN + int(n) // 2) + head / stages
  ic = y + n * t + (stages - 1) * (y - t) / stages
  return batch / ic


def make_requests(sc: Scenario, rate: float) -> list[wl.Request]:
  n = max(sc.min_requests, round(rate * sc.span_s))
  reqs = wl.make_workload(wl.WorkloadConfig(
      rate=rate, num_requests=n, prompt_len=PROMPT_LEN, output_len=OUTPUT_SPEC,
      vocab_size=CFG.vocab_size, seed=sc.seed, min_output=MIN_OUT, max_output=MAX_OUT))
  return wl.group_paper_mode(reqs, sc.batch) if sc.mode == "paper" else reqs


def make_engine(params, sc: Scenario, cost: TableCostModel) -> PipelineEngine:
  serve = ServeConfig(num_stages=sc.stages, microbatch_size=sc.batch, max_len=MAX_LEN,
                      pacing="paced", mode=sc.mode,
                      swapping="off" if sc.swap_ms is None else "on")
  eng = PipelineEngine(CFG, params, serve, cost_model=cost, swap_link=swap_link(sc))
  # Compile the prefill and the decode at every context the runs reach (decode compiles once
  # per context bucket) outside the runs.
  eng.generate([[5] * PROMPT_LEN] * sc.batch, MAX_OUT)
  return eng


def _rel(a: float, b: float) -> float:
  """|a - b| / |b| (b is the engine's number: the truth the simulator should predict)."""
  return abs(a - b) / abs(b) if b else (0.0 if a == b else math.inf)


def run_scenario(eng: PipelineEngine, sc: Scenario, cost: TableCostModel) -> dict:
  """Serves and simulates one scenario's requests; returns both summaries and the errors."""
  rate = sc.load * capacity_rps(cost, sc.stages, sc.batch)
  reqs = make_requests(sc, rate)
  overruns0 = sum(st.overruns for st in eng.worker_stats())
  served = eng.serve(reqs)
  overruns = sum(st.overruns for st in eng.worker_stats()) - overruns0
  if served.rejected:
    raise RuntimeError(f"the engine rejected requests: {served.rejected}")
  simulated = sim.simulate_colocated(
      cost, sim.from_serving(reqs), sc.stages, batch_size=sc.batch,
      microbatching="paper" if sc.mode == "paper" else "greedy",
      live_rows_only=sc.mode == "mixed", swap_link=swap_link(sc))
  eng_s = metrics.summarize(served.records)     # first arrival to last finish, as the sim
  sim_s = metrics.summarize(simulated.records)
  by_id = {r.rid: r for r in simulated.records}
  finish_diff = [abs(by_id[r.request_id].finish - r.finish) for r in served.records]
  ttft_diff = [abs(by_id[r.request_id].first_token - r.first_token) for r in served.records]
  keys = ("request_throughput", "output_throughput", "norm_latency_p50_s_per_tok",
          "norm_latency_p99_s_per_tok", "median_ttft_ms", "median_tpot_ms", "duration")
  return {
      "stages": sc.stages, "batch": sc.batch, "load": sc.load, "mode": sc.mode,
      "swap_ms": sc.swap_ms,
      "rate": rate, "num_requests": len(reqs),
      "engine": {k: eng_s[k] for k in keys}, "sim": {k: sim_s[k] for k in keys},
      "rel_error_throughput": _rel(sim_s["request_throughput"], eng_s["request_throughput"]),
      "rel_error_p50_latency": _rel(sim_s["norm_latency_p50_s_per_tok"],
                                    eng_s["norm_latency_p50_s_per_tok"]),
      "max_abs_finish_diff_ms": 1e3 * max(finish_diff),
      "mean_abs_finish_diff_ms": 1e3 * float(np.mean(finish_diff)),
      "max_abs_ttft_diff_ms": 1e3 * max(ttft_diff),
      "pace_overruns": overruns,
      "engine_wall_s": served.wall_s,
  }


def format_row(row: dict) -> str:
  """A readable table of one scenario: engine vs simulator, metric by metric."""
  head = (f"D={row['stages']} B={row['batch']} load={row['load']:.2f} "
          f"rate={row['rate']:.2f} req/s  {row['num_requests']} requests  mode={row['mode']}"
          + (f"  swapping (swap-in {row['swap_ms']:g} ms)" if row.get("swap_ms") else ""))
  lines = [head, "-" * len(head),
           f"{'metric':<28}{'engine':>12}{'sim':>12}{'rel err':>10}"]
  for k, e in row["engine"].items():
    s = row["sim"][k]
    lines.append(f"{k:<28}{e:>12.5g}{s:>12.5g}{_rel(s, e):>10.2%}")
  lines.append(f"per request |finish diff| max {row['max_abs_finish_diff_ms']:.2f} ms, "
               f"mean {row['mean_abs_finish_diff_ms']:.2f} ms; |ttft diff| max "
               f"{row['max_abs_ttft_diff_ms']:.2f} ms; pace overruns {row['pace_overruns']}")
  return "\n".join(lines)


def grid(quick: bool, mode: str, swapping: bool = False) -> list[Scenario]:
  """D in {1, 2, 4} x B in {2, 8} x load in {0.3, 0.85}; --quick: D in {1, 2}, B 4, shorter.
  --swapping: D 4 (swap-ins every step) and D 2 (both microbatches stay on the device), B in
  {2, 8}, load 0.85, a swap-in that hides under the step (5 ms) and one that does not (60 ms);
  every modeled time stretched 3x (real compute plus swap bookkeeping stays inside the steps)."""
  if swapping:
    return [Scenario(d, b, 0.85, mode=mode, swap_ms=ms, stretch=3.0)
            for d, b, ms in ((4, 2, 5.0), (4, 8, 5.0), (4, 2, 60.0), (4, 8, 60.0),
                             (2, 8, 60.0))]
  if quick:
    return [Scenario(d, 4, load, span_s=2.0, mode=mode)
            for d in (1, 2) for load in (0.3, 0.85)]
  return [Scenario(d, b, load, mode=mode)
          for d in (1, 2, 4) for b in (2, 8) for load in (0.3, 0.85)]


def run_grid(scenarios: list[Scenario], params=None, log=print) -> dict:
  """Runs every scenario (one engine per (D, B, mode)); returns the JSON-able result."""
  params = init_params(CFG, jax.random.key(0)) if params is None else params
  rows, engines = [], {}
  try:
    for sc in scenarios:
      key = (sc.stages, sc.batch, sc.mode, sc.swap_ms, sc.stretch)
      cost = cost_model(sc.stages, sc.stretch)
      if key not in engines:
        for old in engines.values():  # one engine's worker threads alive at a time
          old.close()
        engines = {key: make_engine(params, sc, cost)}
      row = run_scenario(engines[key], sc, cost)
      rows.append(row)
      log(format_row(row) + "\n")
  finally:
    for eng in engines.values():
      eng.close()
  return {
      "max_rel_error_throughput": max(r["rel_error_throughput"] for r in rows),
      "max_rel_error_p50_latency": max(r["rel_error_p50_latency"] for r in rows),
      "target": TARGET,
      "scenarios": [{k: v for k, v in r.items() if k not in ("engine", "sim")} |
                    {"engine_throughput_rps": r["engine"]["request_throughput"],
                     "sim_throughput_rps": r["sim"]["request_throughput"],
                     "engine_p50_norm_latency": r["engine"]["norm_latency_p50_s_per_tok"],
                     "sim_p50_norm_latency": r["sim"]["norm_latency_p50_s_per_tok"]}
                    for r in rows],
  }


# ---- failures ----
FAIL_STRATEGIES = ("restart", "reprefill", "replica", "snapshot")
# A short period keeps the heartbeat phase (where the engine and the simulator may differ) small;
# a timeout well above it keeps a loaded machine's scheduling hiccups from looking like deaths.
HEARTBEAT_S, HEARTBEAT_TIMEOUT_S = 0.1, 1.0
SNAPSHOT_EVERY = 8
# The engine's replicas are host copies inside this process (a few ms). Its snapshots are orbax
# checkpoints on local disk: how long one takes to complete is measured (`snapshot_link`).
REPLICA_LINK = cm.Link("in_process_host_copy", 1e9, 0.002)
# (stage, after that many steps of its worker): distinct stages (one armed failure per worker),
# spaced so that each comes after the previous recovery.
FAILURE_PLANS = {1: ((1, 20),), 3: ((1, 20), (3, 45), (0, 70))}


@dataclasses.dataclass(frozen=True)
class FailScenario:
  """One strategy under one failure plan, on a D = 4, B = 4 pipeline near saturation."""

  strategy: str
  failures: int                   # a key of FAILURE_PLANS
  stages: int = 4
  batch: int = 4
  load: float = 0.5
  span_s: float = 3.0
  seed: int = 1
  stretch: float = 2.0      # real recovery work (replica resyncs, orbax saves) stays in the steps

  def workload(self) -> Scenario:
    return Scenario(self.stages, self.batch, self.load, span_s=self.span_s, seed=self.seed,
                    stretch=self.stretch)


def make_failure_engine(params, sc: FailScenario, cost: TableCostModel) -> PipelineEngine:
  serve = ServeConfig(num_stages=sc.stages, microbatch_size=sc.batch, max_len=MAX_LEN,
                      pacing="paced", mode="paper", program="fake", recovery=sc.strategy,
                      heartbeat_s=HEARTBEAT_S, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
                      snapshot_every=SNAPSHOT_EVERY)
  eng = PipelineEngine(CFG, params, serve, cost_model=cost)
  # Every prefill bucket a continuation (prompt + tokens so far) can need: a compile inside a
  # measured run would be a pace overrun of seconds.
  for n in (PROMPT_LEN, 2 * PROMPT_LEN, MAX_LEN - 8):
    eng.generate([[5] * n] * sc.batch, 3)
  return eng


def warm_up_recovery(eng: PipelineEngine, sc: FailScenario) -> None:
  """One small serve with a crash under the scenario's strategy, so that what its recovery
  compiles (cache exports, loads, snapshot restores) is compiled before the measured run; then
  fresh workers with nothing armed."""
  reqs = [wl.Request(i, 0.0, (5,) * PROMPT_LEN, 12) for i in range(2 * sc.batch)]
  eng.serve(reqs, failures=[FailureSpec(stage=1, after_steps=3 * SNAPSHOT_EVERY)])
  eng.set_recovery(sc.strategy)


def snapshot_link(sc: FailScenario, repeats: int = 3) -> cm.Link:
  """The engine's snapshot as a link: the measured median time for a worker's `Snapshotter` to
  complete one snapshot of D microbatch caches of this scenario's shape (a worker holds D), on
  this machine now. It decides how stale the last complete snapshot is when a stage dies."""
  from dejavu_jax.studies.failstudy import measure_snapshot_link  # pylint: disable=g-import-not-at-top
  return measure_snapshot_link(CFG, CFG.num_layers // sc.stages, sc.batch, MAX_LEN, sc.stages,
                               repeats)


def sim_recovery(strategy: str, replacement_s: float,
                 snap_link: cm.Link | None = None) -> sim.RecoveryConfig:
  """The simulator's recovery configuration for the paced engine's (see the module doc)."""
  return sim.RecoveryConfig(strategy=strategy, heartbeat_s=HEARTBEAT_S,
                            timeout_s=HEARTBEAT_TIMEOUT_S, replacement_start_s=replacement_s,
                            weight_load_s=0.0, replica_link=REPLICA_LINK,
                            snapshot_every=SNAPSHOT_EVERY,
                            snapshot_link=snap_link or cm.Link("orbax_local_disk", 1e12, 0.05))


def run_failure_scenario(eng: PipelineEngine, sc: FailScenario, cost: TableCostModel,
                         snap_link: cm.Link | None = None) -> dict:
  """Serves and simulates one strategy under one failure plan (module doc)."""
  base = sc.workload()
  rate = base.load * capacity_rps(cost, sc.stages, sc.batch)
  reqs = make_requests(base, rate)
  plan = FAILURE_PLANS[sc.failures]
  overruns0 = sum(st.overruns for st in eng.worker_stats())
  served = eng.serve(reqs, failures=[FailureSpec(stage=s, after_steps=n) for s, n in plan])
  overruns = sum(st.overruns for st in eng.worker_stats()) - overruns0
  events = served.recoveries
  # The engine's recovery work on this machine, measured (module doc).
  replacement_s = float(np.mean([e.recovered_at - e.detected_at for e in events])) \
      if events else 0.0
  simulated = sim.simulate_colocated(
      cost, sim.from_serving(reqs), sc.stages, batch_size=sc.batch, microbatching="paper",
      failures=[sim.Failure(stage=s, after_steps=n) for s, n in plan],
      recovery=sim_recovery(sc.strategy, replacement_s, snap_link))
  eng_s = metrics.summarize(served.records)
  sim_s = metrics.summarize(simulated.records)
  handled_eng: dict = {}
  for e in events:
    for k, v in e.handled_by.items():
      handled_eng[k] = handled_eng.get(k, 0) + v
  handled_sim: dict = {}
  for r in simulated.recoveries:
    for k, v in r["handled_by"].items():
      handled_sim[k] = handled_sim.get(k, 0) + v
  out = {
      "strategy": sc.strategy, "failures": sc.failures, "stages": sc.stages, "batch": sc.batch,
      "num_requests": len(reqs), "rate": rate,
      "engine_failures": len(events), "sim_failures": len(simulated.recoveries),
      "engine_unfinished": eng_s["num_unfinished"], "sim_unfinished": sim_s["num_unfinished"],
      "engine_makespan_s": eng_s["duration"], "sim_makespan_s": sim_s["duration"],
      "engine_mean_latency_s": eng_s["mean_e2el_ms"] / 1e3,
      "sim_mean_latency_s": sim_s["mean_e2el_ms"] / 1e3,
      "engine_recomputed_tokens": sum(e.recomputed_tokens for e in events),
      "sim_recomputed_tokens": sum(r["lost_tokens"] for r in simulated.recoveries),
      "engine_lost_s": sum(e.recovery_s for e in events),
      "sim_lost_s": sum(r["resumed_at"] - r["time"] for r in simulated.recoveries
                        if "resumed_at" in r),
      "engine_handled_by": handled_eng, "sim_handled_by": handled_sim,
      "replacement_s": replacement_s, "pace_overruns": overruns,
      "snapshot_s": snap_link.latency if snap_link is not None else None,
      "engine_wall_s": served.wall_s,
  }
  out["rel_error_makespan"] = _rel(out["sim_makespan_s"], out["engine_makespan_s"])
  out["rel_error_mean_latency"] = _rel(out["sim_mean_latency_s"], out["engine_mean_latency_s"])
  out["rel_error_lost_s"] = _rel(out["sim_lost_s"], out["engine_lost_s"])
  return out


def format_failure_row(row: dict) -> str:
  return (f"{row['strategy']:<10} {row['failures']} failure(s) [modelled]: makespan engine "
          f"{row['engine_makespan_s']:.3f} s sim {row['sim_makespan_s']:.3f} s "
          f"({row['rel_error_makespan']:.1%}); mean latency {row['engine_mean_latency_s']:.3f} / "
          f"{row['sim_mean_latency_s']:.3f} s ({row['rel_error_mean_latency']:.1%}); "
          f"recomputed tokens {row['engine_recomputed_tokens']} / "
          f"{row['sim_recomputed_tokens']}; lost {row['engine_lost_s']:.3f} / "
          f"{row['sim_lost_s']:.3f} s; handled by {row['engine_handled_by']} / "
          f"{row['sim_handled_by']}; overruns {row['pace_overruns']}")


def failure_grid(strategies=FAIL_STRATEGIES, counts=(1, 3)) -> list[FailScenario]:
  return [FailScenario(s, n) for s in strategies for n in counts]


def run_failure_grid(scenarios: list[FailScenario], params=None, log=print) -> dict:
  """Runs every failure scenario on one engine (strategies switched with `set_recovery`)."""
  params = init_params(CFG, jax.random.key(0)) if params is None else params
  rows, warm, snaps = [], set(), {}
  eng, key = None, None
  try:
    for sc in scenarios:
      cost = cost_model(sc.stages, sc.stretch)
      k = (sc.stages, sc.batch, sc.stretch)
      if k != key:
        if eng is not None:
          eng.close()
        eng, key, warm = make_failure_engine(params, sc, cost), k, set()
      eng.set_recovery(sc.strategy)   # fresh workers, nothing armed, compiled steps kept
      # Requeues need nothing compiled that the engine's start-up did not compile already.
      loads = {"replica", "snapshot"} & set(sc.strategy.split(","))
      if loads and sc.strategy not in warm:
        warm_up_recovery(eng, sc)
        warm.add(sc.strategy)
      snap = None
      if "snapshot" in sc.strategy.split(","):
        snap = snaps[k] = snaps.get(k) or snapshot_link(sc)
      row = run_failure_scenario(eng, sc, cost, snap)
      rows.append(row)
      log(format_failure_row(row))
  finally:
    if eng is not None:
      eng.close()
  return {
      "label": "modelled",
      "max_rel_error_makespan": max(r["rel_error_makespan"] for r in rows),
      "max_rel_error_mean_latency": max(r["rel_error_mean_latency"] for r in rows),
      "target": TARGET,
      "failure_scenarios": rows,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--quick", action="store_true", help="D in {1, 2}, B = 4, ~2 s spans")
  parser.add_argument("--mode", choices=("paper", "mixed"), default="paper",
                      help="the engine's serving mode (the simulator follows it)")
  parser.add_argument("--swapping", action="store_true",
                      help="the swapping scenarios (microbatch swapping over a modeled link)")
  parser.add_argument("--failures", action="store_true",
                      help="the failure scenarios (every strategy, one and three crashes)")
  args = parser.parse_args()
  t0 = time.perf_counter()
  if args.failures:
    out = run_failure_grid(failure_grid())
    out["wall_s"] = time.perf_counter() - t0
    print(f"[modelled] max rel error under failures: makespan "
          f"{out['max_rel_error_makespan']:.2%}, mean latency "
          f"{out['max_rel_error_mean_latency']:.2%} (target {TARGET:.0%})")
    print(json.dumps(out))
    return
  out = run_grid(grid(args.quick, args.mode, args.swapping))
  out["wall_s"] = time.perf_counter() - t0
  # Which figures are measured on this machine and which are modelled (a cost model, the
  # simulator, or a paced run, which sleeps to the cost model's step times and so agrees
  # with the simulator by construction).
  out["kind"] = {"max_rel_error_throughput": "modelled", "max_rel_error_p50_latency": "modelled",
                 "scenarios": "modelled", "wall_s": "measured"}
  print(f"max rel error: throughput {out['max_rel_error_throughput']:.2%}, p50 normalized "
        f"latency {out['max_rel_error_p50_latency']:.2%} (target {TARGET:.0%})")
  print(json.dumps(out))


if __name__ == "__main__":
  from dejavu_jax.studies import jaxcache  # pylint: disable=g-import-not-at-top
  jaxcache.enable_compilation_cache()   # DEJAVU_JAX_CACHE_DIR=off times cold compiles
  main()
