"""The paper's failure scenarios: simulated at paper scale, and replayed by the paced engine.

Owns the failure figures' experiment (experiments/fig_failures.py is its thin main): a
`Scenario` (model, machines, microbatch, prompt and output lengths, deterministic or Poisson
arrivals, failures placed by a stage's step count or by time, the recovery constants), its
simulation per recovery strategy (`simulate`), and its replay by the real `PipelineEngine` in
paced mode with the simulator run on the replay's exact workload beside it (`replay`). Every
number here is `modelled`: the simulator replays the cost model, and so do the paced steps.

How a replay of a paper-scale run (10^5 to 10^6 stage steps) fits in seconds on 2 cores:
1. Chunks: a paced decode step stands for `chunk` (c) decode steps of the paper's model and
   lasts as long (`ChunkedCost`: c token times at the chunk's modelled context, c LM heads); the
   prompt step yields the first chunk (the prompt, then c - 1 decode steps). A request of N new
   tokens runs N / c paced steps; lost and redone work is quantized to chunks.
2. The fake stage program (pipeline/fake.py) with the paced model's layer count and tiny widths,
   on prompts of `real_prompt_len` tokens charged as the scenario's prompt length (contexts too:
   the modelled context of a step is prompt + c x generated).
3. Time runs `time_scale` (s) times faster than modelled: a step lasts s x its modelled time;
   arrivals and failure times are multiplied by s; the results are divided by s again.
4. Recovery is paced as well: the engine's own detection (heartbeats of a few ms: the local
   runtime vouches for live threads, so a short timeout declares no false deaths) and
   replacement (a new thread) take milliseconds; `PacedSpares` holds each replacement back until
   the modelled detection (the heartbeat phase of the crash, then the timeout), the spare's
   start-up and its weight load have passed since the crash, x s: the simulator's timeline.
   Not paced: the restore of the caches (the modelled one is a replica over 40 Gbps or a
   snapshot read, under 0.2 s against the ~24 s downtime of the OPT-66B scenario).
What stays real in a replay and is given to its simulator as measured: replicas are host copies
inside the process (a few ms); snapshots are orbax writes to local disk whose duration, measured
here (`measure_snapshot_link`), decides how stale the last complete snapshot is when a stage dies.
A failure placed by step count at paper scale is replayed at the time it fired in that
strategy's paper-scale run. The engine's `restart` restarts the lost requests on a replaced
stage; the paper-scale figure restarts the whole job (every stage reloads its weights, in
parallel): with balanced stages both cost the same time.

Why one module over 400 lines: the scenario, its paper-scale simulation and its paced replay
(chunked cost, paced spares, the measured snapshot write, the replay's simulator) must agree
on every constant, so they live together.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import threading
import time
from typing import Callable, Sequence

import numpy as np

from dejavu_jax import costmodel as cm
from dejavu_jax import metrics
from dejavu_jax import sim
from dejavu_jax.config import ServeConfig, get_model_config, tiny_config
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.pipeline.fake import fake_generate
from dejavu_jax.sim.pipeline import split_layers
from dejavu_jax.serving.engine import PipelineEngine
from dejavu_jax.workload import Request, poisson_arrivals

FAILURE_FREE = "failure-free"


@dataclasses.dataclass(frozen=True)
class Scenario:
  """One failure scenario at paper scale.

  Attributes:
    name: its label ("one", "series", "single").
    model, hardware, gpus_per_machine: the roofline cost model (fp16 weights).
    num_stages, microbatch_size: the pipeline (D microbatches in flight).
    prompt_len, output_len: every request's lengths.
    arrivals: each request's arrival time (s).
    failures: `sim.Failure`s (by time or by a stage worker's step count).
    recovery: the recovery constants (`strategy` is set per run).
  """

  name: str
  model: str
  hardware: str
  gpus_per_machine: int
  num_stages: int
  microbatch_size: int
  prompt_len: int
  output_len: int
  arrivals: tuple
  failures: tuple
  recovery: sim.RecoveryConfig

  def cost(self) -> cm.CostModel:
    return cm.roofline(get_model_config(self.model, dtype="float16"), self.hardware,
                       gpus_per_machine=self.gpus_per_machine)

  def requests(self) -> list[sim.RequestRecord]:
    return [sim.RequestRecord(i, float(a), self.prompt_len, self.output_len)
            for i, a in enumerate(self.arrivals)]


def capacity_interval(cost: cm.CostModel, num_stages: int, batch: int, prompt_len: int,
                      output_len: int) -> float:
  """Seconds between microbatch completions of the saturated failure-free pipeline: the paper's
  I_c = Y + N t + (D - 1)(Y - t) / D (DEJAVU.md), with t the slowest stage's token step at the
  mean context (the last stage, which adds the LM head)."""
  layers = max(split_layers(cost.model.num_layers, num_stages))
  n = output_len - 1                                      # token steps after the prompt step
  head = cost.head_time(batch)
  y = cost.prompt_time(layers, prompt_len, batch) + head
  t = cost.token_time(layers, batch, prompt_len + output_len // 2) + head
  return y + n * t + (num_stages - 1) * (y - t) / num_stages


def arrivals(kind: str, num_requests: int, rate: float, seed: int = 0) -> tuple:
  """"zero": all at t = 0 (a job); "fixed": one request every 1 / rate seconds from t = 0;
  "poisson": an open-loop Poisson client."""
  if num_requests < 1:
    raise ValueError(f"num_requests must be >= 1, got {num_requests}")
  if kind == "zero":
    return (0.0,) * num_requests
  if not rate > 0:
    raise ValueError(f"arrival rate must be > 0 requests/s, got {rate}")
  if kind == "fixed":
    return tuple(i / rate for i in range(num_requests))
  if kind == "poisson":
    return tuple(float(a) for a in poisson_arrivals(rate, num_requests, seed))
  raise ValueError(f"arrivals must be 'fixed', 'poisson' or 'zero', got {kind!r}")


# ---- paper scale ----
def simulate(sc: Scenario, strategy: str | None, cost: cm.CostModel | None = None,
             requests: Sequence[sim.RequestRecord] | None = None,
             failures: Sequence[sim.Failure] | None = None,
             recovery: sim.RecoveryConfig | None = None) -> sim.SimResult:
  """The scenario (or the given cost, requests, failures, recovery) under `strategy` (None:
  failure-free), paper-mode microbatches."""
  cost = cost or sc.cost()
  reqs = list(requests) if requests is not None else sc.requests()
  if strategy is None:
    return sim.simulate_colocated(cost, reqs, sc.num_stages, sc.microbatch_size,
                                  microbatching="paper")
  rec = dataclasses.replace(recovery or sc.recovery, strategy=strategy)
  return sim.simulate_colocated(cost, reqs, sc.num_stages, sc.microbatch_size,
                                failures=list(sc.failures if failures is None else failures),
                                recovery=rec, microbatching="paper")


def run_row(scenario: str, system: str, records, recoveries: list[dict], source: str,
            base: dict | None) -> dict:
  """One row of the figure: the paper's metrics (total runtime, cumulative and end-to-end
  latency) of one run, and its slowdowns against the failure-free run `base`."""
  s = metrics.summarize(records)
  done = [r for r in records if r.done]
  row = {"scenario": scenario, "system": system, "source": source, "kind": "modelled",
         "completed": len(done), "total_runtime_s": s["duration"],
         "cumulative_latency_s": float(sum(r.finish - r.arrival for r in done)),
         "mean_e2el_s": s["mean_e2el_ms"] / 1e3,
         "norm_latency_p50_s_per_tok": s["norm_latency_p50_s_per_tok"],
         "failures": len(recoveries),
         "lost_tokens": sum(r.get("lost_tokens", 0) for r in recoveries),
         "downtime_s": sum(r.get("downtime_s", 0.0) for r in recoveries),
         "failure_times_s": [r["time"] for r in recoveries]}
  if base:
    row["runtime_vs_failure_free"] = row["total_runtime_s"] / base["total_runtime_s"]
    row["latency_vs_failure_free"] = row["mean_e2el_s"] / base["mean_e2el_s"]
  return row


# ---- paced replay ----
@dataclasses.dataclass(frozen=True)
class Replay:
  """How a scenario is replayed by the paced engine (module doc).

  Attributes:
    chunk: paper-scale decode steps per paced step (c).
    time_scale: wall seconds per modelled second (s).
    real_prompt_len: prompt tokens the fake program really computes.
    heartbeat_s, heartbeat_timeout_s: the engine's own detection, in wall seconds; must end
      before the modelled detection (x s) does, which `PacedSpares` then waits out.
    replica_latency_s: the engine's replica host copy, wall seconds (the simulator's replica
      link, / s).
  """

  chunk: int = 20
  time_scale: float = 1 / 30
  real_prompt_len: int = 16
  heartbeat_s: float = 0.01
  heartbeat_timeout_s: float = 0.04
  replica_latency_s: float = 0.002

  def __post_init__(self):
    if self.chunk < 1:
      raise ValueError(f"replay chunk must be >= 1, got {self.chunk}")
    if not self.time_scale > 0:
      raise ValueError(f"replay time_scale must be > 0, got {self.time_scale}")
    if self.real_prompt_len < 1:
      raise ValueError(f"replay real_prompt_len must be >= 1, got {self.real_prompt_len}")

  def paced_tokens(self, output_len: int) -> int:
    return max(1, math.ceil(output_len / self.chunk))


class ChunkedCost:
  """A cost model whose decode step is `chunk` decode steps of `base` (module doc, 1-2): a
  prompt of `real` tokens is charged as `modeled` ones, a context as the prompt plus chunk x the
  generated tokens."""

  def __init__(self, base: cm.CostModel, real: int, modeled: int, chunk: int):
    self.base, self.model, self.hardware = base, base.model, base.hardware
    self.real, self.modeled, self.chunk = real, modeled, chunk

  def _context(self, tokens: int) -> int:
    # Shorter than the real prompt: only warm-ups (engine.warmup) send those.
    return max(1, self.modeled + (tokens - self.real) * self.chunk)

  def prompt_time(self, layers, tokens, batch):
    ctx = self._context(tokens)
    t = self.base.prompt_time(layers, ctx, batch)
    if self.chunk > 1:   # the rest of the first chunk
      t += (self.chunk - 1) * self.base.token_time(layers, batch, ctx + self.chunk // 2)
    return t

  def token_time(self, layers, batch, context):
    return self.chunk * self.base.token_time(layers, batch,
                                             self._context(context) + self.chunk // 2)

  def head_time(self, batch):
    return self.chunk * self.base.head_time(batch)


def fake_config(model_name: str, max_len: int):
  """The fake program's model: the paced model's layer count (stages map onto the simulator's
  layer split), one KV head of 4 dims (a step reads every entry; a small cache keeps its real
  time far below the modelled one)."""
  layers = get_model_config(model_name, dtype="float16").num_layers
  return tiny_config("opt", num_layers=layers, hidden_size=4, num_heads=1, ffn_dim=8,
                     max_positions=max_len)


class PacedSpares:
  """Paces the engine's worker replacement (module doc, 4): wraps the runtime's `replace` so a
  replacement starts no earlier than crash + modelled (detection + start-up + weight load) x s.
  The engine has no modelled recovery time of its own; the wrap is installed on each runtime the
  engine starts (`install`) and lives only in this study."""

  def __init__(self, recovery: sim.RecoveryConfig, weight_s: float, time_scale: float):
    self.recovery, self.weight_s, self.s = recovery, weight_s, time_scale
    self.t0 = time.perf_counter()
    self._deadline = -math.inf
    self.waited_s: list[float] = []

  def deadline(self, died_wall: float) -> float:
    """The wall time the modelled recovery of a crash at `died_wall` lets a spare start."""
    r, s = self.recovery, self.s
    t = (died_wall - self.t0) / s                                   # modelled crash time
    detected = math.floor(t / r.heartbeat_s) * r.heartbeat_s + r.timeout_s
    return self.t0 + s * (detected + r.replacement_start_s + self.weight_s)

  def install(self, runtime) -> None:
    inner = runtime.replace

    def replace(stage: int):
      died = runtime.died_at(stage)
      now = time.perf_counter()
      if now >= self._deadline:   # a new recovery (several dead stages start in parallel)
        self._deadline = self.deadline(died if died is not None else now)
      wait = self._deadline - now
      if wait > 0:
        time.sleep(wait)
      self.waited_s.append(max(wait, 0.0))
      return inner(stage)

    runtime.replace = replace


def measure_snapshot_link(cfg, layers: int, batch: int, max_len: int, in_flight: int,
                          repeats: int = 3) -> cm.Link:
  """The engine's snapshot as a link: the median wall time a worker's `Snapshotter` takes to
  complete one snapshot of `in_flight` caches of this shape, on this machine now."""
  from dejavu_jax.kv.cache import init_cache_for  # pylint: disable=g-import-not-at-top
  from dejavu_jax.runtime.snapshot import Snapshotter  # pylint: disable=g-import-not-at-top
  caches = {mb: (init_cache_for(cfg, layers, batch, max_len), 1) for mb in range(in_flight)}
  times = []
  with tempfile.TemporaryDirectory(prefix="failstudy-snap-") as d:
    done = threading.Event()
    snap = Snapshotter(d, 0, 0, 1, lambda *a: done.set())
    for _ in range(repeats + 1):   # the first one warms orbax up
      done.clear()
      t0 = time.perf_counter()
      snap.after_step(caches)
      done.wait(30)
      times.append(time.perf_counter() - t0)
    snap.close()
  return cm.Link("orbax_local_disk_measured", 1e12, float(np.median(times[1:])))


class Replayer:
  """One paced engine for a scenario's shape, replaying it under each strategy (module doc)."""

  def __init__(self, sc: Scenario, rp: Replay, log: Callable[[str], None] = print):
    self.sc, self.rp, self.log = sc, rp, log
    self.n_paced = rp.paced_tokens(sc.output_len)
    n = rp.real_prompt_len + self.n_paced + 1
    self.max_len = 1 << (n - 1).bit_length()
    self.cfg = fake_config(sc.model, self.max_len)
    self.base = sc.cost()
    self.cost = ChunkedCost(self.base, rp.real_prompt_len, sc.prompt_len, rp.chunk)
    self.weight_s = max(sc.recovery.weight_time(self.base.model, layers)
                        for layers in split_layers(self.base.model.num_layers, sc.num_stages))
    shortest = rp.time_scale * (sc.recovery.timeout_s - sc.recovery.heartbeat_s +
                                sc.recovery.replacement_start_s + self.weight_s)
    if rp.heartbeat_timeout_s >= shortest:
      log(f"[{sc.name}] warning: the engine's own detection ({rp.heartbeat_timeout_s} s of wall "
          f"time) outlasts the shortest modelled recovery ({shortest:.3f} s of wall time): "
          "the paced recoveries will be longer than the simulator's")
    serve = ServeConfig(num_stages=sc.num_stages, microbatch_size=sc.microbatch_size,
                        max_len=self.max_len, mode="paper", pacing="paced", program="fake",
                        recovery="restart", heartbeat_s=rp.heartbeat_s,
                        heartbeat_timeout_s=rp.heartbeat_timeout_s,
                        snapshot_every=max(1, round(sc.recovery.snapshot_every / rp.chunk)))
    self.eng = PipelineEngine(self.cfg, None, serve, cost_model=self.cost,
                              time_scale=rp.time_scale)
    # Compile what the runs reach: the prompt's prefill, every decode context, and the
    # prefill of a continuation (reprefill) at every longer bucket.
    rpl = rp.real_prompt_len
    self.eng.generate([[5] * rpl], self.n_paced + 1)
    n = rpl + 1
    while n + 1 < self.max_len:
      self.eng.generate([[5] * n], 2)
      n = 2 * n - 1   # the first length of the next power-of-two bucket
    self._warm: set[str] = set()
    self._snap_link: cm.Link | None = None
    rng = np.random.default_rng(0)
    self.prompts = [tuple(int(t) for t in rng.integers(3, self.cfg.vocab_size,
                                                       rp.real_prompt_len))
                    for _ in sc.arrivals]

  def close(self) -> None:
    self.eng.close()

  def requests(self) -> list[Request]:
    """The scenario's requests in wall time, each of `n_paced` chunks."""
    s = self.rp.time_scale
    return [Request(i, float(a) * s, self.prompts[i], self.n_paced)
            for i, a in enumerate(self.sc.arrivals)]

  def sim_recovery(self, strategy: str) -> sim.RecoveryConfig:
    """The simulator's recovery for the replay: the scenario's constants, the engine's replica
    copy and measured snapshot write as links (modelled seconds: wall / s)."""
    s = self.rp.time_scale
    snap = self._snap_link or cm.Link("orbax_local_disk", 1e12, 0.05)
    return dataclasses.replace(
        self.sc.recovery, strategy=strategy, restart_scope="requests",
        snapshot_every=self.eng.serve_cfg.fault.snapshot_every,
        replica_link=cm.Link("in_process_host_copy", 1e12, self.rp.replica_latency_s / s),
        snapshot_link=cm.Link(snap.name, 1e12, snap.latency / s))

  def _snapshot_period(self) -> None:
    """Measures the engine's snapshot write here and sets the replay's snapshot period: the
    scenario's (in paced steps), or longer where writes would take the cores the paced steps
    need (a worker skips snapshots while one is written, so they would run back to back). The
    replay's simulator gets the same period and write time."""
    layers = max(split_layers(self.cfg.num_layers, self.sc.num_stages))
    in_flight = min(self.sc.num_stages, math.ceil(len(self.sc.arrivals) /
                                                  self.sc.microbatch_size))
    self._snap_link = measure_snapshot_link(self.cfg, layers, self.sc.microbatch_size,
                                            self.max_len, in_flight)
    base_layers = max(split_layers(self.base.model.num_layers, self.sc.num_stages))
    step_wall = self.rp.time_scale * self.cost.token_time(
        base_layers, self.sc.microbatch_size, self.rp.real_prompt_len + self.n_paced // 2)
    write = self._snap_link.latency / step_wall          # paced steps one write lasts
    # Writes of several microbatches' caches take the cores the paced steps need: at most a
    # quarter of the period (one cache: half).
    every = max(1, round(self.sc.recovery.snapshot_every / self.rp.chunk),
                math.ceil((4 if in_flight > 1 else 2) * write))
    # A failure placed by step count right after a snapshot point races that snapshot's write
    # (its real duration varies by tens of percent here; the simulator knows its median): the
    # period is lengthened until the failure lands at least 1.5 writes after a point.
    steps = [max(1, round(f.after_steps / self.rp.chunk)) for f in self.sc.failures
             if f.after_steps is not None]
    while len(steps) == 1 and every < steps[0] and steps[0] % every < 1.5 * write:
      every += 1
    self.eng.serve_cfg = self.eng.serve_cfg.replace(snapshot_every=every)
    self.log(f"[{self.sc.name}] snapshot write measured {self._snap_link.latency * 1e3:.0f} ms "
             f"(wall): the replay snapshots every {every} paced steps "
             f"({every * self.rp.chunk} decode steps at paper scale, there every "
             f"{self.sc.recovery.snapshot_every})")

  def _warm_up_recovery(self, strategy: str) -> None:
    """A small serve with a crash of the stage that fails first once every microbatch has
    decoded, so what a restore compiles is compiled before the measured runs."""
    d, b = self.sc.num_stages, self.sc.microbatch_size
    reqs = [Request(i, 0.0, self.prompts[0], 3) for i in range(d * b)]
    stage = self.sc.failures[0].stage if self.sc.failures else min(1, d - 1)
    self.eng.serve(reqs, failures=[FailureSpec(stage=stage, after_steps=d + 1)])
    self._warm.add(strategy)

  def run(self, strategy: str | None, fail_times: Sequence[tuple[int, float]] = (),
          fail_steps: Sequence[tuple[int, int]] = ()) -> dict:
    """The paced engine (and its simulator) under `strategy` (None: failure-free), failures at
    modelled times [(stage, s)] or after a worker's paced steps [(stage, n)]."""
    s = self.rp.time_scale
    if strategy == "snapshot" and self._snap_link is None:
      self._snapshot_period()
    self.eng.set_recovery(strategy or "restart")
    if strategy in ("replica", "snapshot") and strategy not in self._warm:
      self._warm_up_recovery(strategy)
      self.eng.set_recovery(strategy)
    specs = [FailureSpec(stage=st, time_s=t * s) for st, t in fail_times]
    specs += [FailureSpec(stage=st, after_steps=n) for st, n in fail_steps]
    spares = PacedSpares(self.sc.recovery, self.weight_s, s)
    spares.install(self.eng.runtime)
    reqs = self.requests()
    spares.t0 = time.perf_counter()
    served = self.eng.serve(reqs, failures=specs if strategy else [])
    eng_recs = [sim.RequestRecord(r.request_id, r.arrival / s, r.prompt_len, r.output_len,
                                  r.first_token / s if r.done else math.nan,
                                  r.finish / s if r.done else math.nan) for r in served.records]
    oracle = {r.request_id: fake_generate(self.cfg, [r.prompt], r.max_new_tokens)[0]
              for r in reqs}
    identical = all(list(r.tokens) == oracle[r.request_id] for r in served.records)
    eng_rec = [{"time": e.failed_at / s, "downtime_s": (e.recovered_at - e.failed_at) / s,
                "lost_tokens": e.recomputed_tokens * self.rp.chunk,
                "handled_by": dict(e.handled_by)} for e in served.recoveries]
    # The engine's own recovery work beyond the paced spare's wait (cache loads, a restore's
    # first compile at a new length, on loaded cores), modelled seconds: given to the
    # simulator as start-up time, as the design asks for measured constants.
    for r, e in zip(eng_rec, served.recoveries):
      modelled = (spares.deadline(spares.t0 + e.failed_at) - spares.t0) / s - r["time"]
      r["engine_overhead_s"] = max(0.0, r["downtime_s"] - modelled)
    overhead = float(np.mean([r["engine_overhead_s"] for r in eng_rec])) if eng_rec else 0.0
    sim_reqs = [sim.RequestRecord(r.request_id, r.arrival / s, self.rp.real_prompt_len,
                                  self.n_paced) for r in reqs]
    fails = [sim.Failure(time=t, stage=st) for st, t in fail_times]
    fails += [sim.Failure(stage=st, after_steps=n) for st, n in fail_steps]
    rec = None
    if strategy:
      rec = self.sim_recovery(strategy)
      rec = dataclasses.replace(rec, replacement_start_s=rec.replacement_start_s + overhead)
    simulated = simulate(self.sc, strategy, cost=self.cost, requests=sim_reqs, failures=fails,
                         recovery=rec)
    sim_rec = [dict(r, lost_tokens=r["lost_tokens"] * self.rp.chunk)
               for r in simulated.recoveries]
    return {"engine_records": eng_recs, "engine_recoveries": eng_rec,
            "sim_records": simulated.records, "sim_recoveries": sim_rec,
            "identical": identical, "overruns": served.summary.get("paced_overruns", 0),
            "rejected": len(served.rejected), "wall_s": served.wall_s,
            "engine_overhead_s": overhead,
            "spare_wait_s": spares.waited_s}


def rel(a: float, b: float) -> float:
  """|a - b| / |b| (b: the paced engine's number, which the simulator should predict)."""
  return abs(a - b) / abs(b) if b else (0.0 if a == b else math.inf)
