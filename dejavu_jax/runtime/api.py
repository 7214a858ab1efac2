"""The runtime boundary: what the engine may say to a stage worker and what it hears back.

Everything outside a worker talks to it only through a `Worker` handle (messages in) and hears
from it only on the runtime's one event channel (events out). No caller reads a worker's
attributes or touches its devices; activations and KV slices travel through channels the runtime
provides. A threads runtime (`runtime/local.py`) and a process runtime implement the same calls,
so the engine, the recovery strategies and the controller do not change between them.

Messages in (`Worker` methods; none blocks on the worker's progress):
  submit(Step)                run one prefill or decode step of a microbatch (FIFO per worker)
  set_epoch(e)                steps of an older epoch still queued are dropped (out of band: it
                              overtakes queued steps)
  load_cache(mb, source)      install a microbatch's cache from a `CacheSource`; replies
                              `CacheLoaded`
  export_replica(...)         (replica holder) send a replica it holds to another worker
  free(mb)                    the microbatch left the pipeline (FIFO: after its queued steps)
  resync()                    re-send the replicas of every cache held to the successor (after
                              the successor was replaced)
  stats()                     a `WorkerStats` (the one call that answers directly)
Events out (one channel, `Runtime.events`): `StepResult`, `StepError`, `Heartbeat`, `Ack`,
`CacheLoaded`, `SnapshotSaved`, `Progress`.
"""

from __future__ import annotations

import dataclasses
import queue
from typing import Any, Protocol, Sequence


@dataclasses.dataclass
class Step:
  """One step of one microbatch travelling through the stages."""
  kind: str                   # "prefill" | "decode"
  mb_id: int                  # microbatch id (unique for the engine's lifetime)
  step: int                   # 0 for the prefill, then 1, 2, ... for decode steps
  x: Any                      # tokens [B, T] / [B], or hidden states from the previous stage
  positions: Any              # [B, T] (prefill) or [B] (decode), -1 = do not write
  batch: int                  # rows in use (for the cost model)
  tokens: int                 # prompt length (prefill) or tokens already cached (decode)
  ready_at: float = 0.0       # perf_counter time the step could start here (paced mode)
  epoch: int = 0              # recovery epoch; steps of an older epoch are dropped
  final: bool = False         # a hint: every live row reaches its token limit at this step (a
                              # swapping worker does not prefetch the microbatch after it)


# ---- cache sources (what `load_cache` restores from; plain data, so any runtime can ship them)
@dataclasses.dataclass(frozen=True)
class ReplicaSource:
  """The replica of (stage, mb) that worker `holder` keeps in its host memory, as of `step`."""
  holder: int
  step: int


@dataclasses.dataclass(frozen=True)
class SnapshotSource:
  """Snapshot `snapshot_id` of a stage's caches, saved by one worker under `directory`."""
  directory: str
  snapshot_id: int
  step: int


# ---- events
@dataclasses.dataclass
class StepResult:
  stage: int
  mb_id: int
  step: int
  logits: Any                 # [B, V], host or last stage's devices
  done_at: float              # perf_counter time the step ended (modeled end when paced)
  epoch: int


@dataclasses.dataclass
class StepError:
  stage: int
  mb_id: int
  error: BaseException
  epoch: int


@dataclasses.dataclass
class Heartbeat:
  stage: int
  worker_id: int
  t: float                    # time.monotonic() on the worker


@dataclasses.dataclass
class Progress:
  """A step finished on a stage (the controller's progress watchdog and `observe`)."""
  stage: int
  mb_id: int
  step: int
  epoch: int


@dataclasses.dataclass
class Ack:
  """Worker `holder` holds stage `stage`'s cache of `mb_id` as of `step`, every entry landed."""
  holder: int
  stage: int
  mb_id: int
  step: int
  worker_id: int              # the holder worker's id (a dead holder's acks are void)


@dataclasses.dataclass
class CacheLoaded:
  stage: int
  mb_id: int
  step: int
  error: str | None = None    # None: installed


@dataclasses.dataclass
class SnapshotSaved:
  """Snapshot `snapshot_id` of stage `stage` is complete on disk: mb_id -> step it holds."""
  stage: int
  directory: str
  snapshot_id: int
  steps: dict


@dataclasses.dataclass
class WorkerStats:
  stage: int
  worker_id: int
  alive: bool
  steps_done: int
  busy_s: float
  overruns: int               # paced steps whose real compute outlasted the modeled time
  live_device_bytes: int      # params + caches (what this worker holds on its devices)
  cache_mb_ids: list
  inbox: int                  # messages queued
  kv_device_bytes: int = 0    # the KV cache buffers alone (what the device KV budget bounds)
  kv_peak_device_bytes: int = 0   # the most KV cache bytes held at once so far


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
  """What a recovery strategy asks every worker to run beside its steps (plain data)."""
  replicate: bool = False                 # ring replication into the successor's host memory
  snapshot_dir: str | None = None         # periodic orbax snapshots of the caches ...
  snapshot_every: int = 0                 # ... every this many steps of the worker


class Worker(Protocol):
  stage: int
  worker_id: int

  def submit(self, step: Step) -> None: ...
  def set_epoch(self, epoch: int) -> None: ...
  def load_cache(self, mb_id: int, source, epoch: int) -> None: ...
  def export_replica(self, stage: int, mb_id: int, step: int, to: int) -> None: ...
  def free(self, mb_id: int) -> None: ...
  def resync(self) -> None: ...
  def stats(self) -> WorkerStats: ...


class Runtime(Protocol):
  """Spawns, links, kills and replaces the workers of one pipeline."""
  events: queue.Queue
  num_stages: int

  def start(self, options: WorkerOptions) -> None: ...
  def worker(self, stage: int) -> Worker: ...
  def kill(self, stage: int) -> None: ...
  def stall(self, stage: int, seconds: float) -> None: ...
  def arm(self, stage: int, after_steps: int, kind: str = "crash", stall_s: float = 0.0) -> None: ...
  def disarm(self) -> None: ...
  def died_at(self, stage: int) -> float | None: ...
  def replace(self, stage: int) -> Worker: ...
  def alive(self, stage: int) -> bool: ...
  def close(self) -> None: ...


def drain(events: queue.Queue, first_timeout: float) -> Sequence:
  """Every event queued now (waiting up to `first_timeout` for the first one)."""
  out = []
  try:
    out.append(events.get(timeout=max(first_timeout, 1e-4)))
    while True:
      out.append(events.get_nowait())
  except queue.Empty:
    pass
  return out
