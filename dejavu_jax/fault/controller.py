"""Failure detection: heartbeats in, dead stages out (`Controller`), stalled stages out
(`ProgressWatchdog`), and what one failure cost (`RecoveryEvent`).

As in the paper, a worker is declared dead after `timeout_s` of heartbeat silence (1 s beats and a
3 s timeout there; configurable here so tests and demos detect failures in a fraction of a
second). Silence alone is not proof on a loaded machine: a worker thread starved of CPU (or an
engine thread that drains the beats late) goes quiet while it lives. So a silent stage is
declared dead only if the runtime does not vouch for it (`Runtime.vouches_alive`: a thread of
this process that has not stopped lives; a remote actor is never vouched for, its silence
decides). A worker that lives but makes no progress (a stall) is the watchdog's: it has a step
waiting and finishes none for `timeout_s`. Failures are injected by `FailureSpec`s
(fault/inject.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from dejavu_jax.fault.inject import FailureSpec  # noqa: F401  (re-exported)


@dataclasses.dataclass
class RecoveryEvent:
  """What one failure cost: the timeline and the work lost."""
  stage: int
  strategy: str
  failed_at: float                  # seconds since serving started
  detected_at: float
  recovered_at: float = 0.0         # replacement running, lost work resubmitted
  lost_microbatches: int = 0
  lost_requests: int = 0
  recomputed_tokens: int = 0        # generated tokens that must be generated again
  restored_microbatches: int = 0    # resumed from restored caches instead of requeued
  stages: tuple = ()                # every stage that died in this failure
  handled_by: dict = dataclasses.field(default_factory=dict)   # strategy -> microbatches
  load_errors: list = dataclasses.field(default_factory=list)  # why a planned restore fell back
  side: str = ""                    # disaggregation: "prompt" or "token" (whose stages died)
  replica: int = 0                  # data parallelism: the replica whose pipeline failed

  @property
  def detection_s(self) -> float:
    return self.detected_at - self.failed_at

  @property
  def recovery_s(self) -> float:
    return self.recovered_at - self.failed_at

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "detection_s": self.detection_s,
            "recovery_s": self.recovery_s}


class Controller:
  """Watches the workers' heartbeats, as they arrive on the runtime's event channel.

  Each stage's current worker is known by id: beats of a replaced (dead) worker are ignored, and
  a new worker gets a full timeout before it can be declared dead.
  """

  def __init__(self, timeout_s: float = 3.0):
    if timeout_s <= 0:
      raise ValueError(f"heartbeat timeout must be > 0, got {timeout_s}")
    self.timeout_s = timeout_s
    self._last: dict[int, tuple[int, float]] = {}   # stage -> (worker id, last beat)

  def watch(self, stage: int, worker_id: int) -> None:
    """A (new) worker serves `stage` from now on."""
    self._last[stage] = (worker_id, time.monotonic())

  def beat(self, stage: int, worker_id: int, t: float) -> None:
    got = self._last.get(stage)
    if got is not None and got[0] == worker_id and t > got[1]:
      self._last[stage] = (worker_id, t)

  def current(self, stage: int) -> int | None:
    got = self._last.get(stage)
    return None if got is None else got[0]

  def silence(self) -> dict[int, float]:
    now = time.monotonic()
    return {s: round(now - t, 3) for s, (_, t) in sorted(self._last.items())}

  def dead_stages(self, vouched: Callable[[int], bool] | None = None) -> list[int]:
    """Stages silent for more than the timeout that `vouched(stage)` (the runtime's
    `vouches_alive`) does not vouch for."""
    now = time.monotonic()
    return [s for s, (_, t) in sorted(self._last.items())
            if now - t > self.timeout_s and not (vouched is not None and vouched(s))]


class ProgressWatchdog:
  """Stages that have a step waiting on them and finished no step for `timeout_s` (alive,
  heartbeating, stuck). The engine tells it where each microbatch's step is (`expect` when it
  submits one to stage 0, `progress` per finished stage step) and kills what it reports."""

  def __init__(self, num_stages: int, timeout_s: float):
    self.num_stages, self.timeout_s = num_stages, timeout_s
    self._waiting: dict[int, tuple[int, float]] = {}   # mb_id -> (stage it waits on, since)
    self._progress = {s: time.monotonic() for s in range(num_stages)}

  def expect(self, mb_id: int) -> None:
    """A step of `mb_id` was submitted to stage 0."""
    self._waiting[mb_id] = (0, time.monotonic())

  def progress(self, stage: int, mb_id: int) -> None:
    """Stage `stage` finished a step of `mb_id`: it waits on the next stage, or on nobody."""
    t = time.monotonic()
    self._progress[stage] = t
    if mb_id in self._waiting:
      if stage + 1 < self.num_stages:
        self._waiting[mb_id] = (stage + 1, t)
      else:
        del self._waiting[mb_id]

  def replaced(self, stage: int) -> None:
    """A new worker serves `stage`: it gets a full timeout."""
    self._progress[stage] = time.monotonic()

  def clear(self) -> None:
    """Every microbatch in flight was resumed or requeued (a recovery)."""
    self._waiting.clear()

  def stalled(self) -> list[int]:
    t = time.monotonic()
    return sorted({s for s, since in self._waiting.values()
                   if t - max(since, self._progress[s]) > self.timeout_s})
