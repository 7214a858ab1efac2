"""PipelineEngine: the paper's baseline server (pipeline parallelism with microbatch injection).

It wires the pieces together: a `StagePlan` on a ('stage', 'tensor') mesh, one `StageProgram`
and one `StageWorker` thread per stage (pipeline/worker.py walks through the threads and queues),
the FIFO `Scheduler`, sampling, and per-request metrics. `serve` runs an open-loop workload:
requests are admitted when their arrival time comes, whether or not the pipeline is busy.

Bad requests (empty, token ids outside the vocabulary, prompt + new tokens longer than the
context) are rejected one by one with a message naming the problem; every request admitted before
or after them still finishes.

Failures: `serve(..., failures=[FailureSpec(t, s)])` kills stage s's worker at time t. The
controller notices the heartbeat silence, the engine replaces the worker (weights from host
memory, or from an orbax checkpoint when `params_checkpoint` is given), drops the lost
microbatches' queued steps (epoch), and the configured recovery strategy resubmits their requests.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from typing import Callable, Sequence

import jax
import numpy as np

from dejavu_jax.config import ModelConfig, ServeConfig
from dejavu_jax.fault.controller import Controller, FailureSpec, RecoveryEvent
from dejavu_jax.fault.recovery import get_strategy
from dejavu_jax.fault.replication import Replicator, recover_from_replicas
from dejavu_jax.models.checkpoint import restore_params
from dejavu_jax.models.decoder import param_shapes
from dejavu_jax.models.generate import bucket_length, pad_prompts, sample, validate_prompts
from dejavu_jax.pipeline.plan import make_mesh, plan_stages
from dejavu_jax.pipeline.scheduler import Microbatch, Scheduler
from dejavu_jax.pipeline.stage import StageProgram
from dejavu_jax.pipeline.worker import StepError, StageWorker, StepMsg, StepResult
from dejavu_jax.serving import metrics as metrics_lib
from dejavu_jax.serving.pacing import make_pace_fn
from dejavu_jax.serving.workload import Request


@dataclasses.dataclass
class ServeResult:
  records: list                    # metrics.RequestRecord per served request, by request id
  rejected: dict                   # request_id -> reason
  summary: dict
  wall_s: float
  stage_busy_s: list
  recoveries: list = dataclasses.field(default_factory=list)   # RecoveryEvent per failure

  def tokens(self) -> dict[int, list[int]]:
    return {r.request_id: list(r.tokens) for r in self.records}


class PipelineEngine:
  """A D-stage pipeline serving requests; use as a context manager (or call close())."""

  def __init__(self, cfg: ModelConfig, params, serve: ServeConfig, cost_model=None,
               devices: Sequence | None = None, time_scale: float = 1.0,
               params_checkpoint: str | None = None):
    self.cfg, self.serve_cfg = cfg, serve
    self.recover = get_strategy(serve.recovery)
    self.controller = Controller(serve.heartbeat_timeout_s)
    self.params_checkpoint = params_checkpoint
    self.epoch = 0
    devices = jax.devices() if devices is None else list(devices)
    self.plan = plan_stages(cfg, serve.num_stages, serve.stage_ranges, serve.tensor,
                            num_devices=len(devices))
    if serve.max_len > cfg.max_positions:
      raise ValueError(f"max_len {serve.max_len} exceeds the model's {cfg.max_positions} "
                       "positions")
    self.mesh = make_mesh(self.plan, devices)
    self.params = params  # kept: a replacement worker places its stage's subset again
    self.pace = None
    if serve.pacing == "paced":
      if cost_model is None:
        raise ValueError("pacing='paced' needs a cost model")
      self.pace = make_pace_fn(cost_model, self.plan.num_stages, time_scale,
                               cost_model.model.num_layers / cfg.num_layers)
    self.results: queue.Queue = queue.Queue()
    self.programs = [StageProgram(cfg, self.plan, self.mesh, s)
                     for s in range(self.plan.num_stages)]
    # Ring replication runs only for the strategy that needs it (it costs a copy per step).
    self.replicator = Replicator(lambda: self.workers) if serve.recovery == "replica" else None
    self.workers = [self._new_worker(s) for s in range(self.plan.num_stages)]
    self._link()
    for w in self.workers:
      w.start()
    self._key = jax.random.key(serve.seed)

  # ---- workers ----
  def _new_worker(self, s: int, params=None) -> StageWorker:
    w = StageWorker(self.programs[s], self.params if params is None else params,
                    self.plan.num_stages, self.serve_cfg.microbatch_size, self.serve_cfg.max_len,
                    self.results, self.pace, heartbeat_s=self.serve_cfg.heartbeat_s)
    w.min_epoch = self.epoch
    if self.replicator is not None:
      self.replicator.attach(w)
    return w

  def _link(self) -> None:
    for a, b in zip(self.workers[:-1], self.workers[1:]):
      a.next = b

  def replace_worker(self, s: int) -> StageWorker:
    """Stops worker s (if alive) and starts a fresh one for the same stage (empty caches); its
    weights come from the orbax checkpoint when the engine has one, else from host memory."""
    self.workers[s].stop()
    params = None
    if self.params_checkpoint:
      start, stop = self.plan.ranges[s]
      params = restore_params(self.params_checkpoint, like=param_shapes(self.cfg, start, stop))
    self.workers[s] = self._new_worker(s, params)
    self._link()
    return self.workers[s].start()

  def close(self) -> None:
    for w in self.workers:
      w.stop()
    if self.replicator is not None:
      self.replicator.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ---- serving ----
  def validate(self, request: Request) -> str | None:
    """The reason `request` cannot be served, or None."""
    try:
      validate_prompts(self.cfg, [request.prompt], request.max_new_tokens, self.serve_cfg.max_len)
    except ValueError as e:
      return f"request {request.request_id}: " + str(e).replace("prompt 0", "prompt")
    return None

  def warmup(self) -> None:
    """Compiles every stage's prefill for every prompt bucket that fits `max_len`, and the decode
    step, by serving one dummy request per bucket. Call it before a measured or failure-injected
    run: a compile in the middle of serving skews latencies and, holding the GIL, can silence a
    live worker's heartbeat long enough to be declared dead under a tight timeout."""
    limit = self.serve_cfg.max_len - 1   # one new token must fit after the prompt
    n, lengths = 1, []
    while n <= limit:
      lengths.append(n)
      n = bucket_length(n, self.serve_cfg.max_len) + 1   # the first length of the next bucket
    for n in lengths:   # one microbatch per bucket: a microbatch is padded to its longest row
      self.generate([[self.cfg.pad_token_id] * n], 2 if n == 1 else 1)   # n == 1: + decode

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """All prompts arrive at once; returns the generated tokens per prompt (in order)."""
    reqs = [Request(i, 0.0, tuple(p), max_new_tokens) for i, p in enumerate(prompts)]
    result = self.serve(reqs)
    if result.rejected:
      raise ValueError("; ".join(result.rejected.values()))
    toks = result.tokens()
    return [toks[i] for i in range(len(prompts))]

  def serve(self, requests: Sequence[Request],
            progress: Callable[[int, int], None] | None = None,
            failures: Sequence[FailureSpec] = ()) -> ServeResult:
    """Serves an open-loop workload (arrival times in seconds from now), killing workers as
    `failures` say."""
    sc = self.serve_cfg
    for f in failures:
      if not 0 <= f.stage < self.plan.num_stages:
        raise ValueError(f"failure at stage {f.stage}, but the pipeline has stages "
                         f"0..{self.plan.num_stages - 1}")
    failures = sorted(failures, key=lambda f: f.time_s)
    events: list[RecoveryEvent] = []
    killed: dict[int, float] = {}
    sched = Scheduler(self.plan.num_stages, sc.microbatch_size, sc.mode)
    requests = sorted(requests, key=lambda r: (r.arrival, r.request_id))
    records: dict[int, metrics_lib.RequestRecord] = {}
    rejected: dict[int, str] = {}
    # Baselines per worker object: a worker replaced during this run starts from zero.
    busy0 = {id(w): w.busy_s for w in self.workers}
    overruns0 = {id(w): w.overruns for w in self.workers}
    t0 = self._t0 = time.perf_counter()
    now = lambda: time.perf_counter() - t0  # noqa: E731
    # When each slot was last freed (perf_counter): a prefill injected into it is ready then, or
    # when its last request arrived, whichever is later, however late the engine thread wakes.
    self._slot_free_at = {}
    nxt, finished = 0, 0
    last_progress = time.perf_counter()
    while nxt < len(requests) or not sched.idle:
      while failures and failures[0].time_s <= now():
        f = failures.pop(0)
        self.workers[f.stage].kill()
        killed[f.stage] = now()
      dead = self.controller.dead_stages(self.workers)
      if dead:
        events.append(self._recover(sched, records, dead, killed, now))
        last_progress = time.perf_counter()
      while nxt < len(requests) and requests[nxt].arrival <= now():
        req = requests[nxt]
        nxt += 1
        reason = self.validate(req)
        if reason:
          rejected[req.request_id] = reason
          continue
        records[req.request_id] = metrics_lib.RequestRecord(
            request_id=req.request_id, arrival=req.arrival, prompt_len=len(req.prompt))
        sched.admit(req)
      while (mb := sched.inject()) is not None:
        self._send_prefill(mb)
      if not sched.in_flight:
        if nxt < len(requests):
          time.sleep(max(0.0, min(requests[nxt].arrival - now(), 0.05)))
        continue
      wait = 0.05 if nxt >= len(requests) else max(0.0, min(requests[nxt].arrival - now(), 0.05))
      try:
        msg = self.results.get(timeout=max(wait, 1e-4))
      except queue.Empty:
        if time.perf_counter() - last_progress > sc.step_timeout_s:
          beats = [round(time.monotonic() - w.last_heartbeat, 2) for w in self.workers]
          raise TimeoutError(f"no pipeline step finished in {sc.step_timeout_s} s; worker "
                             f"heartbeats: {beats} s ago")
        continue
      last_progress = time.perf_counter()
      if msg.epoch < self.epoch or msg.mb_id not in sched.in_flight:
        continue  # a step of a microbatch lost in a failure
      if isinstance(msg, StepError):
        raise RuntimeError(f"stage {msg.stage} failed on microbatch {msg.mb_id}: "
                           f"{msg.error!r}") from msg.error
      finished += self._on_result(sched, msg, records)
      if progress:
        progress(finished, len(requests))
    wall = now()
    recs = [records[i] for i in sorted(records)]
    summary = metrics_lib.summarize(recs, duration=wall)
    summary["rejected"] = len(rejected)
    if self.pace is not None:  # steps whose real compute outlasted the modeled time
      summary["paced_overruns"] = sum(w.overruns - overruns0.get(id(w), 0) for w in self.workers)
    if events:
      summary["failures"] = len(events)
      summary["mean_recovery_s"] = float(np.mean([e.recovery_s for e in events]))
    return ServeResult(recs, rejected, summary, wall,
                       [w.busy_s - busy0.get(id(w), 0.0) for w in self.workers], events)

  def _recover(self, sched: Scheduler, records, dead: list[int], killed: dict, now):
    detected = now()
    d = self.plan.num_stages
    holder = None
    if self.replicator is not None and len(dead) == 1 and d > 1:
      succ = self.workers[(dead[0] + 1) % d]
      holder = succ if succ.index not in dead and succ.replica_store is not None else None
      self.replicator.streamer.drain(timeout=self.serve_cfg.step_timeout_s)
    self.epoch += 1
    for w in self.workers:
      w.min_epoch = self.epoch
    for s in dead:
      self.replace_worker(s)
    lost = sched.drop_in_flight()
    resumed, dropped = [], 0
    if holder is not None:
      resumed, lost, dropped = recover_from_replicas(self, sched, lost, records, dead[0], holder)
      prev = self.workers[(dead[0] - 1) % d]
      self.replicator.resync(prev, self.workers[dead[0]], {mb.slot: mb.mb_id for mb in resumed})
    for mb in lost:
      self._slot_free_at[mb.slot] = time.perf_counter()
    recomputed = dropped + self.recover(sched, lost, records)
    for mb in resumed:
      sched.resume(mb)
      self._send_decode(sched, mb, time.perf_counter())
    return RecoveryEvent(
        stage=dead[0], strategy=self.serve_cfg.recovery,
        failed_at=min(killed.pop(s, detected) for s in dead), detected_at=detected,
        recovered_at=now(), lost_microbatches=len(lost) + len(resumed),
        lost_requests=sum(int((~mb.done[:len(mb.requests)]).sum()) for mb in lost + resumed),
        recomputed_tokens=recomputed, restored_microbatches=len(resumed))

  def _send_prefill(self, mb: Microbatch) -> None:
    bucket = bucket_length(mb.prompt_bucket_len, self.serve_cfg.max_len)
    prompts = [r.prompt for r in mb.requests] + [[self.cfg.pad_token_id]] * (
        mb.batch - len(mb.requests))
    tokens, positions = pad_prompts(prompts, bucket, self.cfg.pad_token_id)
    positions[len(mb.requests):] = -1  # empty rows write nothing
    ready = max(self._slot_free_at.get(mb.slot, 0.0),
                self._t0 + max(r.arrival for r in mb.requests))
    self.workers[0].put(StepMsg("prefill", mb.slot, mb.mb_id, 0, tokens, positions,
                                len(mb.requests), mb.prompt_bucket_len, ready, self.epoch))

  def _on_result(self, sched: Scheduler, res: StepResult, records) -> int:
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
    was_done = mb.done.copy()
    finished_rows = sched.on_tokens(mb, toks, sc.eos_token_id)
    for i, req in enumerate(mb.requests):
      if was_done[i]:
        continue
      rec = records[req.request_id]
      rec.tokens.append(mb.generated[i][-1])
      rec.token_times.append(t)
      if rec.first_token is None:
        rec.first_token = t
    for i in finished_rows:
      rec = records[mb.requests[i].request_id]
      rec.finish, rec.output_len = t, len(rec.tokens)
    if mb.complete:
      self._slot_free_at[mb.slot] = res.done_at
      sched.release(mb)
      return len(finished_rows)
    self._send_decode(sched, mb, res.done_at)
    return len(finished_rows)

  def _send_decode(self, sched: Scheduler, mb: Microbatch, ready_at: float) -> None:
    """The next decode step of `mb`: each live row's latest token at its next position."""
    positions = sched.advance(mb)
    x = np.array([g[-1] if g and not mb.done[i] else self.cfg.pad_token_id
                  for i, g in enumerate(mb.generated)] +
                 [self.cfg.pad_token_id] * (mb.batch - len(mb.generated)), np.int32)
    live = int((~mb.done).sum())
    # Sampling belongs to the last stage's step: the next step is ready when that one ended.
    self.workers[0].put(StepMsg("decode", mb.slot, mb.mb_id, mb.step, x, positions, live,
                                int(positions.max()), ready_at, self.epoch))
