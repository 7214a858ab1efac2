"""PipelineEngine: the one serving engine (pipeline parallelism with microbatch injection, the
paper's baseline; with `prompt_stages`/`token_stages`, DéjàVu's prompt-token disaggregation),
orchestration only.

It wires the pieces together: a `StagePlan` on a ('stage', 'tensor') mesh, one stage program per
stage (`StageProgram`, or the hand-checkable `FakeProgram`), a runtime whose workers run them
(`runtime.make` picks it from the config; runtime/local.py walks through the threads and
queues), the FIFO `Scheduler` (the single source of the tokens generated), sampling, and the
recovery strategy chain. The engine talks to workers only through the runtime's `Worker`
messages and hears from them only on its event channel. The serving shape is a parameter, not a
fork of the loop: a `PromptPath` (serving/prompt_path.py) says where prefills run, colocated on
the token pipeline's stage 0, or on a prompt pipeline of its own that streams each prompt's KV
into host slots of the token workers. Everything below about the token pipeline holds for both.

`serve` runs an open-loop workload: requests are admitted when their arrival time comes, whether
or not the pipeline is busy. Its per-serve state lives in one `ServeState`, created per serve.
The loop itself (`run_loop`) takes its requests from a source: `serve` replays a list
(`ReplaySource`); `start()` runs the same loop on a thread fed by `submit()` until `stop()`
(online mode, serving/online.py).

Bad requests (a NaN, infinite or negative arrival, a prompt that is not a sequence of integer
token ids inside the vocabulary, max_new_tokens not an integer >= 1, prompt + new tokens longer
than the context, a request id already used) are rejected one by one in `ServeResult.rejected`,
with a message naming the request and the field; every other request still finishes. All checks
live in `validate` (and `models.generate.validate_prompts`); a request is checked before serving
starts, so one that can never arrive cannot stall the loop.

Admission control: with `ServeConfig.max_pending`, a request that arrives while that many admitted
requests wait for a microbatch slot is rejected ("queue full"); the summary reports `rejected`,
`rejected_queue_full` and `max_queue_depth`.

Nothing served is lost: when serving fails (a `StepError` from a stage, a hang past
`step_timeout_s`, any exception in the loop), `serve` raises an `EngineError` whose `.result` is
the `ServeResult` so far (every admitted request's record, the finished ones complete) with
`error` naming the failure, or returns that result when `raise_on_error` is False.

Failures: `serve(..., failures=[FailureSpec(...)])` injects them through an `Injector`
(fault/inject.py). The `Controller` declares a crashed worker dead after `heartbeat_timeout_s`
of heartbeat silence (unless the runtime vouches that it lives), the `ProgressWatchdog` a stage
that has work waiting and finishes no step for `progress_timeout_s` (it is then killed). The
engine then raises the epoch (queued steps of the lost work are dropped), replaces the dead
workers (weights from host memory, or from an orbax checkpoint when `params_checkpoint` is given),
asks the strategy chain for a plan (fault/strategies.py) and executes it: caches are loaded into
the replacements from the plan's sources, microbatches rewound or requeued in the scheduler, the
plan's `resync` stages re-send their replicas; microbatches whose load failed are planned again
without the strategy that failed. The prompt path then recovers what it holds (a disaggregated
path redoes the prompts waiting in the dead token workers' host slots; a dead prompt worker is
its own recovery, by the same `RedoPrompts` strategy).

Microbatch swapping and the device KV budget: with `ServeConfig.device_kv_budget_bytes` (or a
fraction of device memory) the microbatch size is the largest whose cache buffers fit on every
worker: D of them, or 2 with swapping (kv/budget.py); `swapping="auto"` asks the cost model
whether the swap-in hides under the step. `self.microbatch_size` and `self.swap_choice` hold
the outcome, and every serve's summary says which was chosen and why (`swapping`,
`swapping_reason`, `microbatch_size`). Swapping itself is the workers' cache placement policy;
the engine only marks a decode step `final` so workers do not prefetch a microbatch that is
about to leave.

Beside it: admission.py (request checks), sizing.py (model limits, KV budget), recovery.py (the
plan's execution), result.py (what a serve returns), online.py (the request sources, online
mode). What stays here (a little over 500 lines: the loop is one piece, split into its begin,
run and finish for the two sources) is the loop with the event handlers and step submissions it
calls, which share `ServeState`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from dejavu_jax import costmodel as cm
from dejavu_jax import metrics as metrics_lib
from dejavu_jax import runtime as runtime_lib
from dejavu_jax.config import ModelConfig, ServeConfig
from dejavu_jax.fault.controller import Controller, ProgressWatchdog
from dejavu_jax.fault.inject import FailureSpec, Injector
from dejavu_jax.fault.strategies import get_strategy
from dejavu_jax.kv.buckets import bucket_length
from dejavu_jax.models.checkpoint import check_params_checkpoint, restore_params
from dejavu_jax.models.decoder import param_shapes
from dejavu_jax.models.generate import pad_prompts, sample
from dejavu_jax.pipeline.fake import FakeProgram
from dejavu_jax.pipeline.plan import make_mesh
from dejavu_jax.pipeline.scheduler import Microbatch, Scheduler
from dejavu_jax.pipeline.stage import StageProgram
from dejavu_jax.runtime import api
from dejavu_jax.serving import admission
from dejavu_jax.serving import cache_oracle
from dejavu_jax.serving import recovery as recovery_lib
from dejavu_jax.serving.online import OnlineLoop, ReplaySource, RequestHandle
from dejavu_jax.serving.pacing import make_pace_fn
from dejavu_jax.serving.sizing import check_limits, choose_swapping, host_link
from dejavu_jax.serving.prompt_path import make_prompt_path
from dejavu_jax.stream import hostmem
from dejavu_jax.serving.result import (EngineError, EngineTimeout, ServeResult,  # noqa: F401
                                       finish_serve, record)
from dejavu_jax.workload import Request


@dataclasses.dataclass
class ServeState:
  """One serve's state (created by `serve`, dropped with it)."""
  sched: Scheduler
  t0: float                        # perf_counter when serving started
  injector: Injector
  watchdog: ProgressWatchdog
  rejected: dict                   # request_id -> reason
  recoveries: list = dataclasses.field(default_factory=list)   # RecoveryEvent per failure
  slot_free_at: dict = dataclasses.field(default_factory=dict)  # slot -> perf_counter freed
  last_progress: float = 0.0       # perf_counter of the last step that finished anywhere
  queue_full: int = 0
  max_depth: int = 0
  path: object = None              # the prompt path's own per-serve state
  stats0: dict = dataclasses.field(default_factory=dict)      # worker stats when it began
  counters0: dict = dataclasses.field(default_factory=dict)   # runtime counters when it began
  listener: Callable | None = None  # online mode: told of each microbatch's new tokens
  cache_probes: list = dataclasses.field(default_factory=list)   # cache_oracle.ProbeRecord

  def now(self) -> float:
    return time.perf_counter() - self.t0


class PipelineEngine:
  """A D-stage pipeline serving requests; use as a context manager (or call close())."""

  def __init__(self, cfg: ModelConfig, params, serve: ServeConfig, cost_model=None,
               devices: Sequence | None = None, time_scale: float = 1.0,
               params_checkpoint: str | None = None, swap_link=None):
    if serve.topology.data_parallel != 1:
      raise ValueError(f"data_parallel={serve.topology.data_parallel}: a PipelineEngine is one "
                       "replica; serve replicas with serving.dataparallel.DataParallelEngine "
                       "(make_engine picks it from the config)")
    self.cfg, self.serve_cfg, self.params = cfg, serve, params
    self.strategy = get_strategy(serve.fault.recovery, serve.fault.snapshot_dir, serve.fault.snapshot_every)
    self.params_checkpoint = params_checkpoint
    self.epoch = 0
    devices = jax.devices() if devices is None else list(devices)
    # Host logs, slots and swap staging allocate under this (pinned where the device maps it).
    self.host_memory = hostmem.policy(devices[0])
    in_process = runtime_lib.in_process(serve)
    self.prompt_path = make_prompt_path(serve)
    # The token pipeline's plan and devices; a disaggregated path also plans its prompt stages.
    self.plan, token_devices = self.prompt_path.layout(cfg, serve, devices, in_process)
    check_limits(cfg, serve)
    if params_checkpoint is not None:
      # Read now, not at the first recovery: a missing path or another model's checkpoint
      # would otherwise lose the run when a worker must be replaced.
      for start, stop in self.prompt_path.all_ranges(self.plan):
        check_params_checkpoint(params_checkpoint, param_shapes(cfg, start, stop))
    self.mesh = make_mesh(self.plan, token_devices) if in_process else None
    layer_scale = (cost_model.model.num_layers / cfg.num_layers) if cost_model is not None else 1
    # A measured link table (benchmarks/transport.py) replaces the preset links it has.
    self.links = cm.calibrated_links(serve.timing.links_table)
    self.links_record = (cm.link_table_record(serve.timing.links_table)
                         if serve.timing.links_table else None)
    swap_link = swap_link or self.links.get("swap_in") or host_link(cost_model)
    # The device KV budget decides the microbatch size, and "auto" whether swapping is on.
    self.swap_choice = choose_swapping(self, serve, cost_model, swap_link, layer_scale, devices)
    self.microbatch_size = self.swap_choice.batch
    self._pace = None
    if serve.timing.pacing == "paced":
      if cost_model is None:
        raise ValueError("pacing='paced' needs a cost model")
      self._pace = make_pace_fn(cost_model, self.plan.num_stages, time_scale, layer_scale,
                                swap_link)
    self.program_class = FakeProgram if serve.topology.program == "fake" else StageProgram
    self.programs = ([self.program_class(cfg, self.plan, self.mesh, s)
                      for s in range(self.plan.num_stages)] if in_process else [])
    self.prompt_path.build(self, devices, cost_model, time_scale)
    self._key = jax.random.key(serve.sampling.seed)
    self._next_mb_id = 0   # microbatch ids stay unique across serve() calls
    self._released: list[int] = []   # freed since the last prefill was sent (Step.frees)
    self._state: ServeState | None = None
    self.online = None     # the running online loop (serving/online.py), if any
    self._start()

  def _start(self) -> None:
    """Starts every worker set under the current strategy's options."""
    sc = self.serve_cfg
    self.controller = Controller(sc.fault.heartbeat_timeout_s)
    self._started = False
    self.runtime = runtime_lib.make(sc, runtime_lib.RuntimeSpec(
        cfg=self.cfg, ranges=self.plan.ranges, depth=self.plan.num_stages,
        microbatch_size=self.microbatch_size, max_len=sc.topology.max_len, heartbeat_s=sc.fault.heartbeat_s,
        programs=self.programs, params_for=self._params_for, params=self.params,
        pace=self._pace, checkpoint=self.params_checkpoint, swapping=self.swap_choice.swapping,
        kv_budget_bytes=self.kv_budget_bytes, role=self.prompt_path.token_role,
        host_slots=self.prompt_path.host_slots))
    self.prompt_path.make_runtime(self)
    self.runtime.start(dataclasses.replace(self.strategy.options(),
                                           cache_probe=sc.fault.cache_probe))
    self.prompt_path.start(self)
    self._started = True
    for s in range(self.plan.num_stages):
      self.controller.watch(s, self.runtime.worker(s).worker_id)

  def _params_for(self, s: int):
    return self.stage_params(self.plan.ranges[s])

  def stage_params(self, layer_range):
    """A (replacement) worker's weights: the orbax checkpoint when there is one, else host."""
    if self._started and self.params_checkpoint:
      start, stop = layer_range
      return restore_params(self.params_checkpoint, like=param_shapes(self.cfg, start, stop))
    return self.params

  def close(self) -> None:
    if self.online is not None:
      self.online.stop(drain=False, timeout=60)
    self.prompt_path.close()
    self.runtime.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def set_recovery(self, recovery: str) -> None:
    """Switches the recovery strategy (or chain) between `serve` calls without recompiling:
    the stage programs (their jitted, already compiled steps) are kept, the workers are restarted
    under the new strategy's options (replication tap, snapshots). Comparing strategies on one
    engine is what lets `experiments/serve.py` compile once for all of them."""
    sc = self.serve_cfg.replace(recovery=recovery)
    strategy = get_strategy(sc.fault.recovery, sc.fault.snapshot_dir, sc.fault.snapshot_every)  # bad name: fails
    self.close()                                                               # before this
    self.serve_cfg, self.strategy = sc, strategy
    self._start()

  # ---- requests ----
  def validate(self, request: Request) -> str | None:
    """The reason `request` cannot be served (naming it and the field), or None."""
    return admission.validate(self.cfg, self.serve_cfg.topology.max_len, request)

  def warmup(self, progress: Callable[[int, int], None] | None = None) -> None:
    """Compiles every stage's prefill for every prompt bucket that fits `max_len`, and its decode
    step for every context bucket, by serving one dummy request of two tokens per bucket (the
    decode right after a bucket's first length reads that bucket's context). Call it before a
    measured or failure-injected run: a compile in the middle of serving skews latencies."""
    limit = self.serve_cfg.topology.max_len - 1   # one new token must fit after the prompt
    n, lengths = 1, []
    while n <= limit:
      lengths.append(n)
      n = bucket_length(n, self.serve_cfg.topology.max_len) + 1   # the first length of the next bucket
    for i, n in enumerate(lengths):   # one microbatch per bucket, padded to its longest row
      self.generate([[self.cfg.pad_token_id] * n], 2 if n + 2 <= limit + 1 else 1)
      if progress:
        progress(i + 1, len(lengths))

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """All prompts arrive at once; returns the generated tokens per prompt (in order). Raises
    ValueError naming the first bad prompt or argument."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
      raise ValueError(f"prompts must be a sequence of prompts, got {type(prompts).__name__}")
    reqs = [Request(i, 0.0, p, max_new_tokens) for i, p in enumerate(prompts)]
    result = self.serve(reqs)
    if result.rejected:
      raise ValueError("; ".join(result.rejected.values()))
    toks = result.tokens()
    return [toks[i] for i in range(len(prompts))]

  def report(self, result=None) -> list[str]:
    """The runtimes' lines for an experiment log: killed processes (Ray, both sides of a
    disaggregated deployment) and, with a `ServeResult`, each recovery's timeline."""
    return [x for rt in self.prompt_path.runtimes() for x in rt.report()] + \
        self.runtime.report(result)

  def worker_stats(self) -> list[api.WorkerStats]:
    """The token pipeline's workers' stats (a prompt path's: `prompt_path.worker_stats()`)."""
    return [self.runtime.worker(s).stats() for s in range(self.plan.num_stages)]

  def slots_free(self) -> list[int]:
    """Free host slots per token stage, as the engine accounts them (disaggregation)."""
    return self.prompt_path.slots_free(self._state)

  # ---- online mode (serving/online.py) ----
  def start(self, failures: Sequence[FailureSpec] = ()) -> OnlineLoop:
    """Starts serving online: the engine loop on a background thread, fed by `submit`."""
    if self.online is not None:
      raise RuntimeError("the engine is already serving online")
    self.online = OnlineLoop(self, failures)
    return self.online

  def submit(self, prompt_ids: Sequence[int], max_new_tokens: int) -> RequestHandle:
    """Submits a request to the running online loop (thread-safe); its `RequestHandle`."""
    if self.online is None:
      raise RuntimeError("the engine is not serving online; call engine.start() first")
    return self.online.submit(prompt_ids, max_new_tokens)

  def stop(self, drain: bool = True, timeout: float | None = None) -> ServeResult | None:
    """Stops the online loop (module doc of serving/online.py); the online run's result."""
    loop = self.online
    return None if loop is None else loop.stop(drain, timeout)

  # ---- serving ----
  def serve(self, requests: Sequence[Request],
            progress: Callable[[int, int], None] | None = None,
            failures: Sequence[FailureSpec] = (),
            raise_on_error: bool | None = None) -> ServeResult:
    """Serves an open-loop workload (arrival times in seconds from now), killing workers as
    `failures` say (a disaggregated deployment numbers its prompt stages first). On a failure
    to serve (module doc), raises an `EngineError` carrying the partial result, or returns it
    when `raise_on_error` (default: the ServeConfig's) is False."""
    if self.online is not None:
      raise RuntimeError("the engine is serving online (engine.start()); stop() it before serve()")
    rejected: dict[int, str] = {}
    self.prompt_path.check_failures(self, failures)
    requests = admission.admissible(self.validate, requests, rejected)
    st = self.begin_serve(failures, rejected)
    error, cause = self.run_loop(st, ReplaySource(requests), progress)
    return self.finish_serve(st, error, cause, raise_on_error)

  def begin_serve(self, failures: Sequence[FailureSpec], rejected: dict) -> ServeState:
    """A new serve's state (its scheduler, clock, injector, watchdog), installed as current."""
    sc, path = self.serve_cfg, self.prompt_path
    sched = Scheduler(path.scheduler_depth(self), self.microbatch_size, sc.topology.mode,
                      first_mb_id=self._next_mb_id)
    t0 = time.perf_counter()
    now = lambda: time.perf_counter() - t0  # noqa: E731
    st = self._state = ServeState(
        sched, t0, Injector(failures, path.locate(self), now, t0),
        ProgressWatchdog(self.plan.num_stages, sc.fault.progress_timeout_s), rejected,
        last_progress=t0)
    st.stats0 = {w.worker_id: w for w in self.worker_stats() + path.worker_stats()}
    st.counters0 = self.runtime.counters()
    st.injector.watch_snapshots(self.plan.num_stages)
    st.path = path.begin(self, st)
    return st

  def run_loop(self, st: ServeState, source, progress=None):
    """The one engine loop, shared by replay (`serve`) and online mode (serving/online.py):
    admits what `source` says has arrived, injects microbatches, handles events, detects and
    recovers failures, until the source is exhausted and nothing is left in flight. Returns
    (error text, exception) of a failure to serve, or (None, None)."""
    sc, path, sched = self.serve_cfg, self.prompt_path, st.sched
    finished, error, cause = 0, None, None
    try:
      while source.more() or not sched.idle or path.busy(st):
        st.injector.fire_due()
        for ev in api.drain(self.runtime.events, 0.0):   # heartbeats first, then judge silence
          finished += self.on_event(st, ev)
        self._detect_and_recover(st)
        source.service(self, st)
        for req in source.arrived(st.now()):
          if sc.admission.max_pending is not None and len(sched.pending) >= sc.admission.max_pending:
            path.inject(self, st)   # a free slot empties the queue first
            if len(sched.pending) >= sc.admission.max_pending:
              reason = (f"request {req.request_id}: queue full: "
                        f"{len(sched.pending)} pending")
              st.rejected[req.request_id] = reason
              st.queue_full += 1
              source.rejected(req, reason)
              continue
          sched.admit(req)
          source.admitted(req)
          st.max_depth = max(st.max_depth, len(sched.pending))
        path.inject(self, st)
        if not sched.in_flight and not path.busy(st):
          if source.more():
            source.idle_wait(st.now())
          continue
        wait = source.wait(st.now())
        due = st.injector.next_time()
        if due is not None:   # a timed failure fires on time, not after the wait
          wait = max(0.0, min(wait, due - st.now()))
        for ev in api.drain(self.runtime.events, wait):
          finished += self.on_event(st, ev)
        if progress:
          progress(finished, source.total)
        if time.perf_counter() - st.last_progress > sc.fault.step_timeout_s:
          raise TimeoutError(f"no pipeline step finished in {sc.fault.step_timeout_s} s; worker "
                             f"heartbeats: {self.controller.silence()} s ago"
                             f"{path.describe_hang(self, st)}")
    except Exception as e:  # pylint: disable=broad-except
      # Whatever broke, what was served so far is returned or carried by the EngineError.
      error, cause = f"{type(e).__name__}: {e}", e
      self._abandon(st)
    finally:
      self._next_mb_id = sched.next_mb_id
      for rt in [self.runtime] + path.runtimes():
        rt.disarm()   # an injected failure that did not fire must not outlive the run
    return error, cause

  def finish_serve(self, st: ServeState, error, cause, raise_on_error: bool | None = None,
                   exclude: frozenset = frozenset()) -> ServeResult:
    """The serve's result: every admitted request's record (but `exclude`'s), the summary, this
    serve's share of the workers' counters; raises an `EngineError` on `error` when asked."""
    sc, path, sched = self.serve_cfg, self.prompt_path, st.sched
    raise_on_error = sc.admission.raise_on_error if raise_on_error is None else raise_on_error
    wall = st.now()
    recs = [record(sched.states[i]) for i in sorted(sched.states) if i not in exclude]
    summary = metrics_lib.summarize(recs, duration=wall)
    summary.update(rejected=len(st.rejected), rejected_queue_full=st.queue_full,
                   max_queue_depth=st.max_depth, microbatch_size=self.microbatch_size,
                   swapping=self.swap_choice.swapping, swapping_reason=self.swap_choice.reason,
                   host_memory_kind=self.host_memory.kind,
                   **path.summary(self))
    if self.links_record is not None:
      summary["links_table"] = self.links_record
    counters = self.runtime.counters()
    summary.update({k: v - st.counters0.get(k, 0) for k, v in counters.items()})
    return finish_serve(recs, st.rejected, summary, wall, self.worker_stats() + path.worker_stats(),
                        st.stats0, sc.timing.pacing == "paced", st.recoveries, error, cause,
                        raise_on_error, st.cache_probes)

  def _abandon(self, st: ServeState) -> None:
    """After a failed serve: the steps still queued or running are void (a new epoch) and their
    caches are freed, so the engine can serve again."""
    try:
      self.prompt_path.abandon(self, st)
      self.epoch += 1
      for s in range(self.plan.num_stages):
        self.runtime.worker(s).set_epoch(self.epoch)
      for mb_id in list(st.sched.in_flight):
        self.free_everywhere(mb_id)
    except Exception:  # pylint: disable=broad-except
      pass   # best effort: the error being reported matters more than this cleanup

  # ---- events ----
  def on_event(self, st: ServeState, ev) -> int:
    """Handles one runtime event; returns the requests it finished."""
    n = self.prompt_path.on_event(self, st, ev)
    if n is not None:
      return n
    if isinstance(ev, api.Heartbeat):
      self.controller.beat(ev.stage, ev.worker_id, ev.t)
    elif isinstance(ev, api.Progress):
      st.last_progress = time.perf_counter()
      if ev.epoch == self.epoch and self.controller.current(ev.stage) is not None:
        st.watchdog.progress(ev.stage, ev.mb_id)
    elif isinstance(ev, api.Ack):
      if self.controller.current(ev.holder) == ev.worker_id:   # a dead holder's acks are void
        self.strategy.observe(ev)
    elif isinstance(ev, api.SnapshotSaved):
      self.strategy.observe(ev)
      st.injector.on_snapshot(ev.stage)
    elif isinstance(ev, api.CacheProbe):
      st.cache_probes.extend(cache_oracle.records(ev, st.sched.rows_of.get(ev.mb_id, ())))
    elif isinstance(ev, api.StepResult):
      if ev.epoch == self.epoch and ev.mb_id in st.sched.in_flight:
        st.last_progress = time.perf_counter()
        return self._on_result(st, ev)
    elif isinstance(ev, api.StepError):
      if ev.epoch == self.epoch and ev.mb_id in st.sched.in_flight:
        raise RuntimeError(f"stage {ev.stage} failed on microbatch {ev.mb_id}: "
                           f"{ev.error!r}") from ev.error
    return 0

  @property
  def greedy(self) -> bool:
    """Greedy decoding: the last stage samples (`Step.greedy`) and returns tokens, not logits."""
    return self.serve_cfg.sampling.temperature == 0.0

  def next_tokens(self, mb: Microbatch, res: api.StepResult) -> np.ndarray:
    """The next token [B] of each row of `mb` from its last stage's result."""
    if res.tokens is not None:
      return np.asarray(res.tokens, np.int32)
    return self.sample(mb, res.logits)

  def sample(self, mb: Microbatch, logits) -> np.ndarray:
    """The next token [B] of each row of `mb` from its last stage's logits [B, V] (temperature
    > 0: a greedy step's last stage returns its tokens, `next_tokens`)."""
    sc = self.serve_cfg
    key = jax.random.fold_in(jax.random.fold_in(self._key, mb.mb_id), mb.step)
    return np.asarray(sample(logits, key, sc.sampling.temperature, sc.sampling.top_k, sc.sampling.top_p))

  def _on_result(self, st: ServeState, res: api.StepResult) -> int:
    mb, sched = st.sched.in_flight[res.mb_id], st.sched
    toks = self.next_tokens(mb, res)
    finished = sched.on_tokens(mb, toks, self.serve_cfg.sampling.eos_token_id, res.done_at - st.t0)
    if st.listener is not None:
      st.listener(mb)
    if mb.complete:
      st.slot_free_at[mb.slot] = res.done_at
      sched.release(mb)
      self.free_everywhere(mb.mb_id)
      self.prompt_path.on_finished(st, res.done_at)
    else:
      self.send_decode(st, mb, res.done_at)
    return len(finished)

  def free_everywhere(self, mb_id: int) -> None:
    for s in range(self.plan.num_stages):
      self.runtime.worker(s).free(mb_id)
    self._released.append(mb_id)   # also carried down the pipeline by the next step
    self.strategy.retire(mb_id)

  def _take_released(self) -> tuple:
    """The microbatches released since the last step sent down the token pipeline (`Step.frees`):
    every step drains them, so the list stays short on every prompt path."""
    frees, self._released = tuple(self._released), []
    return frees

  # ---- failures ----
  def _detect_and_recover(self, st: ServeState) -> None:
    stalled = st.watchdog.stalled()
    for s in stalled:   # alive, heartbeating, stuck: killed, to be replaced like a crash
      self.runtime.kill(s)
      st.injector.killed("token", s)
    dead = sorted(set(self.controller.dead_stages(self.runtime.vouches_alive)) | set(stalled) |
                  set(self.runtime.notified_dead()))
    if dead:
      st.recoveries.append(recovery_lib.recover(self, st, dead))
      st.last_progress = time.perf_counter()
      # Requeued requests were admitted already: they are never rejected, so after a failure
      # the queue may exceed max_pending for a while.
      st.max_depth = max(st.max_depth, len(st.sched.pending))
    event = self.prompt_path.detect_and_recover(self, st)
    if event is not None:
      st.recoveries.append(event)
      st.last_progress = time.perf_counter()

  # ---- steps ----
  def prefill_inputs(self, mb: Microbatch):
    """Tokens and positions [B, bucket] of `mb`'s prefill (empty rows write nothing)."""
    bucket = bucket_length(mb.prompt_bucket_len, self.serve_cfg.topology.max_len)
    prompts = [r.prompt for r in mb.requests] + [[self.cfg.pad_token_id]] * (
        mb.batch - len(mb.requests))
    tokens, positions = pad_prompts(prompts, bucket, self.cfg.pad_token_id)
    positions[len(mb.requests):] = -1
    return tokens, positions

  def send_prefill(self, st: ServeState, mb: Microbatch) -> None:
    """`mb`'s prefill on the token pipeline's stage 0 (the colocated prompt path)."""
    tokens, positions = self.prefill_inputs(mb)
    # Ready when its slot was freed or its last request arrived, however late this thread woke.
    ready = max(st.slot_free_at.get(mb.slot, 0.0), st.t0 + max(r.arrival for r in mb.requests))
    st.watchdog.expect(mb.mb_id)
    self.runtime.worker(0).submit(api.Step("prefill", mb.mb_id, 0, tokens, positions,
                                           len(mb.requests), mb.prompt_bucket_len, ready,
                                           self.epoch, greedy=self.greedy,
                                           frees=self._take_released()))

  def send_decode(self, st: ServeState, mb: Microbatch, ready_at: float) -> None:
    """The next decode step of `mb`: each live row's latest token at its next position."""
    positions = st.sched.advance(mb)
    rows, pad = len(mb.requests), self.cfg.pad_token_id
    last = [mb.last(i) for i in range(rows)]
    x = np.array([pad if t is None or mb.done[i] else t for i, t in enumerate(last)] +
                 [pad] * (mb.batch - rows), np.int32)
    live = int((~mb.done).sum())
    # Sampling belongs to the last stage's step: the next step is ready when that one ended.
    st.watchdog.expect(mb.mb_id)
    final = all(mb.count(i) + 1 >= r.max_new_tokens
                for i, r in enumerate(mb.requests) if not mb.done[i])
    self.runtime.worker(0).submit(api.Step("decode", mb.mb_id, mb.step, x, positions, live,
                                           int(positions.max()), ready_at, self.epoch,
                                           final=final, greedy=self.greedy,
                                           frees=self._take_released()))


def make_engine(cfg: ModelConfig, params, serve: ServeConfig, **kw):
  """The engine `serve` asks for: one `PipelineEngine` (the prompt path follows the config), or
  with `data_parallel` > 1 that many replicas of it behind a router (serving/dataparallel.py)."""
  if serve.topology.data_parallel > 1:
    from dejavu_jax.serving.dataparallel import DataParallelEngine  # pylint: disable=g-import-not-at-top
    return DataParallelEngine(cfg, params, serve, **kw)
  return PipelineEngine(cfg, params, serve, **kw)
