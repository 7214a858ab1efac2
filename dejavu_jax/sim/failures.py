"""Failures and their recovery in the simulator, planned by the engine's own strategy objects.

The recovery strategy is `fault.strategies.get_strategy(spec)` (chains such as
"replica,snapshot,reprefill" included), fed by the simulated pipeline with modelled events: an
`Ack` when the replication transfer of a stage's step lands on its successor, a `SnapshotSaved`
when a stage's asynchronous snapshot is written (sim/pipeline.py). The simulator executes the
plan the chain returns as the engine does (serving/engine.py `_recover`), with modelled times.

Timeline of a failure of stage s at time T (all pieces reported in the recovery breakdown):
  1. the worker dies: its queue and running step are lost; the other stages go on with what
     they hold until the failure is detected (steps that reach stage s wait in a dead inbox);
  2. detection: heartbeats every `heartbeat_s`; the controller declares the worker dead
     `timeout_s` after its last heartbeat, i.e. at floor(T / heartbeat_s) * heartbeat_s +
     timeout_s. Everything in flight is then dropped, and the chain plans over every dead stage
     with each in-flight microbatch's completed steps;
  3. replacement: a spare worker starts (`replacement_start_s`) and loads the stage's weights
     over `weight_link` (or a fixed `weight_load_s`);
  4. state restore, per the plan:
     - Resume(mb, r, sources): the dead stages' caches as of step r come back from the replica
       on the successor (`replica_link`) or the stage's last complete snapshot (a read over
       `snapshot_link`), stages in parallel; the surviving stages roll back to r; the
       microbatch continues with step r + 1 (its later tokens are generated again);
     - requeue "restart": the microbatch's unfinished requests go back to the front of the queue
       from their prompts (only the lost in-flight requests: the rest of the work goes on);
     - requeue "continue" (reprefill): they go back as continuations (prompt + tokens so far),
       one prefill rebuilds their caches.
     With `restart_scope="job"` the `restart` strategy restarts the whole job instead: every
     stage is replaced and reloads its weights (a serving system without per-stage recovery).
The pipeline is down from detection until the restore ends. A failure detected while a
recovery runs is recovered when that one ends (the engine's recovery blocks its loop).
"""

from __future__ import annotations

import dataclasses
import math

from dejavu_jax import costmodel as cm
from dejavu_jax.fault import strategies as fault_strategies
from dejavu_jax.runtime.api import ReplicaSource, SnapshotSource
from dejavu_jax.sim.engine import EventLoop
from dejavu_jax.sim.pipeline import Pipeline

# The engine's registry: a strategy exists for the simulator iff the engine can run it.
STRATEGIES = tuple(fault_strategies.STRATEGIES)
RESTART_SCOPES = ("requests", "job")
# Snapshots are modelled, never written: the chain only needs a name for where they would live.
_SNAPSHOT_DIR = "sim://snapshots"


def make_strategy(spec: str, snapshot_every: int):
  """The engine's strategy chain for `spec` (raises ValueError naming the known strategies)."""
  return fault_strategies.get_strategy(spec, snapshot_dir=_SNAPSHOT_DIR,
                                       snapshot_every=snapshot_every)


def plan_recovery(strategy, view) -> tuple[list[tuple], dict]:
  """A chain's plan for `view` as ([(mb_id, step, sources, by)], {mb_id: (mode, by)}): the
  engine's `Chain.plan`, each microbatch tagged with the strategy that handled it."""
  plan = strategy.plan(view)
  resumes = [(r.mb_id, r.step, dict(r.sources), r.by) for r in plan.resume]
  requeue = {mb: (mode, plan.handled_by[mb]) for mb, mode in plan.requeue.items()}
  return resumes, requeue


@dataclasses.dataclass(frozen=True)
class Failure:
  """Stage `stage` of pipeline `pipeline` ("main", "main<i>", "prompt" or "token") dies at `time`
  seconds, or (`after_steps`, as the engine's `FailureSpec`) right after its worker computed that
  many steps: placed by step count, independent of timing."""

  time: float | None = None
  stage: int = 0
  pipeline: str = "main"
  after_steps: int | None = None

  def __post_init__(self):
    if (self.time is None) == (self.after_steps is None):
      raise ValueError("a failure needs exactly one of time and after_steps")
    if self.time is not None and not self.time >= 0:
      raise ValueError(f"failure time must be >= 0, got {self.time}")
    if self.after_steps is not None and (isinstance(self.after_steps, bool) or
                                         not isinstance(self.after_steps, int) or
                                         self.after_steps < 0):
      raise ValueError(f"failure after_steps must be an int >= 0, got {self.after_steps!r}")
    if self.stage < 0:
      raise ValueError(f"failure stage must be >= 0, got {self.stage}")


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
  """How failures are detected and recovered (defaults: the paper's controller, 1 s / 3 s).

  `strategy` is any spec of the engine's registry (`STRATEGIES`, chains like
  "replica,snapshot,reprefill"). `weight_link` defaults to a 2 GB/s read of the stage's
  checkpoint from local NVMe; `snapshot_link` to remote storage reached over a 40 Gbps network
  (snapshots are written in the background every `snapshot_every` steps of a worker, as the
  engine's; a restore reads the dead stage's caches back). `restart_scope`: what `restart`
  restarts, "requests" (the engine's: only the lost in-flight requests; "stage" is accepted as
  its old name) or "job" (every stage replaced, weights reloaded).
  """

  strategy: str = "replica"
  heartbeat_s: float = 1.0
  timeout_s: float = 3.0
  replacement_start_s: float = 5.0
  weight_link: cm.Link = cm.Link("nvme", 2e9, 1e-4)
  replica_link: cm.Link = cm.LINKS["inter_vm_40gbps"]
  snapshot_every: int = 10
  snapshot_link: cm.Link = cm.Link("remote_storage", 5e9, 1e-3)
  # A fixed weight-load time instead of the weight_link estimate (None: estimate).
  weight_load_s: float | None = None
  restart_scope: str = "requests"

  def __post_init__(self):
    if self.snapshot_every < 1:
      raise ValueError(f"snapshot_every must be >= 1, got {self.snapshot_every}")
    make_strategy(self.strategy, self.snapshot_every)   # an unknown name fails here
    if self.heartbeat_s <= 0 or self.timeout_s <= 0:
      raise ValueError("heartbeat_s and timeout_s must be > 0")
    if self.replacement_start_s < 0:
      raise ValueError(f"replacement_start_s must be >= 0, got {self.replacement_start_s}")
    if self.weight_load_s is not None and self.weight_load_s < 0:
      raise ValueError(f"weight_load_s must be None or >= 0, got {self.weight_load_s}")
    if self.restart_scope == "stage":
      object.__setattr__(self, "restart_scope", "requests")
    if self.restart_scope not in RESTART_SCOPES:
      raise ValueError(f"restart_scope must be one of {RESTART_SCOPES}, got "
                       f"{self.restart_scope!r}")

  def weight_time(self, model, layers: int) -> float:
    """Seconds to load `layers` layers' weights into a replacement worker."""
    if self.weight_load_s is not None:
      return self.weight_load_s
    return self.weight_link.transfer_time(layers * model.layer_weight_bytes())

  def pipeline_options(self, failures) -> dict:
    """The `Pipeline` keyword arguments the strategy's worker options ask for (replication,
    snapshots); none without failures, so a failure-free run pays for nothing."""
    if not failures:
      return {}
    opts = make_strategy(self.strategy, self.snapshot_every).options()
    return {"replica_link": self.replica_link if opts.replicate else None,
            "snapshot_every": opts.snapshot_every or None, "snapshot_link": self.snapshot_link}


@dataclasses.dataclass
class _Recovery:
  rid: int
  replaced: dict              # stage -> its worker generation when the recovery began
  resumed: list               # [(Microbatch, step, restored stages)]
  requeued: list              # [(Microbatch, mode)]


class FailureManager:
  """Injects `Failure`s into named pipelines and executes the strategy chain's plans."""

  def __init__(self, loop: EventLoop, pipelines: dict[str, Pipeline], config: RecoveryConfig):
    self.loop, self.pipelines, self.config = loop, pipelines, config
    self.recoveries: list[dict] = []
    self.strategies: dict[Pipeline, object] = {}
    for pipe in pipelines.values():
      if pipe not in self.strategies:
        # A prompt pipeline holds nothing worth keeping: its prompts are simply redone.
        spec = "restart" if pipe.name == "prompt" else config.strategy
        chain = self.strategies[pipe] = make_strategy(spec, config.snapshot_every)
        pipe.observe, pipe.on_retire = chain.observe, chain.retire
    self._failed_at: dict[tuple[Pipeline, int], float] = {}
    self._pending: dict[Pipeline, _Recovery] = {}
    self._deferred: set[Pipeline] = set()

  def schedule(self, failures) -> None:
    for f in failures:
      if f.pipeline not in self.pipelines:
        raise ValueError(f"failure names pipeline {f.pipeline!r}; this system has "
                         f"{sorted(self.pipelines)}")
      pipe = self.pipelines[f.pipeline]
      if f.stage >= pipe.num_stages:
        raise ValueError(f"failure stage {f.stage} out of range for the {f.pipeline!r} "
                         f"pipeline of {pipe.num_stages} stages")
      if f.after_steps:
        pipe.arm(f.stage, f.after_steps, lambda p=pipe, s=f.stage: self._fail(p, s))
      else:
        self.loop.at(f.time or 0.0, self._fail, pipe, f.stage)

  def _fail(self, pipe: Pipeline, s: int) -> None:
    if pipe.stages[s].dead:
      return
    now, cfg = self.loop.now, self.config
    pipe.kill(s)
    self._failed_at[(pipe, s)] = now
    self.loop.at(math.floor(now / cfg.heartbeat_s) * cfg.heartbeat_s + cfg.timeout_s,
                 self._detect, pipe)

  def _detect(self, pipe: Pipeline) -> None:
    dead = [s for s, st in enumerate(pipe.stages) if st.dead]
    if not dead:
      return   # recovered already, with an earlier detection
    if pipe in self._pending:
      self._deferred.add(pipe)
      return
    cfg, now, model, layers = self.config, self.loop.now, pipe.model, pipe.layers
    chain = self.strategies[pipe]
    mbs = {mb.mid: mb for mb in pipe.abort()}
    failed_at = min(self._failed_at.pop((pipe, s), now) for s in dead)
    view = fault_strategies.FailureView(tuple(dead), pipe.num_stages,
                                        {mid: mb.done for mid, mb in mbs.items()})
    chain.forget(view)
    spec = "restart" if pipe.name == "prompt" else cfg.strategy
    whole_job = spec == "restart" and cfg.restart_scope == "job"
    if whole_job:
      resumes, requeue = [], {mid: ("restart", "restart") for mid in mbs}
    else:
      resumes, requeue = plan_recovery(chain, view)
    replaced = range(pipe.num_stages) if whole_job else dead
    # The replacements load their weights in parallel.
    weight = max(cfg.weight_time(model, layers[s]) for s in replaced)
    progress = sum(mb.done for mb in mbs.values())
    lost_steps = lost_tokens = 0
    handled: dict[str, int] = {}
    # Per dead stage: each replica is its own load; a snapshot is read once for every
    # microbatch restored from it (the engine's worker keeps the restored snapshot).
    loads: dict[tuple, int] = {}
    resumed = []
    for mid, step, sources, by in resumes:
      mb = mbs[mid]
      handled[by] = handled.get(by, 0) + 1
      lost_steps += mb.done - (step + 1)
      lost_tokens += (mb.done - (step + 1)) * sum(1 for r in mb.requests if not r.done)
      for s, src in sources.items():
        nbytes = cm.kv_bytes(model, layers[s], mb.batch, mb.prompt_len + step)
        if isinstance(src, ReplicaSource):
          key = (s, "replica", mid)
        elif isinstance(src, SnapshotSource):
          key = (s, "snapshot", src.directory, src.snapshot_id)
        else:
          raise TypeError(f"unknown cache source {src!r}")
        loads[key] = loads.get(key, 0) + nbytes
      mb.done, mb.reprefill = step + 1, False
      resumed.append((mb, step, tuple(sources)))
    per_stage = {s: 0.0 for s in dead}
    for key, nbytes in loads.items():
      link = cfg.replica_link if key[1] == "replica" else cfg.snapshot_link
      per_stage[key[0]] += link.transfer_time(nbytes)
    requeued = []
    for mid, (mode, by) in requeue.items():
      mb = mbs[mid]
      handled[by] = handled.get(by, 0) + 1
      if mode == "restart":
        lost_steps += mb.done
        lost_tokens += sum(o + mb.done for r, o in zip(mb.requests, mb.offsets_or_zeros())
                           if not r.done)
      pipe.retire(mb)
      requeued.append((mb, mode))
    restore = max(per_stage.values(), default=0.0)
    detection = now - failed_at
    downtime = detection + cfg.replacement_start_s + weight + restore
    rid = len(self.recoveries)
    self.recoveries.append({
        "time": failed_at, "pipeline": pipe.name, "stage": dead[0], "stages": tuple(dead),
        "strategy": spec, "scope": "job" if whole_job else "requests", "handled_by": handled,
        "detected_at": now, "detection_s": detection, "replacement_s": cfg.replacement_start_s,
        "weight_load_s": weight, "restore_s": restore, "downtime_s": downtime,
        "inflight_microbatches": len(mbs), "progress_steps": progress,
        "lost_steps": lost_steps, "lost_tokens": lost_tokens,
        "restored_microbatches": len(resumed),
    })
    self._pending[pipe] = _Recovery(rid, {s: pipe.stages[s].worker for s in replaced},
                                    resumed, requeued)
    self.loop.at(failed_at + downtime, self._recover, pipe)

  def _recover(self, pipe: Pipeline) -> None:
    rec = self._pending.pop(pipe)
    self.recoveries[rec.rid]["resumed_at"] = self.loop.now
    # A stage that died again while this recovery ran stays dead until its own detection.
    replaced = [s for s, w in rec.replaced.items() if pipe.stages[s].worker == w]
    pipe.restore(replaced, [mb for mb, _, _ in rec.resumed])
    for mb, mode in rec.requeued:
      pipe.hooks.on_requeue(pipe, mb, mode)
    if pipe.replica_link is not None:
      self._resync(pipe, replaced, rec.resumed)
    pipe.hooks.on_up(pipe)
    if pipe in self._deferred:
      self._deferred.discard(pipe)
      self._detect(pipe)

  def _resync(self, pipe: Pipeline, replaced: list[int], resumed: list) -> None:
    """The replicas lost with the dead workers are streamed again, as the engine's workers do:
    a restored cache goes to its successor, and a dead holder's predecessor resends its caches."""
    now, model, d = self.loop.now, pipe.model, pipe.num_stages
    for mb, step, stages in resumed:
      for s in stages:
        pipe.record_ack(s, mb, step, cm.kv_bytes(model, pipe.layers[s], mb.batch,
                                                 mb.prompt_len + step), now)
    for s in replaced:
      p = (s - 1) % d
      if d < 2 or p in replaced:
        continue
      for mb in pipe.inflight:
        step = min(mb.last_at[p], mb.done - 1)
        if step >= 0:
          pipe.record_ack(p, mb, step, cm.kv_bytes(model, pipe.layers[p], mb.batch,
                                                   mb.prompt_len + step), now)
