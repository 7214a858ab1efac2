"""Failure injection: what can go wrong, when, and how the runtime is told to make it happen.

A `FailureSpec` names a stage and one trigger:
  time_s            seconds after serving starts (the engine's clock);
  after_steps       right after that many more steps of the stage's worker (counted from when the
                    spec is armed, at the start of `serve`): "fail at (stage, step)", independent
                    of timing, so randomized campaigns are reproducible;
  during_recovery   when the engine's next recovery starts loading caches: a failure of a
                    survivor (e.g. the holder of the replica being restored) in the middle of a
                    recovery;
  after_snapshots   right after every stage has announced that many complete snapshots since
                    serving started (the pipeline's n-th checkpoint): the snapshot strategy's best
                    case, independent of how long a save takes on a loaded machine. Specs with the
                    same n fire together, at one event.
and a kind:
  crash             the worker dies at once (runtime `kill`): its caches, replicas and queued
                    work are lost; detected by heartbeat silence;
  stall             the worker lives and heartbeats but makes no progress for `stall_s` seconds;
                    detected by the engine's progress watchdog (`ServeConfig.progress_timeout_s`),
                    which then kills and replaces it like a crash.
Adjacent or close failures are several specs. A transport failure mid-stream is
`LocalRuntime.inject_link_fault(stage, predicate)` (replication transfers fail where the
predicate holds).

`Injector` carries out one serve's specs on the runtimes (the engine loop only calls it: at each
turn, on each snapshot event, when a recovery starts) and remembers when each failure began, for
the recovery's timeline.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class FailureSpec:
  time_s: float | None = None       # seconds after serving starts
  stage: int = 0                    # which stage's worker fails
  after_steps: int | None = None    # ... or after this many more steps of that worker
  during_recovery: bool = False     # ... or when the next recovery starts loading caches
  after_snapshots: int | None = None   # ... or right after the pipeline's n-th complete snapshot
  kind: str = "crash"               # "crash" | "stall"
  stall_s: float = 0.0              # how long a stall lasts

  def __post_init__(self):
    triggers = [self.time_s is not None, self.after_steps is not None, self.during_recovery,
                self.after_snapshots is not None]
    if sum(triggers) != 1:
      raise ValueError(f"failure of stage {self.stage}: give exactly one of time_s, after_steps, "
                       "during_recovery, after_snapshots")
    if self.time_s is not None and (isinstance(self.time_s, bool) or
                                    not isinstance(self.time_s, (int, float)) or
                                    not math.isfinite(self.time_s) or self.time_s < 0):
      raise ValueError(f"FailureSpec time_s must be a finite number >= 0, got {self.time_s!r}")
    if self.after_steps is not None and (not isinstance(self.after_steps, int) or
                                         self.after_steps < 0):
      raise ValueError(f"failure after_steps must be an int >= 0, got {self.after_steps!r}")
    if self.after_snapshots is not None and (isinstance(self.after_snapshots, bool) or
                                             not isinstance(self.after_snapshots, int) or
                                             self.after_snapshots < 1):
      raise ValueError(f"failure after_snapshots must be an int >= 1, got "
                       f"{self.after_snapshots!r}")
    if isinstance(self.stage, bool) or not isinstance(self.stage, int) or self.stage < 0:
      raise ValueError(f"FailureSpec stage must be an integer >= 0, got {self.stage!r}")
    if self.kind not in ("crash", "stall"):
      raise ValueError(f"unknown failure kind {self.kind!r}; expected 'crash' or 'stall'")
    if self.kind == "stall" and not (math.isfinite(self.stall_s) and self.stall_s > 0):
      raise ValueError(f"a stall needs stall_s > 0, got {self.stall_s!r}")

  def describe(self) -> str:
    when = (f"at {self.time_s:g} s" if self.time_s is not None else
            f"after {self.after_steps} steps" if self.after_steps is not None else
            f"after snapshot {self.after_snapshots}" if self.after_snapshots is not None else
            "during a recovery")
    what = "crash" if self.kind == "crash" else f"stall {self.stall_s:g} s"
    return f"stage {self.stage} {what} {when}"


class Injector:
  """One serve's failures (module doc), on the clock `now()` (seconds since serving started).

  `locate(stage)` maps a spec's stage to (side, runtime, stage on that runtime): one side for a
  pipeline; a disaggregated deployment numbers its prompt stages first. Killed-at times are kept
  per (side, stage) until the recovery of that stage takes them (`failed_at`).
  """

  def __init__(self, failures: Sequence[FailureSpec], locate: Callable, now: Callable[[], float],
               t0: float):
    self._locate, self._now, self._t0 = locate, now, t0
    self._timed = sorted((f for f in failures if f.time_s is not None), key=lambda f: f.time_s)
    self._during = [f for f in failures if f.during_recovery]
    self._on_snapshot = sorted((f for f in failures if f.after_snapshots is not None),
                               key=lambda f: f.after_snapshots)
    self._snapshots: dict[int, int] = {}
    self._killed: dict[tuple[str, int], float] = {}
    for f in failures:
      side, rt, s = locate(f.stage)
      if f.after_steps == 0:
        self._timed.insert(0, dataclasses.replace(f, time_s=0.0, after_steps=None))
      elif f.after_steps is not None:
        rt.arm(s, f.after_steps, f.kind, f.stall_s)

  def watch_snapshots(self, stages: int) -> None:
    """Snapshot-triggered specs count complete snapshots of `stages` stages."""
    self._snapshots = {s: 0 for s in range(stages)}

  def fire(self, f: FailureSpec) -> None:
    side, rt, s = self._locate(f.stage)
    self._killed[(side, s)] = self._now()   # when the failure began (a stall is caught later)
    if f.kind == "crash":
      rt.kill(s)
    else:
      rt.stall(s, f.stall_s)

  def fire_due(self) -> None:
    """Fires the timed specs whose time has come."""
    while self._timed and self._timed[0].time_s <= self._now():
      self.fire(self._timed.pop(0))

  def next_time(self) -> float | None:
    """When the next timed spec fires (seconds since serving started), or None."""
    return self._timed[0].time_s if self._timed else None

  def on_snapshot(self, stage: int) -> None:
    """Stage `stage` announced a complete snapshot: fires the specs whose count every stage
    reached."""
    self._snapshots[stage] = self._snapshots.get(stage, 0) + 1
    rounds = min(self._snapshots.values())
    while self._on_snapshot and self._on_snapshot[0].after_snapshots <= rounds:
      self.fire(self._on_snapshot.pop(0))

  def on_recovery(self) -> None:
    """A recovery starts loading caches: fires the during-recovery specs."""
    while self._during:
      self.fire(self._during.pop(0))

  def killed(self, side: str, stage: int) -> None:
    """The engine killed `stage` (a stall the watchdog caught): it failed now, unless an
    injected failure began earlier."""
    self._killed.setdefault((side, stage), self._now())

  def failed_at(self, side: str, stages: Sequence[int], runtime, detected: float) -> float:
    """When the failure of `stages` began: injected, or when a worker crashed by itself (an
    armed failure), else when it was detected."""
    times = []
    for s in stages:
      t = self._killed.pop((side, s), None)
      if t is None:
        died = runtime.died_at(s)
        t = died - self._t0 if died is not None else detected
      times.append(t)
    return min(times)
