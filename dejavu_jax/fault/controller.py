"""The controller's view of worker health: heartbeats in, dead stages out.

As in the paper, a worker is declared dead after `timeout_s` of heartbeat silence (1 s beats and a
3 s timeout there; configurable here so tests and demos detect failures in a fraction of a
second). Failures are injected by `FailureSpec`s: at `time_s` after serving starts, stage
`stage`'s worker is killed (its thread stops, its params and KV caches are dropped).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time


@dataclasses.dataclass(frozen=True)
class FailureSpec:
  time_s: float     # seconds after serving starts
  stage: int        # which stage's worker dies

  def __post_init__(self):
    # A NaN time compares false with every clock reading: it would never fire, silently.
    if (isinstance(self.time_s, bool) or not isinstance(self.time_s, numbers.Real) or
        not 0 <= self.time_s < math.inf):
      raise ValueError(f"FailureSpec time_s must be a finite number >= 0, got {self.time_s!r}")
    if (isinstance(self.stage, bool) or not isinstance(self.stage, numbers.Integral) or
        self.stage < 0):
      raise ValueError(f"FailureSpec stage must be an integer >= 0, got {self.stage!r}")


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

  def dead_stages(self) -> list[int]:
    now = time.monotonic()
    return [s for s, (_, t) in sorted(self._last.items()) if now - t > self.timeout_s]
