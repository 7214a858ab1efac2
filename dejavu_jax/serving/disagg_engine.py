"""DisaggregatedEngine: a Dp-stage prompt pipeline feeding a Dt-stage token pipeline (DéjàVu's
prompt-token disaggregation), orchestration only.

The two pipelines are worker sets on disjoint devices of the mesh (runtime/disagg.py: the first
Dp x tensor devices run the prompt stages, the next Dt x tensor the token stages); their events
arrive on one channel. A microbatch's life:

  1. formed from the queue (FIFO, paper or mixed mode, the baseline's `Scheduler`) when the prompt
     pipeline has fewer than Dp microbatches and every token worker has a free host slot; a slot
     is reserved on each token worker before its prompt starts (flow control: otherwise the
     prompt waits, and so does every request behind it);
  2. its prefill runs through the prompt stages; each stage streams the KV of its layers to the
     token stages that own them (stream.route) into the reserved host slots, layer by layer as
     each is computed (`serve.layerwise_stream`; else once per stage step);
  3. the last prompt stage's logits give the first token (sampled here, as in the baseline);
  4. when every token worker reported its slot complete and the token pipeline holds fewer than
     Dt microbatches, it enters the token pipeline (microbatch injection): each token worker is
     told to load it (the host-to-device copy starts at once, overlapping queued steps; the slot
     frees when it landed) and its first decode step is submitted behind the loads;
  5. decode steps run as in the baseline until its rows finish.

Failures (`FailureSpec.stage` numbers the prompt stages 0..Dp-1, then the token stages
Dp..Dp+Dt-1). A prompt worker's death (heartbeat silence on the prompt side) replaces it and
redoes every prompt whose cache had not completely landed or whose first token had not come
(the prompt epoch changes: a prefill still in the prompt pipeline reports nothing): those
microbatches go back to the front of the queue and their slots are freed; nothing on the token
side is touched. A token worker's death is recovered by the configured strategy chain exactly as
in the baseline engine (this class reuses `PipelineEngine`'s recovery, events, sampling and
decode steps over the token pipeline); the microbatches still waiting in host slots of the dead
worker are redone from their prompts.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from dejavu_jax import costmodel as cm
from dejavu_jax.config import ModelConfig, ServeConfig
from dejavu_jax.fault.controller import Controller, RecoveryEvent
from dejavu_jax.fault.inject import FailureSpec
from dejavu_jax.fault.strategies import get_strategy
from dejavu_jax.models.checkpoint import check_params_checkpoint
from dejavu_jax.models.decoder import param_shapes
from dejavu_jax.models.generate import pad_prompts, sample
from dejavu_jax.kv.buckets import bucket_length
from dejavu_jax.pipeline.fake import FakeProgram
from dejavu_jax.pipeline.plan import make_mesh, plan_stages
from dejavu_jax.pipeline.scheduler import Microbatch, Scheduler
from dejavu_jax.pipeline.stage import StageProgram
from dejavu_jax.runtime import api
from dejavu_jax.runtime.disagg import (FromPrompt, PromptLanded, PromptRuntime, SlotFreed,
                                       TokenRuntime)
from dejavu_jax import metrics as metrics_lib
from dejavu_jax.serving.engine import PipelineEngine, ServeResult, _record, finish_serve
from dejavu_jax.serving.disagg_split import (DisaggregationError, check_split,  # noqa: F401
                                             default_host_slots, modeled_prompt_len,
                                             prompt_pace_fn)
from dejavu_jax.serving.pacing import make_pace_fn


def make_engine(cfg: ModelConfig, params, serve: ServeConfig, **kw) -> PipelineEngine:
  """The engine `serve` asks for: disaggregated when it names prompt or token stages."""
  if serve.prompt_stages or serve.token_stages:
    return DisaggregatedEngine(cfg, params, serve, **kw)
  return PipelineEngine(cfg, params, serve, **kw)


@dataclasses.dataclass
class _PromptPhase:
  mb: Microbatch
  injected_at: float
  first_token: bool = False      # the prefill's token was sampled
  done_at: float = 0.0           # perf_counter time the prefill ended (modeled when paced)
  landed: set = dataclasses.field(default_factory=set)   # token stages holding its whole cache


class DisaggregatedEngine(PipelineEngine):
  """Prompt pipeline of `serve.prompt_stages`, token pipeline of `serve.token_stages`."""

  def __init__(self, cfg: ModelConfig, params, serve: ServeConfig, cost_model=None,
               devices: Sequence | None = None, time_scale: float = 1.0,
               params_checkpoint: str | None = None):
    # Not PipelineEngine.__init__: the same attributes, over the token pipeline, plus a prompt
    # pipeline (the inherited recovery, events and decode steps act on the token side).
    devices = jax.devices() if devices is None else list(devices)
    dp, dt, slots = check_split(cfg, serve, len(devices))
    self.cfg, self.serve_cfg = cfg, serve
    self.Dp, self.Dt, self.host_slots = dp, dt, slots
    self.strategy = get_strategy(serve.recovery, serve.snapshot_dir, serve.snapshot_every)
    self.controller = Controller(serve.heartbeat_timeout_s)
    self.prompt_controller = Controller(serve.heartbeat_timeout_s)
    self.params_checkpoint = params_checkpoint
    self.epoch = self.prompt_epoch = 0
    if serve.max_len > cfg.max_positions:
      raise ValueError(f"max_len {serve.max_len} exceeds the model's {cfg.max_positions} "
                       "positions")
    if serve.eos_token_id is not None and serve.eos_token_id >= cfg.vocab_size:
      raise ValueError(f"eos_token_id {serve.eos_token_id} is outside the model's vocabulary "
                       f"[0, {cfg.vocab_size})")
    t = serve.tensor
    self.prompt_plan = plan_stages(cfg, dp, None, t, num_devices=dp * t)
    self.plan = plan_stages(cfg, dt, None, t, num_devices=dt * t)
    if params_checkpoint is not None:
      for start, stop in self.prompt_plan.ranges + self.plan.ranges:
        check_params_checkpoint(params_checkpoint, param_shapes(cfg, start, stop))
    self.prompt_mesh = make_mesh(self.prompt_plan, devices[:dp * t])
    self.mesh = make_mesh(self.plan, devices[dp * t:(dp + dt) * t])
    self.params = params
    pace = prompt_pace = None
    self._cost, self._scale, self._host_link = cost_model, time_scale, None
    if serve.pacing == "paced":
      if cost_model is None:
        raise ValueError("pacing='paced' needs a cost model")
      scale = cost_model.model.num_layers / cfg.num_layers
      link = cm.LINKS[serve.stream_link] if serve.stream_link else None
      pace = make_pace_fn(cost_model, dt, time_scale, scale)
      prompt_pace = prompt_pace_fn(cost_model, dp, time_scale, scale, link)
      hw = getattr(cost_model, "hardware", None)
      self._host_link = getattr(hw, "host_link", None)
    program = FakeProgram if serve.program == "fake" else StageProgram
    self.prompt_programs = [program(cfg, self.prompt_plan, self.prompt_mesh, s)
                            for s in range(dp)]
    self.programs = [program(cfg, self.plan, self.mesh, s) for s in range(dt)]
    self._paces = (pace, prompt_pace)
    self._started = False
    self._start_runtimes()
    self._key = jax.random.key(serve.seed)
    self._next_mb_id = 0
    # State the baseline's event handling may read (snapshot-triggered failures, on main since
    # this engine was written); such failures are refused by `serve` here.
    self._on_snapshot, self._snapshots_seen = [], {}

  def _start_runtimes(self) -> None:
    """Starts the token and the prompt workers under the current strategy's options."""
    sc, (pace, prompt_pace), slots = self.serve_cfg, self._paces, self.host_slots
    self.runtime = TokenRuntime(self.programs, self._params_for, self.Dt, sc.microbatch_size,
                                sc.max_len, pace, sc.heartbeat_s, self.plan.ranges, slots)
    self.prompt_runtime = PromptRuntime(self.prompt_programs, self._prompt_params_for, self.Dp,
                                        sc.microbatch_size, sc.max_len, prompt_pace,
                                        sc.heartbeat_s, self.prompt_plan.ranges, self.runtime,
                                        layerwise=sc.layerwise_stream)
    self.runtime.start(self.strategy.options())
    self.prompt_runtime.start(api.WorkerOptions())
    self._started = True
    for s in range(self.Dt):
      self.controller.watch(s, self.runtime.worker(s).worker_id)
    for s in range(self.Dp):
      self.prompt_controller.watch(s, self.prompt_runtime.worker(s).worker_id)

  def set_recovery(self, recovery: str) -> None:
    """As `PipelineEngine.set_recovery`: both worker sets restart, the programs are kept."""
    sc = dataclasses.replace(self.serve_cfg, recovery=recovery)
    strategy = get_strategy(sc.recovery, sc.snapshot_dir, sc.snapshot_every)
    self.close()
    self.serve_cfg, self.strategy = sc, strategy
    self.controller = Controller(sc.heartbeat_timeout_s)
    self.prompt_controller = Controller(sc.heartbeat_timeout_s)
    self._started = False
    self._start_runtimes()

  def _prompt_params_for(self, s: int):
    return self._stage_params(self.prompt_plan.ranges[s])

  def close(self) -> None:
    self.prompt_runtime.close()
    self.runtime.close()

  def worker_stats(self) -> list[api.WorkerStats]:
    """The token workers' stats (what the inherited bookkeeping reads)."""
    return [self.runtime.worker(s).stats() for s in range(self.Dt)]

  def prompt_worker_stats(self) -> list[api.WorkerStats]:
    return [self.prompt_runtime.worker(s).stats() for s in range(self.Dp)]

  def slots_free(self) -> list[int]:
    """Free host slots per token stage, as the engine accounts them."""
    return [self.host_slots - sum(s in h for h in self._holders.values())
            for s in range(self.Dt)]

  # ---- serving ----
  def serve(self, requests: Sequence, progress: Callable[[int, int], None] | None = None,
            failures: Sequence[FailureSpec] = (),
            raise_on_error: bool | None = None) -> ServeResult:
    """As `PipelineEngine.serve`; failures number prompt stages first (module doc)."""
    sc = self.serve_cfg
    raise_on_error = sc.raise_on_error if raise_on_error is None else raise_on_error
    total = self.Dp + self.Dt
    for f in failures:
      if not 0 <= f.stage < total:
        raise ValueError(f"failure at stage {f.stage}, but the deployment has stages "
                         f"0..{total - 1} (prompt 0..{self.Dp - 1}, token {self.Dp}..{total - 1})")
      if getattr(f, "after_snapshots", None) is not None:
        raise ValueError(f"{f}: snapshot-triggered failures are not supported by the "
                         "disaggregated engine; use time_s or after_steps")
    timed = sorted((f for f in failures if f.time_s is not None), key=lambda f: f.time_s)
    self._on_snapshot, self._snapshots_seen = [], {s: 0 for s in range(self.Dt)}
    self._during_recovery = [f for f in failures if f.during_recovery]
    for f in failures:
      if f.after_steps is not None:
        if f.after_steps == 0:
          timed.insert(0, dataclasses.replace(f, time_s=0.0, after_steps=None))
        else:
          rt, s = self._side(f.stage)
          rt.arm(s, f.after_steps, f.kind, f.stall_s)
    events: list[RecoveryEvent] = []
    killed: dict[int, float] = {}
    # Depth of the bookkeeping scheduler: every microbatch that can be in the system at once (one
    # per host slot, one per token stage); this engine gates injection itself.
    sched = self._sched = Scheduler(self.host_slots + self.Dt, sc.microbatch_size, sc.mode,
                                    first_mb_id=self._next_mb_id)
    rejected: dict[int, str] = {}
    requests = self._admissible(requests, rejected)
    queue_full, max_depth = 0, 0
    stats0 = {st.worker_id: st for st in self.worker_stats() + self.prompt_worker_stats()}
    t0 = self._t0 = time.perf_counter()
    now = lambda: time.perf_counter() - t0  # noqa: E731
    self._slot_free_at = {}
    self._released_at = t0          # modeled time a prompt-side resource was last freed
    self._token_free_at = t0        # modeled time a token-side microbatch last finished
    self._prompt: dict[int, _PromptPhase] = {}
    self._ready: collections.deque = collections.deque()   # mb ids ready for the token side
    self._holders: dict[int, set] = {}                      # mb id -> token stages holding a slot
    nxt, finished = 0, 0
    error = cause = None
    self._last_progress = time.perf_counter()
    self._killed = killed
    self._waiting: dict[int, tuple[int, float]] = {}
    self._stage_progress = {s: time.monotonic() for s in range(self.Dt)}
    try:
      while nxt < len(requests) or not sched.idle or self._prompt:
        while timed and timed[0].time_s <= now():
          self._inject(timed.pop(0), now)
        for ev in api.drain(self.runtime.events, 0.0):
          finished += self._on_event(sched, ev)
        dead = sorted(set(self.controller.dead_stages()) | set(self._stalled()))
        if dead:
          events.append(self._recover(sched, dead, killed, now))
          self._last_progress = time.perf_counter()
        pdead = self.prompt_controller.dead_stages()
        if pdead:
          events.append(self._recover_prompt(sched, pdead, now))
          self._last_progress = time.perf_counter()
        max_depth = max(max_depth, len(sched.pending))
        while nxt < len(requests) and requests[nxt].arrival <= now():
          req = requests[nxt]
          nxt += 1
          if sc.max_pending is not None and len(sched.pending) >= sc.max_pending:
            self._inject_prompts(sched)
            if len(sched.pending) >= sc.max_pending:
              rejected[req.request_id] = (f"request {req.request_id}: queue full: "
                                          f"{len(sched.pending)} pending")
              queue_full += 1
              continue
          sched.admit(req)
          max_depth = max(max_depth, len(sched.pending))
        self._inject_prompts(sched)
        self._enter_token_side(sched)
        if not sched.in_flight and not self._prompt:
          if nxt < len(requests):
            time.sleep(max(0.0, min(requests[nxt].arrival - now(), 0.05)))
          continue
        wait = 0.05 if nxt >= len(requests) else max(0.0,
                                                     min(requests[nxt].arrival - now(), 0.05))
        if timed:
          wait = max(0.0, min(wait, timed[0].time_s - now()))
        for ev in api.drain(self.runtime.events, wait):
          finished += self._on_event(sched, ev)
        if progress:
          progress(finished, len(requests))
        if time.perf_counter() - self._last_progress > sc.step_timeout_s:
          raise TimeoutError(f"no pipeline step finished in {sc.step_timeout_s} s; token "
                             f"heartbeats {self.controller.silence()} s ago, prompt "
                             f"{self.prompt_controller.silence()} s ago; host slots free "
                             f"{self.slots_free()}")
    except Exception as e:  # pylint: disable=broad-except
      error, cause = f"{type(e).__name__}: {e}", e
      self._abandon(sched)
    finally:
      self._next_mb_id = sched.next_mb_id
      self.runtime.disarm()
      self.prompt_runtime.disarm()
    wall = now()
    recs = [_record(sched.states[i]) for i in sorted(sched.states)]
    summary = metrics_lib.summarize(recs, duration=wall)
    summary.update(rejected=len(rejected), rejected_queue_full=queue_full,
                   max_queue_depth=max_depth, prompt_stages=self.Dp, token_stages=self.Dt,
                   host_slots=self.host_slots)
    return finish_serve(recs, rejected, summary, wall,
                        self.worker_stats() + self.prompt_worker_stats(), stats0,
                        sc.pacing == "paced", events, error, cause, raise_on_error)

  def _abandon(self, sched: Scheduler) -> None:
    try:
      for mb_id in list(self._prompt):
        self._drop_prompt(sched, mb_id, requeue=None)
      self.prompt_epoch += 1
      for s in range(self.Dp):
        self.prompt_runtime.worker(s).set_epoch(self.prompt_epoch)
    except Exception:  # pylint: disable=broad-except
      pass
    super()._abandon(sched)

  # ---- the prompt side ----
  def _inject_prompts(self, sched: Scheduler) -> None:
    """Starts prompts while the prompt pipeline has room and every token worker a free slot."""
    while (sched.pending and self._prompts_computing() < self.Dp and
           min(self.slots_free()) > 0):
      mb = sched.inject()
      if mb is None:
        return
      del sched.in_flight[mb.mb_id]   # in flight on the token side only once it enters there
      for s in range(self.Dt):
        if not self.runtime.worker(s).reserve_slot(mb.mb_id):
          raise RuntimeError(f"token stage {s} refused a host slot the engine counted free")
      self._holders[mb.mb_id] = set(range(self.Dt))
      ready = max(self._released_at, self._t0 + max(r.arrival for r in mb.requests))
      self._prompt[mb.mb_id] = _PromptPhase(mb, time.perf_counter())
      tokens, positions = self._prefill_inputs(mb)
      self.prompt_runtime.worker(0).submit(api.Step(
          "prefill", mb.mb_id, 0, tokens, positions, len(mb.requests), mb.prompt_bucket_len,
          ready, self.prompt_epoch))

  def _prompts_computing(self) -> int:
    """Microbatches in the prompt pipeline (prefill not finished)."""
    return sum(not p.first_token for p in self._prompt.values())

  def _prefill_inputs(self, mb: Microbatch):
    bucket = bucket_length(mb.prompt_bucket_len, self.serve_cfg.max_len)
    prompts = [r.prompt for r in mb.requests] + [[self.cfg.pad_token_id]] * (
        mb.batch - len(mb.requests))
    tokens, positions = pad_prompts(prompts, bucket, self.cfg.pad_token_id)
    positions[len(mb.requests):] = -1
    return tokens, positions

  def _on_prompt_event(self, sched: Scheduler, ev) -> int:
    if isinstance(ev, api.Heartbeat):
      self.prompt_controller.beat(ev.stage, ev.worker_id, ev.t)
    elif isinstance(ev, api.Progress):
      self._last_progress = time.perf_counter()
    elif isinstance(ev, api.StepResult):
      p = self._prompt.get(ev.mb_id)
      if ev.epoch == self.prompt_epoch and p is not None and not p.first_token:
        self._last_progress = time.perf_counter()
        return self._on_prompt_result(sched, p, ev)
    elif isinstance(ev, api.StepError):
      if ev.epoch == self.prompt_epoch and ev.mb_id in self._prompt:
        raise RuntimeError(f"prompt stage {ev.stage} failed on microbatch {ev.mb_id}: "
                           f"{ev.error!r}") from ev.error
    return 0

  def _on_prompt_result(self, sched: Scheduler, p: _PromptPhase, res: api.StepResult) -> int:
    mb, sc = p.mb, self.serve_cfg
    if sc.temperature == 0.0:
      toks = np.asarray(res.logits).argmax(axis=-1).astype(np.int32)
    else:
      key = jax.random.fold_in(jax.random.fold_in(self._key, mb.mb_id), mb.step)
      toks = np.asarray(sample(res.logits, key, sc.temperature, sc.top_k, sc.top_p))
    finished = len(sched.on_tokens(mb, toks, sc.eos_token_id, res.done_at - self._t0))
    p.first_token, p.done_at = True, res.done_at
    self._released_at = max(self._released_at, res.done_at)   # room in the prompt pipeline
    if mb.complete:   # every row ended with its first token: it never enters the token side
      self._drop_prompt(sched, mb.mb_id, requeue=None)
    elif len(p.landed) == self.Dt:
      self._ready.append(mb.mb_id)
    return finished

  def _on_landed(self, ev: PromptLanded) -> None:
    p = self._prompt.get(ev.mb_id)
    if p is None or self.controller.current(ev.stage) != ev.worker_id:
      return
    p.landed.add(ev.stage)
    if len(p.landed) == self.Dt and p.first_token:
      self._ready.append(ev.mb_id)

  def _drop_prompt(self, sched: Scheduler, mb_id: int, requeue: str | None) -> int:
    """Takes a prompt-phase microbatch out: frees its slots (in each token worker's inbox order)
    and either finishes it (requeue None) or puts its requests back at the queue's front."""
    p = self._prompt.pop(mb_id)
    if mb_id in self._ready:
      self._ready.remove(mb_id)
    for s in range(self.Dt):
      if self.runtime.alive(s):
        self.runtime.worker(s).free(mb_id)
    sched.in_flight[mb_id] = p.mb   # the scheduler's slot goes back through release/requeue
    if requeue is None:
      sched.release(p.mb)
      return 0
    return sched.requeue(p.mb, requeue)

  def _enter_token_side(self, sched: Scheduler) -> None:
    """Microbatch injection into the token pipeline (module doc, step 4)."""
    while self._ready and len(sched.in_flight) < self.Dt:
      mb_id = self._ready.popleft()
      p = self._prompt.pop(mb_id)
      sched.in_flight[mb_id] = p.mb
      ready = max(p.done_at, self._token_free_at)
      for s in range(self.Dt):
        self.runtime.worker(s).load_prompt(mb_id, self.epoch, ready,
                                           self._load_s(s, p.mb))
      self._send_decode(sched, p.mb, ready)

  def _load_s(self, stage: int, mb: Microbatch) -> float:
    """Paced: modeled seconds of token stage `stage`'s host-to-device load of `mb`'s prompt
    cache over the cost model's host link (0 when real, or with no host link)."""
    if self._host_link is None:
      return 0.0
    cost = self._cost
    layers = round(self.plan.layers(stage) * cost.model.num_layers / self.cfg.num_layers)
    tokens = modeled_prompt_len(cost, mb.prompt_bucket_len)
    return cm.swap_in_time(self._host_link, cost.model, layers, mb.batch, tokens) * self._scale

  # ---- events (both sides arrive here; the token side's are the baseline's) ----
  def _on_event(self, sched: Scheduler, ev) -> int:
    if isinstance(ev, FromPrompt):
      return self._on_prompt_event(sched, ev.event)
    if isinstance(ev, PromptLanded):
      self._on_landed(ev)
      return 0
    if isinstance(ev, SlotFreed):
      if self.controller.current(ev.stage) == ev.worker_id:
        held = self._holders.get(ev.mb_id)
        if held is not None:
          held.discard(ev.stage)
          if not held:
            del self._holders[ev.mb_id]
      return 0
    return super()._on_event(sched, ev)

  def _on_result(self, sched: Scheduler, res: api.StepResult) -> int:
    mb = sched.in_flight[res.mb_id]
    n = super()._on_result(sched, res)
    if mb.mb_id not in sched.in_flight:   # it finished: its token buffers are free
      self._token_free_at = max(self._token_free_at, res.done_at)
      self._released_at = max(self._released_at, res.done_at)
    return n

  # ---- failures ----
  def _side(self, stage: int):
    if stage < self.Dp:
      return self.prompt_runtime, stage
    return self.runtime, stage - self.Dp

  def _inject(self, f: FailureSpec, now) -> None:
    rt, s = self._side(f.stage)
    if rt is self.runtime:
      self._killed[s] = now()
    else:
      self._prompt_killed = getattr(self, "_prompt_killed", {})
      self._prompt_killed[s] = now()
    if f.kind == "crash":
      rt.kill(s)
    else:
      rt.stall(s, f.stall_s)

  def _recover(self, sched: Scheduler, dead: list[int], killed: dict, now) -> RecoveryEvent:
    """The baseline's token-side recovery, then: prompts waiting in host slots of a dead token
    worker are redone (their slots there are gone)."""
    dead_all = sorted(set(dead) | {s for s in range(self.Dt) if not self.runtime.alive(s)})
    event = super()._recover(sched, dead_all, killed, now)
    lost = set(dead_all)
    for held in self._holders.values():   # a replacement starts with every slot free
      held -= lost
    self._holders = {m: h for m, h in self._holders.items() if h}
    # Every prompt-phase microbatch held a slot on the dead worker: its prompt is redone.
    waiting = list(self._prompt)
    event.lost_requests += sum(self._unfinished(m) for m in waiting)
    event.lost_microbatches += len(waiting)
    if waiting:
      event.handled_by = {**event.handled_by, "redo prompts": len(waiting)}
    event.recomputed_tokens += sum(self._drop_prompt(sched, m, requeue="restart")
                                   for m in waiting)
    return event

  def _unfinished(self, mb_id: int) -> int:
    mb = self._prompt[mb_id].mb
    return int((~mb.done[:len(mb.requests)]).sum())

  def _recover_prompt(self, sched: Scheduler, dead: list[int], now) -> RecoveryEvent:
    """A prompt worker died: replace it and redo every prompt not yet completely landed."""
    detected = now()
    dead = sorted(set(dead) | {s for s in range(self.Dp) if not self.prompt_runtime.alive(s)})
    killed = getattr(self, "_prompt_killed", {})
    for s in dead:   # an armed failure: when the worker crashed by itself, for the report
      t = self.prompt_runtime.died_at(s)
      if s not in killed and t is not None:
        killed[s] = t - self._t0
    self.prompt_epoch += 1
    for s in range(self.Dp):
      self.prompt_runtime.worker(s).set_epoch(self.prompt_epoch)
    for s in dead:
      w = self.prompt_runtime.replace(s)
      w.set_epoch(self.prompt_epoch)
      self.prompt_controller.watch(s, w.worker_id)
    # A prompt whose first token never came is redone even if its cache landed: streaming layer
    # by layer, a stage that dies after its last layer streamed still never hands its output on.
    lost = [m for m, p in self._prompt.items()
            if len(p.landed) < self.Dt or not p.first_token]
    lost_requests = sum(self._unfinished(m) for m in lost)
    recomputed = sum(self._drop_prompt(sched, m, requeue="restart") for m in lost)
    self._released_at = time.perf_counter()
    return RecoveryEvent(
        stage=dead[0], strategy="redo prompts",
        failed_at=min(killed.pop(s, detected) for s in dead), detected_at=detected,
        recovered_at=now(), lost_microbatches=len(lost),
        lost_requests=lost_requests,
        recomputed_tokens=recomputed, restored_microbatches=0, stages=tuple(dead),
        handled_by={"redo prompts": len(lost)})
