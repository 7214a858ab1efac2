"""`DisaggregatedPath` (DéjàVu's prompt-token disaggregation): a Dp-stage prompt pipeline of its
own, on devices disjoint from the Dt-stage token pipeline's (runtime/disagg.py: the first
Dp x tensor devices run the prompt stages, the next Dt x tensor the token stages; on Ray each
worker is an actor process with its own devices, runtime/ray.py); their events arrive on one
channel. A microbatch's life:

  1. formed from the queue (FIFO, paper or mixed mode, the baseline's `Scheduler`) when the prompt
     pipeline has fewer than Dp microbatches and every token worker has a free host slot; a slot
     is reserved on each token worker before its prompt starts (flow control: otherwise the
     prompt waits, and so does every request behind it);
  2. its prefill runs through the prompt stages; each stage streams the KV of its layers to the
     token stages that own them (stream.route) into the reserved host slots, layer by layer as
     each is computed (`serve.disagg.layerwise_stream`; else once per stage step);
  3. the last prompt stage's logits give the first token (sampled by the engine, as any token);
  4. when every token worker reported its slot complete (`PromptLanded`) and the token pipeline
     holds fewer than Dt microbatches, it enters the token pipeline (microbatch injection): each
     token worker is told to load it (the host-to-device copy starts at once, overlapping queued
     steps; the slot frees when it landed: `SlotFreed`) and its first decode step is submitted
     behind the loads;
  5. decode steps run as in the baseline until its rows finish.

Failures (`FailureSpec.stage` numbers the prompt stages 0..Dp-1, then the token stages
Dp..Dp+Dt-1). A prompt worker's death (heartbeat silence on the prompt side, which the runtime
does not vouch for, or the runtime's death notice: Ray) replaces it and redoes, by the
`RedoPrompts` strategy, every prompt whose cache had not completely landed or whose first token had not come (the prompt epoch changes: a
prefill still in the prompt pipeline reports nothing); nothing on the token side is touched. A
prompt worker that lives but finishes no prefill for `progress_timeout_s` (a stall) is killed and
recovered the same way (the prompt side's `ProgressWatchdog`). A
token worker's death is the engine's recovery by the configured chain; then the microbatches
still waiting in host slots (every token worker held one for each) are redone by `RedoPrompts`,
reported under its name.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from dejavu_jax import costmodel as cm
from dejavu_jax import runtime as runtime_lib
from dejavu_jax.fault.controller import Controller, ProgressWatchdog, RecoveryEvent
from dejavu_jax.fault.strategies import FailureView, RedoPrompts
from dejavu_jax.pipeline.plan import make_mesh, plan_stages
from dejavu_jax.pipeline.scheduler import Microbatch
from dejavu_jax.runtime import api
from dejavu_jax.serving.disagg_split import check_split, modeled_prompt_len, prompt_pace_fn


@dataclasses.dataclass
class _PromptPhase:
  mb: Microbatch
  injected_at: float
  first_token: bool = False      # the prefill's token was sampled
  done_at: float = 0.0           # perf_counter time the prefill ended (modeled when paced)
  landed: set = dataclasses.field(default_factory=set)   # token stages holding its whole cache


@dataclasses.dataclass
class PromptState:
  """A disaggregated path's share of one serve's state."""
  released_at: float             # modeled time a prompt-side resource was last freed
  token_free_at: float           # modeled time a token-side microbatch last finished
  phases: dict = dataclasses.field(default_factory=dict)    # mb_id -> _PromptPhase
  ready: collections.deque = dataclasses.field(default_factory=collections.deque)
  holders: dict = dataclasses.field(default_factory=dict)   # mb_id -> token stages holding a
                                                            # slot (the path's, across serves)
  watchdog: ProgressWatchdog | None = None   # the prompt pipeline's stalls (alive, no progress)


class DisaggregatedPath:
  """A prompt pipeline streaming into the token workers' host slots (module doc)."""
  token_role = "token"

  def __init__(self, serve):
    if serve.memory.swapping == "on":
      raise ValueError("swapping='on' is not supported with prompt_stages/token_stages (the "
                       "token workers keep their caches on device); use swapping='off'")
    self.prompt_epoch = 0
    self.redo = RedoPrompts()

  # ---- construction ----
  def layout(self, cfg, serve, devices, in_process):
    t = serve.topology.tensor
    self._in_process = in_process
    # Out of process (Ray) every worker actor brings its own devices; the driver needs none.
    n = len(devices) if in_process else max(len(devices), (serve.disagg.prompt_stages or 0) * t +
                                             (serve.disagg.token_stages or 0) * t)
    self.Dp, self.Dt, self.host_slots = check_split(cfg, serve, n)
    self.prompt_plan = plan_stages(cfg, self.Dp, None, t, num_devices=self.Dp * t)
    self._prompt_devices = devices[:self.Dp * t]
    plan = plan_stages(cfg, self.Dt, None, t, num_devices=self.Dt * t)
    return plan, devices[self.Dp * t:(self.Dp + self.Dt) * t]

  def all_ranges(self, plan):
    return list(self.prompt_plan.ranges) + list(plan.ranges)

  def build(self, engine, devices, cost_model, time_scale) -> None:
    if engine.swap_choice.swapping:
      raise ValueError(f"swapping={engine.serve_cfg.memory.swapping!r} chose swapping, which is not "
                       "supported with prompt_stages/token_stages; use swapping='off'")
    sc, cfg = engine.serve_cfg, engine.cfg
    self.programs = []   # Ray: each prompt actor builds its own stage program
    if self._in_process:
      mesh = make_mesh(self.prompt_plan, self._prompt_devices)
      self.programs = [engine.program_class(cfg, self.prompt_plan, mesh, s)
                       for s in range(self.Dp)]
    self._pace = self._host_link = None
    self._cost, self._scale = cost_model, time_scale
    if sc.timing.pacing == "paced":
      scale = cost_model.model.num_layers / cfg.num_layers
      link = cm.LINKS[sc.disagg.stream_link] if sc.disagg.stream_link else None
      link = engine.links.get("prompt_kv", link)   # a measured table wins over the preset
      self._pace = prompt_pace_fn(cost_model, self.Dp, time_scale, scale, link)
      self._host_link = engine.links.get(
          "swap_in", getattr(getattr(cost_model, "hardware", None), "host_link", None))

  def make_runtime(self, engine) -> None:
    sc, plan = engine.serve_cfg, self.prompt_plan
    self.controller = Controller(sc.fault.heartbeat_timeout_s)
    self.runtime = runtime_lib.make(sc, runtime_lib.RuntimeSpec(
        cfg=engine.cfg, ranges=plan.ranges, depth=self.Dp,
        microbatch_size=engine.microbatch_size, max_len=sc.topology.max_len, heartbeat_s=sc.fault.heartbeat_s,
        programs=self.programs, params_for=lambda s: engine.stage_params(plan.ranges[s]),
        params=engine.params, checkpoint=engine.params_checkpoint,
        pace=self._pace, role="prompt", token_runtime=engine.runtime,
        layerwise=sc.disagg.layerwise_stream))

  def start(self, engine) -> None:
    # Token worker slots held, as the engine accounts them: mb_id -> token stages whose worker
    # has not yet reported the slot free (SlotFreed). It outlives a serve: a microbatch dropped
    # at the end of one (every row ended at its first token, or the serve failed) holds its
    # slots until the workers take the `free` queued behind their steps, maybe while the next
    # serve already reserves; forgetting them there made a worker refuse a slot the engine
    # counted free. New token workers (a restart) hold none.
    self.holders: dict = {}
    self.runtime.start(api.WorkerOptions())
    for s in range(self.Dp):
      self.controller.watch(s, self.runtime.worker(s).worker_id)

  def close(self) -> None:
    self.runtime.close()

  def runtimes(self) -> list:
    return [self.runtime]

  def worker_stats(self) -> list[api.WorkerStats]:
    return [self.runtime.worker(s).stats() for s in range(self.Dp)]

  # ---- a serve ----
  def check_failures(self, engine, failures) -> None:
    total = self.Dp + self.Dt
    for f in failures:
      if not 0 <= f.stage < total:
        raise ValueError(f"failure at stage {f.stage}, but the deployment has stages "
                         f"0..{total - 1} (prompt 0..{self.Dp - 1}, token {self.Dp}..{total - 1})")
      if f.after_snapshots is not None:
        raise ValueError(f"{f}: snapshot-triggered failures are not supported with "
                         "disaggregation; use time_s or after_steps")

  def locate(self, engine):
    def side(stage: int):
      if stage < self.Dp:
        return "prompt", self.runtime, stage
      return "token", engine.runtime, stage - self.Dp
    return side

  def scheduler_depth(self, engine) -> int:
    # Every microbatch that can be in the system at once (one per host slot, one per token
    # stage); this path gates injection itself.
    return self.host_slots + self.Dt

  def begin(self, engine, st) -> PromptState:
    watchdog = ProgressWatchdog(self.Dp, engine.serve_cfg.fault.progress_timeout_s)
    return PromptState(released_at=st.t0, token_free_at=st.t0, watchdog=watchdog,
                       holders=self.holders)

  def busy(self, st) -> bool:
    return bool(st.path.phases)

  def slots_free(self, st) -> list[int]:
    del st   # the holdings outlive a serve (`start`)
    return [self.host_slots - sum(s in h for h in self.holders.values()) for s in range(self.Dt)]

  def inject(self, engine, st) -> None:
    """Starts prompts while the prompt pipeline has room and every token worker a free slot,
    then moves landed prompts into the token pipeline."""
    ps, sched = st.path, st.sched
    while (sched.pending and sum(not p.first_token for p in ps.phases.values()) < self.Dp and
           min(self.slots_free(st)) > 0):
      mb = sched.inject()
      if mb is None:
        break
      del sched.in_flight[mb.mb_id]   # in flight on the token side only once it enters there
      for s in range(self.Dt):
        if not engine.runtime.worker(s).reserve_slot(mb.mb_id):
          raise RuntimeError(f"token stage {s} refused a host slot the engine counted free")
      ps.holders[mb.mb_id] = set(range(self.Dt))
      ready = max(ps.released_at, st.t0 + max(r.arrival for r in mb.requests))
      ps.phases[mb.mb_id] = _PromptPhase(mb, time.perf_counter())
      tokens, positions = engine.prefill_inputs(mb)
      ps.watchdog.expect(mb.mb_id)
      self.runtime.worker(0).submit(api.Step(
          "prefill", mb.mb_id, 0, tokens, positions, len(mb.requests), mb.prompt_bucket_len,
          ready, self.prompt_epoch, greedy=engine.greedy))
    while ps.ready and len(sched.in_flight) < self.Dt:   # module doc, step 4
      mb_id = ps.ready.popleft()
      p = ps.phases.pop(mb_id)
      sched.in_flight[mb_id] = p.mb
      ready = max(p.done_at, ps.token_free_at)
      for s in range(self.Dt):
        engine.runtime.worker(s).load_prompt(mb_id, engine.epoch, ready, self._load_s(engine, s,
                                                                                      p.mb))
      engine.send_decode(st, p.mb, ready)

  def _load_s(self, engine, stage: int, mb: Microbatch) -> float:
    """Paced: modeled seconds of token stage `stage`'s host-to-device load of `mb`'s prompt
    cache over the cost model's host link (0 when real, or with no host link)."""
    if self._host_link is None:
      return 0.0
    cost = self._cost
    layers = round(engine.plan.layers(stage) * cost.model.num_layers / engine.cfg.num_layers)
    tokens = modeled_prompt_len(cost, mb.prompt_bucket_len)
    return cm.swap_in_time(self._host_link, cost.model, layers, mb.batch, tokens) * self._scale

  def on_event(self, engine, st, ev) -> int | None:
    """Handles the prompt side's events (None: an event of the token pipeline's own)."""
    ps = st.path
    if isinstance(ev, api.FromPrompt):
      return self._on_prompt_event(engine, st, ev.event)
    if isinstance(ev, api.PromptLanded):
      p = ps.phases.get(ev.mb_id)
      if p is not None and engine.controller.current(ev.stage) == ev.worker_id:
        p.landed.add(ev.stage)
        if len(p.landed) == self.Dt and p.first_token:
          ps.ready.append(ev.mb_id)
      return 0
    if isinstance(ev, api.SlotFreed):
      if engine.controller.current(ev.stage) == ev.worker_id:
        held = ps.holders.get(ev.mb_id)
        if held is not None:
          held.discard(ev.stage)
          if not held:
            del ps.holders[ev.mb_id]
      return 0
    return None

  def _on_prompt_event(self, engine, st, ev) -> int:
    if isinstance(ev, api.Heartbeat):
      self.controller.beat(ev.stage, ev.worker_id, ev.t)
    elif isinstance(ev, api.Progress):
      st.last_progress = time.perf_counter()
      if ev.epoch == self.prompt_epoch and self.controller.current(ev.stage) is not None:
        st.path.watchdog.progress(ev.stage, ev.mb_id)
    elif isinstance(ev, api.StepResult):
      p = st.path.phases.get(ev.mb_id)
      if ev.epoch == self.prompt_epoch and p is not None and not p.first_token:
        st.last_progress = time.perf_counter()
        return self._on_prompt_result(engine, st, p, ev)
    elif isinstance(ev, api.StepError):
      if ev.epoch == self.prompt_epoch and ev.mb_id in st.path.phases:
        raise RuntimeError(f"prompt stage {ev.stage} failed on microbatch {ev.mb_id}: "
                           f"{ev.error!r}") from ev.error
    return 0

  def _on_prompt_result(self, engine, st, p: _PromptPhase, res: api.StepResult) -> int:
    mb, ps = p.mb, st.path
    toks = engine.next_tokens(mb, res)
    finished = len(st.sched.on_tokens(mb, toks, engine.serve_cfg.sampling.eos_token_id,
                                      res.done_at - st.t0))
    p.first_token, p.done_at = True, res.done_at
    ps.released_at = max(ps.released_at, res.done_at)   # room in the prompt pipeline
    if mb.complete:   # every row ended with its first token: it never enters the token side
      self._drop(engine, st, mb.mb_id, requeue=None)
    elif len(p.landed) == self.Dt:
      ps.ready.append(mb.mb_id)
    return finished

  def on_finished(self, st, done_at: float) -> None:
    """A token-side microbatch finished: its token buffers are free."""
    ps = st.path
    ps.token_free_at = max(ps.token_free_at, done_at)
    ps.released_at = max(ps.released_at, done_at)

  def _drop(self, engine, st, mb_id: int, requeue: str | None) -> int:
    """Takes a prompt-phase microbatch out: frees its slots (in each token worker's inbox order)
    and either finishes it (requeue None) or puts its requests back at the queue's front."""
    ps, sched = st.path, st.sched
    p = ps.phases.pop(mb_id)
    if mb_id in ps.ready:
      ps.ready.remove(mb_id)
    for s in range(self.Dt):
      if engine.runtime.alive(s):
        engine.runtime.worker(s).free(mb_id)
    sched.in_flight[mb_id] = p.mb   # the scheduler's slot goes back through release/requeue
    if requeue is None:
      sched.release(p.mb)
      return 0
    return sched.requeue(p.mb, requeue)

  def _redo(self, engine, st, dead, num_stages: int, mb_ids) -> tuple[dict, int, int]:
    """`RedoPrompts`' plan for `mb_ids`, executed: (handled_by counts, lost requests,
    recomputed tokens)."""
    plan = self.redo.plan(FailureView(tuple(dead), num_stages, {m: 0 for m in mb_ids}))
    lost = 0
    for m in plan.requeue:
      mb = st.path.phases[m].mb
      lost += int((~mb.done[:len(mb.requests)]).sum())
    recomputed = sum(self._drop(engine, st, m, requeue=mode) for m, mode in plan.requeue.items())
    return dict(collections.Counter(plan.handled_by.values())), lost, recomputed

  # ---- failures ----
  def after_token_recovery(self, engine, st, dead, event: RecoveryEvent) -> None:
    """Token workers `dead` were replaced with every slot free: the prompts waiting in their
    host slots (every prompt-phase microbatch held one there) are redone."""
    ps, lost = st.path, set(dead)
    event.side = "token"
    for held in ps.holders.values():
      held -= lost
    for m in [m for m, h in ps.holders.items() if not h]:
      del ps.holders[m]
    waiting = list(ps.phases)
    if not waiting:
      return
    handled, lost_requests, recomputed = self._redo(engine, st, dead, self.Dt, waiting)
    event.lost_requests += lost_requests
    event.lost_microbatches += len(waiting)
    event.handled_by = {**event.handled_by, **handled}
    event.recomputed_tokens += recomputed

  def detect_and_recover(self, engine, st) -> RecoveryEvent | None:
    # A prompt worker that heartbeats but finishes no prefill (stalled) holds up every prompt
    # behind it: killed and replaced like a crashed one, as on the token side.
    stalled = st.path.watchdog.stalled()
    for s in stalled:
      self.runtime.kill(s)
      st.injector.killed("prompt", s)
    # Heartbeat silence, or the runtime's word that a worker died (Ray's actor-death notice).
    dead = sorted(set(self.controller.dead_stages(self.runtime.vouches_alive)) |
                  set(self.runtime.notified_dead()) | set(stalled))
    return self._recover(engine, st, dead) if dead else None

  def _recover(self, engine, st, dead: list[int]) -> RecoveryEvent:
    """A prompt worker died: replace it and redo every prompt not yet completely landed."""
    detected = st.now()
    dead = sorted(set(dead) | {s for s in range(self.Dp) if not self.runtime.alive(s)})
    failed_at = st.injector.failed_at("prompt", dead, self.runtime, detected)
    self.prompt_epoch += 1
    for s in range(self.Dp):
      self.runtime.worker(s).set_epoch(self.prompt_epoch)
    for s in dead:
      w = self.runtime.replace(s)
      w.set_epoch(self.prompt_epoch)
      self.controller.watch(s, w.worker_id)
      st.path.watchdog.replaced(s)
    st.path.watchdog.clear()   # every prompt in the prompt pipeline is redone below
    # Injected: a failure while this recovery redoes the prompts (before, a prompt-side
    # during-recovery failure never fired: only the token side's recovery called this).
    st.injector.on_recovery()
    # A prompt whose first token never came is redone even if its cache landed: streaming layer
    # by layer, a stage that dies after its last layer streamed still never hands its output on.
    lost = [m for m, p in st.path.phases.items()
            if len(p.landed) < self.Dt or not p.first_token]
    handled, lost_requests, recomputed = self._redo(engine, st, dead, self.Dp, lost)
    st.path.released_at = time.perf_counter()
    return RecoveryEvent(
        stage=dead[0], strategy=self.redo.name, failed_at=failed_at, detected_at=detected,
        recovered_at=st.now(), lost_microbatches=len(lost), lost_requests=lost_requests,
        recomputed_tokens=recomputed, restored_microbatches=0, stages=tuple(dead),
        handled_by=handled, side="prompt")

  def abandon(self, engine, st) -> None:
    try:
      for mb_id in list(st.path.phases):
        self._drop(engine, st, mb_id, requeue=None)
      self.prompt_epoch += 1
      for s in range(self.Dp):
        self.runtime.worker(s).set_epoch(self.prompt_epoch)
    except Exception:  # pylint: disable=broad-except
      pass   # best effort, as the engine's own cleanup

  def summary(self, engine) -> dict:
    return dict(prompt_stages=self.Dp, token_stages=self.Dt, host_slots=self.host_slots)

  def describe_hang(self, engine, st) -> str:
    return (f"; prompt heartbeats {self.controller.silence()} s ago; host slots free "
            f"{self.slots_free(st)}")
