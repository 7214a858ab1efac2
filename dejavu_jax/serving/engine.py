"""PipelineEngine: the paper's baseline server (pipeline parallelism with microbatch injection),
orchestration only.

It wires the pieces together: a `StagePlan` on a ('stage', 'tensor') mesh, one stage program per
stage (`StageProgram`, or the hand-checkable `FakeProgram`), a `Runtime` whose workers run them
(runtime/local.py walks through the threads and queues), the FIFO `Scheduler` (the single source
of the tokens generated), sampling, and the recovery strategy chain. The engine talks to workers
only through the runtime's `Worker` messages and hears from them only on its event channel.
`serve` runs an open-loop workload: requests are admitted when their arrival time comes, whether
or not the pipeline is busy.

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

Failures: `serve(..., failures=[FailureSpec(t, s)])` kills stage s's worker at time t (or after
a number of its steps, or during the next recovery; or stalls it: fault/inject.py). The
controller declares a crashed worker dead after `heartbeat_timeout_s` of heartbeat silence; the
progress watchdog declares a stage stalled when it has work waiting and finishes no step for
`progress_timeout_s` (it is then killed). The engine then
raises the epoch (queued steps of the lost work are dropped), replaces the dead workers (weights
from host memory, or from an orbax checkpoint when `params_checkpoint` is given), asks the
strategy chain for a plan and executes it: caches are loaded into the replacements from the
plan's sources, microbatches rewound or requeued in the scheduler, and whatever a strategy could
not restore goes down the chain (fault/strategies.py).

Microbatch swapping and the device KV budget: with `ServeConfig.device_kv_budget_bytes` (or a
fraction of device memory) the microbatch size is the largest whose cache buffers fit on every
worker: D of them, or 2 with swapping (kv/budget.py); `swapping="auto"` asks the cost model
whether the swap-in hides under the step. `self.microbatch_size` and `self.swap_choice` hold
the outcome, and every serve's summary says which was chosen and why (`swapping`,
`swapping_reason`, `microbatch_size`). Swapping itself is the workers' cache placement policy
(kv/swapping.py); the engine only marks a decode step `final` so workers do not prefetch a
microbatch that is about to leave.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from typing import Callable, Sequence

import jax
import numpy as np

from dejavu_jax import costmodel as cm
from dejavu_jax.config import ModelConfig, ServeConfig
from dejavu_jax.fault.controller import Controller, RecoveryEvent
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.fault.strategies import FailureView, get_strategy
from dejavu_jax.kv import budget as kv_budget
from dejavu_jax.models.checkpoint import check_params_checkpoint, restore_params
from dejavu_jax.models.decoder import param_shapes
from dejavu_jax.models.generate import pad_prompts, sample, validate_prompts
from dejavu_jax.kv.buckets import bucket_length
from dejavu_jax.pipeline.fake import FakeProgram
from dejavu_jax.pipeline.plan import make_mesh, plan_stages
from dejavu_jax.pipeline.scheduler import Microbatch, Scheduler
from dejavu_jax.pipeline.stage import StageProgram
from dejavu_jax.runtime import api
from dejavu_jax.runtime.local import LocalRuntime
from dejavu_jax import metrics as metrics_lib
from dejavu_jax.serving.pacing import make_pace_fn
from dejavu_jax.workload import Request


@dataclasses.dataclass
class ServeResult:
  records: list                    # metrics.RequestRecord per served request, by request id
  rejected: dict                   # request_id -> reason
  summary: dict
  wall_s: float
  stage_busy_s: list
  recoveries: list = dataclasses.field(default_factory=list)   # RecoveryEvent per failure
  error: str | None = None         # why serving stopped early (None: everything was served)

  def tokens(self) -> dict[int, list[int]]:
    return {r.request_id: list(r.tokens) for r in self.records}


class EngineError(RuntimeError):
  """Serving failed; `.result` is the `ServeResult` of everything served until then."""

  def __init__(self, message: str, result: ServeResult):
    super().__init__(message)
    self.result = result


class EngineTimeout(EngineError, TimeoutError):
  """Serving failed on a hang (no step finished within `step_timeout_s`)."""


class PipelineEngine:
  """A D-stage pipeline serving requests; use as a context manager (or call close())."""

  def __init__(self, cfg: ModelConfig, params, serve: ServeConfig, cost_model=None,
               devices: Sequence | None = None, time_scale: float = 1.0,
               params_checkpoint: str | None = None, swap_link=None):
    self.cfg, self.serve_cfg = cfg, serve
    self.strategy = get_strategy(serve.recovery, serve.snapshot_dir, serve.snapshot_every)
    self.controller = Controller(serve.heartbeat_timeout_s)
    self.params_checkpoint = params_checkpoint
    self.epoch = 0
    devices = jax.devices() if devices is None else list(devices)
    # On Ray every stage actor brings its own devices; the driver needs none for them.
    ray_devices = serve.num_stages * serve.tensor if serve.runtime == "ray" else 0
    self.plan = plan_stages(cfg, serve.num_stages, serve.stage_ranges, serve.tensor,
                            num_devices=max(len(devices), ray_devices))
    if serve.max_len > cfg.max_positions:
      raise ValueError(f"max_len {serve.max_len} exceeds the model's {cfg.max_positions} "
                       "positions")
    if serve.top_k > cfg.vocab_size:
      raise ValueError(f"top_k {serve.top_k} exceeds the model's vocabulary of "
                       f"{cfg.vocab_size} tokens")
    if serve.eos_token_id is not None and serve.eos_token_id >= cfg.vocab_size:
      raise ValueError(f"eos_token_id {serve.eos_token_id} is outside the model's vocabulary "
                       f"[0, {cfg.vocab_size})")
    if params_checkpoint is not None:
      # Read now, not at the first recovery: a missing path or another model's checkpoint
      # would otherwise lose the run when a worker must be replaced.
      for start, stop in self.plan.ranges:
        check_params_checkpoint(params_checkpoint, param_shapes(cfg, start, stop))
    self.mesh = make_mesh(self.plan, devices) if not ray_devices else None
    self.params = params  # kept: a replacement worker places its stage's subset again
    pace = None
    layer_scale = (cost_model.model.num_layers / cfg.num_layers) if cost_model is not None else 1
    swap_link = swap_link or _host_link(cost_model)
    # The device KV budget decides the microbatch size, and "auto" whether swapping is on.
    self.swap_choice = choose_swapping(self, serve, cost_model, swap_link, layer_scale, devices)
    self.microbatch_size = self.swap_choice.batch
    if serve.pacing == "paced":
      if cost_model is None:
        raise ValueError("pacing='paced' needs a cost model")
      pace = make_pace_fn(cost_model, self.plan.num_stages, time_scale, layer_scale, swap_link)
    program = FakeProgram if serve.program == "fake" else StageProgram
    self.programs = [program(cfg, self.plan, self.mesh, s)
                     for s in range(self.plan.num_stages)] if not ray_devices else []
    self._started = False
    self._pace, self._ray = pace, bool(ray_devices)
    if self._ray and self.swap_choice.swapping:
      raise ValueError("swapping='on' runs on the local runtime only (the Ray workers keep "
                       "their caches on device); use runtime='local' or swapping='off'")
    self.runtime = self._make_runtime(serve)
    self.runtime.start(self.strategy.options())
    self._started = True
    for s in range(self.plan.num_stages):
      self.controller.watch(s, self.runtime.worker(s).worker_id)
    self._key = jax.random.key(serve.seed)
    self._next_mb_id = 0   # microbatch ids stay unique across serve() calls
    self._on_snapshot, self._snapshots_seen = [], {}   # snapshot-triggered failures (serve)

  def _make_runtime(self, sc: ServeConfig):
    """The runtime the ServeConfig names, over this engine's (compiled) stage programs."""
    if self._ray:
      from dejavu_jax.runtime.ray import RayRuntime  # pylint: disable=g-import-not-at-top
      return RayRuntime(
          self.cfg, self.plan.ranges, sc.tensor, sc.program, self.params, self.plan.num_stages,
          self.microbatch_size, sc.max_len, self._pace, sc.heartbeat_s, self.params_checkpoint,
          sc.ray_address, sc.ray_placement, sc.ray_transport, sc.ray_gpus_per_stage)
    return LocalRuntime(self.programs, self._params_for, self.plan.num_stages,
                        self.microbatch_size, sc.max_len, self._pace, sc.heartbeat_s,
                        swapping=self.swap_choice.swapping, kv_budget_bytes=self.kv_budget_bytes)

  def _params_for(self, s: int):
    return self._stage_params(self.plan.ranges[s])

  def _stage_params(self, layer_range):
    """A (replacement) worker's weights: the orbax checkpoint when there is one, else host."""
    if self._started and self.params_checkpoint:
      start, stop = layer_range
      return restore_params(self.params_checkpoint, like=param_shapes(self.cfg, start, stop))
    return self.params

  def close(self) -> None:
    self.runtime.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ---- serving ----
  def validate(self, request: Request) -> str | None:
    """The reason `request` cannot be served (naming it and the field), or None."""
    rid = getattr(request, "request_id", None)
    if not isinstance(rid, numbers.Integral) or isinstance(rid, bool):
      return f"request {rid!r}: request_id must be an integer"
    arrival = getattr(request, "arrival", None)
    # NaN compares false with every clock reading: such a request would never arrive.
    if (not isinstance(arrival, numbers.Real) or isinstance(arrival, bool) or
        not 0 <= arrival < math.inf):
      return f"request {rid}: arrival must be a finite time >= 0 (seconds), got {arrival!r}"
    try:
      validate_prompts(self.cfg, [getattr(request, "prompt", None)],
                       getattr(request, "max_new_tokens", None), self.serve_cfg.max_len)
    except ValueError as e:
      return f"request {rid}: " + str(e).replace("prompt 0", "prompt")
    return None

  def _admissible(self, requests, rejected: dict) -> list[Request]:
    """The valid requests, normalized (plain ints and floats) and in arrival order; the others
    go to `rejected`. Of several requests with one id, the first to arrive is served."""
    ok = []
    for req in requests:
      reason = self.validate(req)
      if reason:
        rejected[getattr(req, "request_id", None)] = reason
      else:
        fields = dict(request_id=int(req.request_id), arrival=float(req.arrival),
                      prompt=tuple(int(t) for t in req.prompt),
                      max_new_tokens=int(req.max_new_tokens))
        ok.append(dataclasses.replace(req, **fields) if dataclasses.is_dataclass(req)
                  else Request(**fields))
    ok.sort(key=lambda r: r.arrival)   # stable: equal arrivals keep the caller's order
    first, out = {}, []
    for req in ok:
      if req.request_id in first:
        rejected[req.request_id] = (
            f"request {req.request_id}: request_id {req.request_id} is already used by the "
            f"request arriving at {first[req.request_id]:g} s; this one (arrival "
            f"{req.arrival:g} s) is rejected and the first is served")
        continue
      first[req.request_id] = req.arrival
      out.append(req)
    out.sort(key=lambda r: (r.arrival, r.request_id))
    return out

  def warmup(self, progress: Callable[[int, int], None] | None = None) -> None:
    """Compiles every stage's prefill for every prompt bucket that fits `max_len`, and the decode
    step, by serving one dummy request per bucket. Call it before a measured or failure-injected
    run: a compile in the middle of serving skews latencies and, holding the GIL, can silence a
    live worker's heartbeat long enough to be declared dead under a tight timeout."""
    limit = self.serve_cfg.max_len - 1   # one new token must fit after the prompt
    n, lengths = 1, []
    while n <= limit:
      lengths.append(n)
      n = bucket_length(n, self.serve_cfg.max_len) + 1   # the first length of the next bucket
    for i, n in enumerate(lengths):   # one microbatch per bucket, padded to its longest row
      self.generate([[self.cfg.pad_token_id] * n], 2 if n == 1 else 1)   # n == 1: + decode
      if progress:
        progress(i + 1, len(lengths))

  def set_recovery(self, recovery: str) -> None:
    """Switches the recovery strategy (or chain) between `serve` calls without recompiling:
    the stage programs (their jitted, already compiled steps) are kept, the workers are restarted
    under the new strategy's options (replication tap, snapshots). Comparing strategies on one
    engine is what lets `experiments/serve.py` compile once for all of them."""
    sc = dataclasses.replace(self.serve_cfg, recovery=recovery)
    strategy = get_strategy(sc.recovery, sc.snapshot_dir, sc.snapshot_every)  # bad name: fails
    self.runtime.close()                                                       # before this
    self.serve_cfg, self.strategy = sc, strategy
    self.controller = Controller(sc.heartbeat_timeout_s)
    self._started = False
    self.runtime = self._make_runtime(sc)
    self.runtime.start(self.strategy.options())
    self._started = True
    for s in range(self.plan.num_stages):
      self.controller.watch(s, self.runtime.worker(s).worker_id)

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

  def worker_stats(self) -> list[api.WorkerStats]:
    return [self.runtime.worker(s).stats() for s in range(self.plan.num_stages)]

  def serve(self, requests: Sequence[Request],
            progress: Callable[[int, int], None] | None = None,
            failures: Sequence[FailureSpec] = (),
            raise_on_error: bool | None = None) -> ServeResult:
    """Serves an open-loop workload (arrival times in seconds from now), killing workers as
    `failures` say. On a failure to serve (module doc), raises an `EngineError` carrying the
    partial result, or returns it when `raise_on_error` (default: the ServeConfig's) is False."""
    sc = self.serve_cfg
    raise_on_error = sc.raise_on_error if raise_on_error is None else raise_on_error
    for f in failures:
      if not 0 <= f.stage < self.plan.num_stages:
        raise ValueError(f"failure at stage {f.stage}, but the pipeline has stages "
                         f"0..{self.plan.num_stages - 1}")
    timed = sorted((f for f in failures if f.time_s is not None), key=lambda f: f.time_s)
    self._during_recovery = [f for f in failures if f.during_recovery]
    # Snapshot-triggered: fired from the event loop when every stage reached the count.
    self._on_snapshot = sorted((f for f in failures if f.after_snapshots is not None),
                               key=lambda f: f.after_snapshots)
    self._snapshots_seen = {s: 0 for s in range(self.plan.num_stages)}
    for f in failures:
      if f.after_steps is not None:
        if f.after_steps == 0:
          timed.insert(0, dataclasses.replace(f, time_s=0.0, after_steps=None))
        else:
          self.runtime.arm(f.stage, f.after_steps, f.kind, f.stall_s)
    events: list[RecoveryEvent] = []
    killed: dict[int, float] = {}
    sched = self._sched = Scheduler(self.plan.num_stages, self.microbatch_size, sc.mode,
                                    first_mb_id=self._next_mb_id)
    rejected: dict[int, str] = {}
    requests = self._admissible(requests, rejected)
    queue_full, max_depth = 0, 0
    stats0 = {st.worker_id: st for st in self.worker_stats()}
    t0 = self._t0 = time.perf_counter()
    now = lambda: time.perf_counter() - t0  # noqa: E731
    # When each slot was last freed (perf_counter): a prefill injected into it is ready then, or
    # when its last request arrived, whichever is later, however late the engine thread wakes.
    self._slot_free_at = {}
    nxt, finished = 0, 0
    error = cause = None
    self._last_progress = time.perf_counter()
    self._killed = killed
    self._waiting: dict[int, tuple[int, float]] = {}   # mb_id -> (stage it waits on, since)
    self._stage_progress = {s: time.monotonic() for s in range(self.plan.num_stages)}
    try:
      while nxt < len(requests) or not sched.idle:
        while timed and timed[0].time_s <= now():
          self._inject(timed.pop(0), now)
        for ev in api.drain(self.runtime.events, 0.0):   # heartbeats first, then judge silence
          finished += self._on_event(sched, ev)
        dead = sorted(set(self.controller.dead_stages()) | set(self._stalled()) |
                      set(getattr(self.runtime, "notified_dead", list)()))
        if dead:
          events.append(self._recover(sched, dead, killed, now))
          self._last_progress = time.perf_counter()
          # Requeued requests were admitted already: they are never rejected, so after a
          # failure the queue may exceed max_pending for a while.
          max_depth = max(max_depth, len(sched.pending))
        while nxt < len(requests) and requests[nxt].arrival <= now():
          req = requests[nxt]
          nxt += 1
          if sc.max_pending is not None and len(sched.pending) >= sc.max_pending:
            while (mb := sched.inject()) is not None:   # a free slot empties the queue first
              self._send_prefill(mb)
            if len(sched.pending) >= sc.max_pending:
              rejected[req.request_id] = (f"request {req.request_id}: queue full: "
                                          f"{len(sched.pending)} pending")
              queue_full += 1
              continue
          sched.admit(req)
          max_depth = max(max_depth, len(sched.pending))
        while (mb := sched.inject()) is not None:
          self._send_prefill(mb)
        if not sched.in_flight:
          if nxt < len(requests):
            time.sleep(max(0.0, min(requests[nxt].arrival - now(), 0.05)))
          continue
        wait = 0.05 if nxt >= len(requests) else max(0.0,
                                                     min(requests[nxt].arrival - now(), 0.05))
        for ev in api.drain(self.runtime.events, wait):
          finished += self._on_event(sched, ev)
        if progress:
          progress(finished, len(requests))
        if time.perf_counter() - self._last_progress > sc.step_timeout_s:
          raise TimeoutError(f"no pipeline step finished in {sc.step_timeout_s} s; worker "
                             f"heartbeats: {self.controller.silence()} s ago")
    except Exception as e:  # pylint: disable=broad-except
      # Whatever broke, what was served so far is returned or carried by the EngineError.
      error, cause = f"{type(e).__name__}: {e}", e
      self._abandon(sched)
    finally:
      self._next_mb_id = sched.next_mb_id
      self.runtime.disarm()   # an injected failure that did not fire must not outlive the run
    wall = now()
    recs = [_record(sched.states[i]) for i in sorted(sched.states)]
    summary = metrics_lib.summarize(recs, duration=wall)
    summary["rejected"] = len(rejected)
    summary["rejected_queue_full"] = queue_full
    summary["max_queue_depth"] = max_depth
    summary["microbatch_size"] = self.microbatch_size
    summary["swapping"] = self.swap_choice.swapping
    summary["swapping_reason"] = self.swap_choice.reason
    return finish_serve(recs, rejected, summary, wall, self.worker_stats(), stats0,
                        sc.pacing == "paced", events, error, cause, raise_on_error)

  def _abandon(self, sched: Scheduler) -> None:
    """After a failed serve: the steps still queued or running are void (a new epoch) and their
    caches are freed, so the engine can serve again."""
    try:
      self.epoch += 1
      for s in range(self.plan.num_stages):
        self.runtime.worker(s).set_epoch(self.epoch)
      for mb_id in list(sched.in_flight):
        self._free_everywhere(mb_id)
    except Exception:  # pylint: disable=broad-except
      pass   # best effort: the error being reported matters more than this cleanup

  # ---- failures ----
  def _inject(self, f: FailureSpec, now) -> None:
    self._killed[f.stage] = now()   # when the failure began (a stall is caught later)
    if f.kind == "crash":
      self.runtime.kill(f.stage)
    else:
      self.runtime.stall(f.stage, f.stall_s)

  def _stalled(self) -> list[int]:
    """The progress watchdog: stages with a step waiting on them that finished no step for
    `progress_timeout_s` (alive, heartbeating, stuck). They are killed, to be replaced."""
    t, limit = time.monotonic(), self.serve_cfg.progress_timeout_s
    out = sorted({s for s, since in self._waiting.values()
                  if t - max(since, self._stage_progress[s]) > limit})
    for s in out:
      self.runtime.kill(s)
      self._killed.setdefault(s, time.perf_counter() - self._t0)
    return out

  # ---- events ----
  def _on_event(self, sched: Scheduler, ev) -> int:
    """Handles one runtime event; returns the requests it finished."""
    if isinstance(ev, api.Heartbeat):
      self.controller.beat(ev.stage, ev.worker_id, ev.t)
    elif isinstance(ev, api.Progress):
      self._last_progress = time.perf_counter()
      if ev.epoch == self.epoch and self.controller.current(ev.stage) is not None:
        self._stage_progress[ev.stage] = time.monotonic()
        if ev.mb_id in self._waiting:
          nxt = ev.stage + 1
          if nxt < self.plan.num_stages:
            self._waiting[ev.mb_id] = (nxt, time.monotonic())
          else:
            del self._waiting[ev.mb_id]
    elif isinstance(ev, api.Ack):
      if self.controller.current(ev.holder) == ev.worker_id:   # a dead holder's acks are void
        self.strategy.observe(ev)
    elif isinstance(ev, api.SnapshotSaved):
      self.strategy.observe(ev)
      self._snapshots_seen[ev.stage] = self._snapshots_seen.get(ev.stage, 0) + 1
      rounds = min(self._snapshots_seen.values())
      while self._on_snapshot and self._on_snapshot[0].after_snapshots <= rounds:
        self._inject(self._on_snapshot.pop(0), lambda: time.perf_counter() - self._t0)
    elif isinstance(ev, api.StepResult):
      if ev.epoch == self.epoch and ev.mb_id in sched.in_flight:
        self._last_progress = time.perf_counter()
        return self._on_result(sched, ev)
    elif isinstance(ev, api.StepError):
      if ev.epoch == self.epoch and ev.mb_id in sched.in_flight:
        raise RuntimeError(f"stage {ev.stage} failed on microbatch {ev.mb_id}: "
                           f"{ev.error!r}") from ev.error
    return 0

  def _on_result(self, sched: Scheduler, res: api.StepResult) -> int:
    mb = sched.in_flight[res.mb_id]
    sc = self.serve_cfg
    if sc.temperature == 0.0:
      # Greedy on the host: same first-max tie rule as jnp.argmax, without extra dispatches on
      # the engine thread (which is on every step's critical path).
      toks = np.asarray(res.logits).argmax(axis=-1).astype(np.int32)
    else:
      key = jax.random.fold_in(jax.random.fold_in(self._key, mb.mb_id), mb.step)
      toks = np.asarray(sample(res.logits, key, sc.temperature, sc.top_k, sc.top_p))
    t = res.done_at - self._t0  # when the step ended, not when this thread got to it
    finished_rows = sched.on_tokens(mb, toks, sc.eos_token_id, t)
    if mb.complete:
      self._slot_free_at[mb.slot] = res.done_at
      sched.release(mb)
      self._free_everywhere(mb.mb_id)
      return len(finished_rows)
    self._send_decode(sched, mb, res.done_at)
    return len(finished_rows)

  def _free_everywhere(self, mb_id: int) -> None:
    for s in range(self.plan.num_stages):
      self.runtime.worker(s).free(mb_id)
    self.strategy.retire(mb_id)

  # ---- recovery ----
  def _recover(self, sched: Scheduler, dead: list[int], killed: dict, now) -> RecoveryEvent:
    detected = now()
    d = self.plan.num_stages
    # A worker that died around this failure but is not yet silent long enough (the runtime
    # already knows: a stopped thread, a dead actor) is recovered now too, not planned around.
    dead = sorted(set(dead) | {s for s in range(d) if not self.runtime.alive(s)})
    for s in dead:   # a worker that crashed by itself (an armed failure): when, for the report
      t = self.runtime.died_at(s)
      if s not in killed and t is not None:
        killed[s] = t - self._t0
    self.epoch += 1
    for s in range(d):
      self.runtime.worker(s).set_epoch(self.epoch)
    view = FailureView(tuple(dead), d, {m: mb.step for m, mb in sched.in_flight.items()})
    self.strategy.forget(view)
    for s in dead:
      w = self.runtime.replace(s)
      w.set_epoch(self.epoch)
      self.controller.watch(s, w.worker_id)
      self._stage_progress[s] = time.monotonic()
    self._waiting.clear()   # every in-flight microbatch is resumed or requeued below
    resumed, requeue, used = [], {}, {}
    self._load_errors: list[str] = []
    todo = self.strategy.plan(view)
    while self._during_recovery:   # injected: a failure while this recovery loads caches
      self._inject(self._during_recovery.pop(0), now)
    while todo:
      index, plan = todo.pop(0)
      name = self.strategy.strategies[index].name
      requeue.update(plan.requeue)
      failed = self._load_caches(plan.resume)
      ok = [r for r in plan.resume if r.mb_id not in failed]
      resumed += ok
      for mb_id in list(plan.requeue) + [r.mb_id for r in ok]:
        used[name] = used.get(name, 0) + 1
      if failed:
        retry = dataclasses.replace(view, completed={m: view.completed[m] for m in failed})
        todo += self.strategy.plan(retry, start=index + 1)
    lost_requests = sum(int((~mb.done[:len(mb.requests)]).sum())
                        for mb in sched.in_flight.values())
    recomputed = 0
    for mb_id, mode in requeue.items():
      mb = sched.in_flight[mb_id]
      self._slot_free_at[mb.slot] = time.perf_counter()
      recomputed += sched.requeue(mb, mode)
      self._free_everywhere(mb_id)
    for r in resumed:
      recomputed += sched.rewind(sched.in_flight[r.mb_id], r.step)
    if self.strategy.options().replicate and d > 1:
      for s in dead:   # the replicas the dead worker held are rebuilt by its predecessor
        if (s - 1) % d not in dead:
          self.runtime.worker((s - 1) % d).resync()
    for r in resumed:
      self._send_decode(sched, sched.in_flight[r.mb_id], time.perf_counter())
    return RecoveryEvent(
        stage=dead[0], strategy=self.serve_cfg.recovery,
        failed_at=min(killed.pop(s, detected) for s in dead), detected_at=detected,
        recovered_at=now(), lost_microbatches=len(view.completed), lost_requests=lost_requests,
        recomputed_tokens=recomputed, restored_microbatches=len(resumed), stages=tuple(dead),
        handled_by=used, load_errors=self._load_errors)

  def _load_caches(self, resumes) -> set[int]:
    """Loads every resumed microbatch's caches into the replaced workers and waits for them;
    returns the microbatches whose load failed (or did not finish in time)."""
    waiting = {}
    for r in resumes:
      for s, source in r.sources.items():
        self.runtime.worker(s).load_cache(r.mb_id, source, self.epoch)
        waiting[(s, r.mb_id)] = r
    failed = set()
    deadline = time.perf_counter() + self.serve_cfg.step_timeout_s
    while waiting and time.perf_counter() < deadline:
      for (s, mb), r in list(waiting.items()):   # a holder or a replacement died meanwhile
        src = r.sources[s]
        if not self.runtime.alive(s) or (isinstance(src, api.ReplicaSource) and
                                         not self.runtime.alive(src.holder)):
          del waiting[(s, mb)]
          failed.add(mb)
      for ev in api.drain(self.runtime.events, 0.05):
        if isinstance(ev, api.CacheLoaded):
          r = waiting.pop((ev.stage, ev.mb_id), None)
          if r is not None and ev.error is not None:
            failed.add(ev.mb_id)
            self._load_errors.append(f"microbatch {ev.mb_id} on stage {ev.stage}: {ev.error}")
        elif not isinstance(ev, (api.StepResult, api.StepError)):
          self._on_event(self._sched, ev)   # heartbeats, acks, snapshots keep flowing
    failed |= {mb for _, mb in waiting}
    return failed

  # ---- steps ----
  def _send_prefill(self, mb: Microbatch) -> None:
    bucket = bucket_length(mb.prompt_bucket_len, self.serve_cfg.max_len)
    prompts = [r.prompt for r in mb.requests] + [[self.cfg.pad_token_id]] * (
        mb.batch - len(mb.requests))
    tokens, positions = pad_prompts(prompts, bucket, self.cfg.pad_token_id)
    positions[len(mb.requests):] = -1  # empty rows write nothing
    ready = max(self._slot_free_at.get(mb.slot, 0.0),
                self._t0 + max(r.arrival for r in mb.requests))
    self._waiting[mb.mb_id] = (0, time.monotonic())
    self.runtime.worker(0).submit(api.Step("prefill", mb.mb_id, 0, tokens, positions,
                                           len(mb.requests), mb.prompt_bucket_len, ready,
                                           self.epoch))

  def _send_decode(self, sched: Scheduler, mb: Microbatch, ready_at: float) -> None:
    """The next decode step of `mb`: each live row's latest token at its next position."""
    positions = sched.advance(mb)
    x = np.array([g[-1] if g and not mb.done[i] else self.cfg.pad_token_id
                  for i, g in enumerate(mb.generated)] +
                 [self.cfg.pad_token_id] * (mb.batch - len(mb.generated)), np.int32)
    live = int((~mb.done).sum())
    # Sampling belongs to the last stage's step: the next step is ready when that one ended.
    self._waiting[mb.mb_id] = (0, time.monotonic())
    final = all(len(mb.generated[i]) + 1 >= r.max_new_tokens
                for i, r in enumerate(mb.requests) if not mb.done[i])
    self.runtime.worker(0).submit(api.Step("decode", mb.mb_id, mb.step, x, positions, live,
                                           int(positions.max()), ready_at, self.epoch,
                                           final=final))


def _host_link(cost_model):
  """The modeled device<->host link: the cost model's hardware's, else PCIe 4."""
  hw = getattr(cost_model, "hardware", None)
  return getattr(hw, "host_link", None) or cm.LINKS["pcie4"]


def choose_swapping(engine: "PipelineEngine", serve: ServeConfig, cost_model, swap_link,
                    layer_scale: float, devices) -> kv_budget.SwapChoice:
  """Swapping on/off and the microbatch size from the ServeConfig's budget (kv/budget.py)."""
  budget = serve.device_kv_budget_bytes
  if serve.device_kv_budget_fraction is not None:
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    if not limit:
      raise kv_budget.KVBudgetError(
          f"device_kv_budget_fraction needs a device that reports its memory (a GPU); "
          f"{devices[0].platform} does not: give device_kv_budget_bytes instead")
    budget = int(serve.device_kv_budget_fraction * limit)
  engine.kv_budget_bytes = budget   # the workers keep their swap-in staging within it
  layers = [stop - start for start, stop in engine.plan.ranges]
  cost = cost_model if serve.swapping == "auto" and budget is not None else None
  if serve.swapping == "auto" and budget is not None and cost is None:
    # Real pacing without a cost model: judge the swap on this machine's measured roofline.
    cost = cm.roofline(engine.cfg, cm.measure_cpu())
    swap_link, layer_scale = cost.hardware.host_link, 1.0
  return kv_budget.choose(serve.swapping, engine.cfg, layers, serve.max_len, budget,
                          engine.plan.num_stages, serve.microbatch_size, cost, swap_link,
                          serve.swap_context, layer_scale)


def finish_serve(recs, rejected, summary: dict, wall: float, stats, stats0: dict, paced: bool,
                 events, error, cause, raise_on_error: bool) -> ServeResult:
  """The end of a serve, shared by the engines: this serve's share of the workers' counters
  (`stats` minus `stats0`, the same workers' stats when it began) into the summary, then the
  result, or the `EngineError` / `EngineTimeout` carrying it."""
  if paced:  # steps whose real compute outlasted the modeled time
    summary["paced_overruns"] = sum(
        st.overruns - getattr(stats0.get(st.worker_id), "overruns", 0) for st in stats)
  if events:
    summary["failures"] = len(events)
    summary["mean_recovery_s"] = float(np.mean([e.recovery_s for e in events]))
  if error is not None:
    summary["error"] = error
  busy = [st.busy_s - getattr(stats0.get(st.worker_id), "busy_s", 0.0) for st in stats]
  result = ServeResult(recs, rejected, summary, wall, busy, events, error)
  if error is not None and raise_on_error:
    done = sum(r.done for r in recs)
    kind = EngineTimeout if isinstance(cause, TimeoutError) else EngineError
    raise kind(f"serving failed with {done} of {len(recs)} admitted requests finished "
               f"(see .result): {error}", result) from cause
  return result


def _record(state) -> metrics_lib.RequestRecord:
  req = state.request
  return metrics_lib.RequestRecord(
      request_id=req.request_id, arrival=req.arrival, prompt_len=len(req.prompt),
      first_token=state.token_times[0] if state.token_times else None, finish=state.finish,
      output_len=len(state.tokens) if state.done else 0, tokens=list(state.tokens),
      token_times=list(state.token_times), recomputed_tokens=state.recomputed)
