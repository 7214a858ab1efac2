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
"""

from __future__ import annotations

import dataclasses
import math


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
