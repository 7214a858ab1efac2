"""Recovery strategies as plans: what happens to the work in flight when workers die.

A `RecoveryStrategy` never touches the engine. It may
  * ask every worker to run something beside its steps (`options`: replication, snapshots),
  * `observe` the runtime's events (acknowledged replicas, saved snapshots),
  * on a failure, `plan(view) -> RecoveryPlan` for the microbatches it can handle: `Resume`
    (restore the dead stages' caches of a microbatch from a `CacheSource`; the microbatch
    continues with step r + 1) or a requeue ("restart" from the prompt, or "continue": prompt +
    tokens so far); `handled_by` names the strategy of each microbatch it covers, and `resync`
    the live stages that must re-send the replicas they hold to a replaced ring successor.
`Chain` is a strategy too: its plan covers every microbatch of the view exactly once, each by
the first strategy of the chain (not named in `view.exclude`) that can. The engine executes the
plan (replaces the dead workers, loads caches, rewinds or requeues in the scheduler); when a
cache load fails it asks the chain again for those microbatches with the failed strategy's name
added to `exclude`. Fallback is composition: `"replica,snapshot,reprefill"` tries the ring
successor's replica, then the last orbax snapshot, then re-prefills. A chain that does not end
in a strategy that handles everything (restart or reprefill) gets `restart` appended.

  restart       DéjàVu's baseline: every unfinished in-flight request starts again from its
                prompt.
  reprefill     each unfinished request is requeued as its continuation (prompt + tokens so
                far): one prompt step per microbatch is redone. The rebuilt keys/values come from
                a prefill instead of step-by-step decoding (another summation order): tokens
                match the uninterrupted run except at near-ties.
  replica       DéjàVu: restore the dead stage's caches from the replica its ring successor
                (`ring_holder`) holds, as of the last acknowledged step; needs the holder alive.
  snapshot      restore from the last complete orbax snapshot of the dead stage's caches, taken
                every `every` steps of each worker.
  redo prompts  (`RedoPrompts`, disaggregation) prompts whose cache had not reached the token
                workers, because a prompt worker died or because the token worker holding their
                host slot died, are redone from the prompt.

A restored cache may hold one step more than the pipeline completed (the dead stage ran step
r + 1 and replicated or snapshotted it before the step's token came back): it is used as is and
the microbatch resumes after step r; re-running step r + 1 rewrites that step's entries with the
same values, and attention never reads a position ahead of the one being decoded.

Add a strategy: a class with `name`, `options()`, `observe(event)`, `forget(view)`,
`retire(mb_id)` (the microbatch left the pipeline: drop what is kept for it) and
`plan(view) -> RecoveryPlan`, registered in STRATEGIES.
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Protocol, Sequence

from dejavu_jax.runtime.api import (Ack, ReplicaSource, SnapshotSaved, SnapshotSource,
                                    WorkerOptions, ring_holder)

__all__ = ["Chain", "FailureView", "RecoveryPlan", "RecoveryStrategy", "RedoPrompts", "Replica",
           "Reprefill", "Restart", "Resume", "Snapshot", "STRATEGIES", "get_strategy",
           "ring_holder"]


@dataclasses.dataclass(frozen=True)
class FailureView:
  """What a strategy may know of a failure."""
  dead: tuple[int, ...]            # stages whose workers died (already being replaced)
  num_stages: int
  completed: dict                  # mb_id -> steps the microbatch completed (0: prefill not done)
  exclude: frozenset = frozenset()  # strategies whose cache loads already failed for these


@dataclasses.dataclass
class Resume:
  mb_id: int
  step: int                        # the microbatch continues with step + 1
  sources: dict                    # dead stage -> CacheSource (holding step `step` or one more)
  by: str = ""                     # the strategy that planned it


@dataclasses.dataclass
class RecoveryPlan:
  resume: list = dataclasses.field(default_factory=list)       # [Resume]
  requeue: dict = dataclasses.field(default_factory=dict)      # mb_id -> "restart"|"continue"
  handled_by: dict = dataclasses.field(default_factory=dict)   # mb_id -> strategy name
  resync: tuple = ()               # live stages that re-send their replicas to a replaced holder

  def covers(self) -> set:
    return {r.mb_id for r in self.resume} | set(self.requeue)


def _by(name: str, plan: RecoveryPlan) -> RecoveryPlan:
  """`plan` with every microbatch it covers attributed to strategy `name`."""
  for r in plan.resume:
    r.by = name
  plan.handled_by = {mb: name for mb in plan.covers()}
  return plan


class RecoveryStrategy(Protocol):
  name: str

  def options(self) -> WorkerOptions: ...
  def observe(self, event) -> None: ...
  def forget(self, view: FailureView) -> None: ...
  def retire(self, mb_id: int) -> None: ...
  def plan(self, view: FailureView) -> RecoveryPlan: ...


class _Requeue:
  """Strategies that handle everything by requeueing (restart, reprefill)."""
  name = ""
  mode = ""

  def options(self) -> WorkerOptions:
    return WorkerOptions()

  def observe(self, event) -> None:
    pass

  def forget(self, view: FailureView) -> None:
    pass

  def retire(self, mb_id: int) -> None:
    pass

  def plan(self, view: FailureView) -> RecoveryPlan:
    return _by(self.name, RecoveryPlan(requeue={mb: self.mode for mb in view.completed}))


class Restart(_Requeue):
  name, mode = "restart", "restart"


class Reprefill(_Requeue):
  name, mode = "reprefill", "continue"


class RedoPrompts(_Requeue):
  """Disaggregation: the microbatches of the view had not entered the token pipeline (their
  prompt cache was still streaming, or waiting in a host slot that died); they are redone from
  the prompt. Also what a chain's prompt path runs when a prompt worker dies."""
  name, mode = "redo prompts", "restart"


class Replica:
  """Resume from the successor's replica at the last acknowledged step (see module doc)."""
  name = "replica"

  def __init__(self):
    self._acked: dict[tuple[int, int], int] = {}   # (stage, mb_id) -> step, from Ack events

  def options(self) -> WorkerOptions:
    return WorkerOptions(replicate=True)

  def observe(self, event) -> None:
    if isinstance(event, Ack):
      self._acked[(event.stage, event.mb_id)] = event.step

  def forget(self, view: FailureView) -> None:
    # What the dead workers held is gone: stage s's replica lived on (s + 1) mod D. (The dead
    # stages' own acks stay: their replicas, on live successors, are what `plan` restores.)
    dead = set(view.dead)
    self._acked = {(s, mb): st for (s, mb), st in self._acked.items()
                   if ring_holder(s, view.num_stages) not in dead}

  def retire(self, mb_id: int) -> None:
    # One entry per (stage, microbatch): without this the table grows for the whole run.
    self._acked = {k: v for k, v in self._acked.items() if k[1] != mb_id}

  def plan(self, view: FailureView) -> RecoveryPlan:
    plan = RecoveryPlan()
    if view.num_stages < 2:
      return plan   # the replica of a 1-stage pipeline lived on the dead worker itself
    dead = set(view.dead)
    for mb, completed in view.completed.items():
      if completed < 1:
        continue   # its prompt step had not finished: nothing to resume from
      steps, sources = [completed - 1], {}
      for s in view.dead:
        holder = ring_holder(s, view.num_stages)
        acked = self._acked.get((s, mb))
        if holder in dead or acked is None:
          break
        steps.append(acked)
        sources[s] = ReplicaSource(holder, acked)   # what landed; may be one step ahead
      else:
        plan.resume.append(Resume(mb, min(steps), sources))
    return _by(self.name, plan)


class Snapshot:
  """Resume from the last complete orbax snapshot of each dead stage (see module doc)."""
  name = "snapshot"

  def __init__(self, directory: str | None = None, every: int = 8):
    if every < 1:
      raise ValueError(f"snapshot_every must be >= 1, got {every}")
    self._tmp = None
    if directory is None:
      self._tmp = tempfile.TemporaryDirectory(prefix="dejavu-snapshots-")
      directory = self._tmp.name
    self.directory, self.every = directory, every
    self._latest: dict[int, tuple[str, int, dict]] = {}   # stage -> (path, id, mb_id -> step)

  def options(self) -> WorkerOptions:
    return WorkerOptions(snapshot_dir=self.directory, snapshot_every=self.every)

  def observe(self, event) -> None:
    if isinstance(event, SnapshotSaved):
      # Events of one stage arrive in the order its workers completed the snapshots.
      self._latest[event.stage] = (event.directory, event.snapshot_id, dict(event.steps))

  def forget(self, view: FailureView) -> None:
    pass   # snapshots live on disk: a dead worker's snapshots survive it

  def retire(self, mb_id: int) -> None:
    pass   # only the latest snapshot per stage is kept: bounded already

  def plan(self, view: FailureView) -> RecoveryPlan:
    plan = RecoveryPlan()
    for mb, completed in view.completed.items():
      if completed < 1:
        continue
      steps, ids = [completed - 1], {}
      for s in view.dead:
        snap = self._latest.get(s)
        if snap is None or mb not in snap[2]:
          break
        steps.append(snap[2][mb])
        ids[s] = snap[:2]
      else:
        r = min(steps)
        plan.resume.append(Resume(mb, r, {s: SnapshotSource(path, sid, r)
                                          for s, (path, sid) in ids.items()}))
    return _by(self.name, plan)


STRATEGIES = {"restart": Restart, "reprefill": Reprefill, "replica": Replica,
              "snapshot": Snapshot}
_TERMINAL = ("restart", "reprefill")


class Chain:
  """Strategies tried in order (see module doc); a `RecoveryStrategy` itself."""

  def __init__(self, strategies: Sequence):
    if not strategies:
      raise ValueError("a recovery chain needs at least one strategy")
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
      raise ValueError(f"recovery chain {names} names a strategy twice")
    for s in strategies[:-1]:
      if s.name in _TERMINAL:
        raise ValueError(f"recovery chain {names}: {s.name!r} handles everything, so the "
                         "strategies after it would never run")
    if strategies[-1].name not in _TERMINAL:
      strategies = list(strategies) + [Restart()]
    self.strategies = list(strategies)
    self.name = ",".join(s.name for s in self.strategies)

  def options(self) -> WorkerOptions:
    opts = WorkerOptions()
    for s in self.strategies:
      o = s.options()
      opts = dataclasses.replace(
          opts, replicate=opts.replicate or o.replicate,
          snapshot_dir=opts.snapshot_dir or o.snapshot_dir,
          snapshot_every=opts.snapshot_every or o.snapshot_every)
    return opts

  def observe(self, event) -> None:
    for s in self.strategies:
      s.observe(event)

  def forget(self, view: FailureView) -> None:
    for s in self.strategies:
      s.forget(view)

  def retire(self, mb_id: int) -> None:
    for s in self.strategies:
      s.retire(mb_id)

  def plan(self, view: FailureView) -> RecoveryPlan:
    """One plan covering every microbatch of `view` exactly once, each by the first strategy
    not in `view.exclude` that handles it (a microbatch no strategy handles is restarted)."""
    out, left = RecoveryPlan(), dict(view.completed)
    for strategy in self.strategies:
      if not left:
        break
      if strategy.name in view.exclude:
        continue
      plan = strategy.plan(dataclasses.replace(view, completed=dict(left)))
      for r in plan.resume:
        if r.mb_id in left:
          del left[r.mb_id]
          r.by = strategy.name
          out.resume.append(r)
          out.handled_by[r.mb_id] = strategy.name
      for mb, mode in plan.requeue.items():
        if mb in left:
          del left[mb]
          out.requeue[mb] = mode
          out.handled_by[mb] = strategy.name
    if left:   # every strategy that could was excluded: the baseline takes the rest
      out.requeue.update({mb: "restart" for mb in left})
      out.handled_by.update({mb: Restart.name for mb in left})
    out.resync = self.resync(view)
    return out

  def resync(self, view: FailureView) -> tuple[int, ...]:
    """With replication, the live stages whose ring holder died: they re-send the replicas of
    their caches to the replacement (a dead stage's own replicas are rebuilt from its restored
    caches when they are installed)."""
    d = view.num_stages
    if d < 2 or not self.options().replicate:
      return ()
    dead = set(view.dead)
    return tuple(s for s in range(d) if s not in dead and ring_holder(s, d) in dead)


def get_strategy(spec, snapshot_dir: str | None = None, snapshot_every: int = 8) -> Chain:
  """A chain from "replica", "replica,snapshot,reprefill" or a sequence of names."""
  names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
  out = []
  for n in names:
    if n not in STRATEGIES:
      raise ValueError(f"unknown recovery strategy {n!r}; available: {sorted(STRATEGIES)} "
                       "(chain them with commas, e.g. 'replica,snapshot,reprefill')")
    out.append(Snapshot(snapshot_dir, snapshot_every) if n == "snapshot" else STRATEGIES[n]())
  return Chain(out)
