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
  load_cache(mb, source, e)   install a microbatch's cache from a `CacheSource`; replies
                              `CacheLoaded`
  export_replica(stage, mb, step, to, e)
                              (replica holder) send a replica it holds to worker `to`, as part
                              of the recovery of epoch e
  free(mb)                    the microbatch left the pipeline (FIFO: after its queued steps)
  resync()                    re-send the replicas of every cache held to the ring successor
                              (`ring_holder`; after the successor was replaced)
  reserve_slot(mb) -> bool    (token worker of a disaggregated deployment) reserve a host slot
                              for a prompt cache streamed in; False when none is free
  load_prompt(mb, e, ...)     (token worker) install the prompt cache landed in its host slot,
                              in inbox order; frees the slot (`SlotFreed`) and replies
                              `CacheLoaded`
  stats()                     a `WorkerStats`, swap counters included (the one call that
                              answers directly)
Runtime calls beside the workers: start, worker, alive, died_at, notified_dead (deaths the
runtime was told of without waiting for silence: a failed actor), vouches_alive (the runtime
knows for certain the worker lives: a thread of this process; a silent worker it vouches for is
starved, not dead), kill, stall, arm, disarm, replace, counters (runtime-level counters for the
serve summary), report (lines for experiment logs), close.
Events out (one channel, `Runtime.events`): `StepResult`, `StepError`, `Heartbeat`, `Ack`,
`CacheLoaded`, `SnapshotSaved`, `Progress`; with disaggregation also `PromptLanded`,
`SlotFreed` and the prompt runtime's events wrapped in `FromPrompt`; with
`WorkerOptions.cache_probe` also `CacheProbe` (the cache oracle's digests, `cache_digests`).

Replication is a ring: stage s's replica lives on `ring_holder(s, D)`. The runtimes route
replication writes by it and the recovery strategies (fault/strategies.py) plan by it; it is
declared here, the lowest module both may import.
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
  greedy: bool = False        # the last stage returns each row's argmax token, not the logits:
                              # greedy decoding samples where the logits are (FasterTransformer's
                              # last stage), so [B, V] floats never cross a process boundary
  frees: tuple = ()           # microbatches the engine released since the previous step it
                              # sent down this pipeline. Each stage frees them before this step
                              # takes a buffer: the engine's own `free` reaches a stage on another
                              # channel and, on Ray, can arrive after the next prefill came down
                              # the pipeline (seen: StoreFull under load); freeing twice is a no-op


def ring_holder(stage: int, num_stages: int) -> int:
  """The stage whose worker keeps the replica of `stage`'s caches (its ring successor)."""
  return (stage + 1) % num_stages


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
  logits: Any                 # [B, V], host or last stage's devices (None for a greedy step)
  done_at: float              # perf_counter time the step ended (modeled end when paced)
  epoch: int
  tokens: Any = None          # [B] int32: each row's argmax, for a `Step.greedy` step


@dataclasses.dataclass
class StepError:
  stage: int
  mb_id: int
  error: BaseException
  epoch: int


@dataclasses.dataclass
class DeathNotice:
  """A runtime learned that `stage`'s worker died (a process runtime's notice): nothing to
  handle, it only wakes the engine's loop so that detection (`notified_dead`) runs now."""
  stage: int


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
class PromptLanded:
  """Token stage `stage` holds microbatch `mb_id`'s complete prompt cache in a host slot."""
  stage: int
  mb_id: int
  worker_id: int


@dataclasses.dataclass
class SlotFreed:
  """Token stage `stage`'s worker freed `mb_id`'s host slot (the prompt path's flow control)."""
  stage: int
  mb_id: int
  worker_id: int


@dataclasses.dataclass
class FromPrompt:
  """An event of the prompt runtime (its `stage` numbers the prompt pipeline's stages), carried
  on the token runtime's channel so the engine waits on one queue."""
  event: object


@dataclasses.dataclass
class CacheProbe:
  """A digest of each used row of microbatch `mb_id`'s cache on stage `stage` (the cache
  oracle, serving/cache_oracle.py), taken where the worker's cache came to be:

    point "step"         right after step `step` computed here
          "swap_in"      before decode step `step` + 1, the cache swapped in from the host log
          "replica" / "snapshot" / "prompt_load"
                         right after the cache was installed from that source (holding `step`)

  rows: (row, length, digest) for every row with length > 0: the digest covers that row's K and V
  of every layer of the stage over positions [0, length), bit for bit (padding and positions
  past the row's length are left out)."""
  stage: int
  mb_id: int
  step: int
  point: str
  rows: tuple


RESTORE_POINTS = ("replica", "snapshot", "swap_in", "prompt_load")


def cache_digests(cache) -> tuple:
  """(row, length, digest) per used row of a `KVCache` (host or device): blake2b of the row's
  K then V bytes over [L, :length, H, K]."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  lengths = np.asarray(cache.lengths)
  k, v = np.asarray(cache.k), np.asarray(cache.v)
  out = []
  for b, n in enumerate(lengths.tolist()):
    if n <= 0:
      continue
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(k[:, b, :n]).tobytes())
    h.update(np.ascontiguousarray(v[:, b, :n]).tobytes())
    out.append((b, int(n), h.hexdigest()))
  return tuple(out)


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
  snapshot_errors: int = 0    # snapshot saves that failed (runtime/snapshot.py logs why)
  swap: dict = dataclasses.field(default_factory=dict)   # swapping counters (runtime/swapping.py
                                                         # `Swapping.stats`); {} without swapping


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
  """What a recovery strategy asks every worker to run beside its steps (plain data)."""
  replicate: bool = False                 # ring replication into the successor's host memory
  snapshot_dir: str | None = None         # periodic orbax snapshots of the caches ...
  snapshot_every: int = 0                 # ... every this many steps of the worker
  cache_probe: bool = False               # report `CacheProbe`s (the cache oracle; a host copy
                                          # of the microbatch's cache per step)


class Worker(Protocol):
  stage: int
  worker_id: int

  def submit(self, step: Step) -> None: ...
  def set_epoch(self, epoch: int) -> None: ...
  def load_cache(self, mb_id: int, source, epoch: int) -> None: ...
  def export_replica(self, stage: int, mb_id: int, step: int, to: int, epoch: int) -> None: ...
  def free(self, mb_id: int) -> None: ...
  def resync(self) -> None: ...
  def reserve_slot(self, mb_id: int) -> bool: ...
  def load_prompt(self, mb_id: int, epoch: int, start_at: float = 0.0,
                  load_s: float = 0.0) -> None: ...
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
  def notified_dead(self) -> list[int]: ...
  def vouches_alive(self, stage: int) -> bool: ...
  def counters(self) -> dict: ...
  def report(self, result=None) -> list[str]: ...
  def close(self) -> None: ...


def recovery_lines(result) -> list[str]:
  """Each recovery of a `ServeResult` as one line (stages, timeline, who handled what)."""
  lines = []
  for ev in getattr(result, "recoveries", ()):
    after = [t for r in result.records for t in r.token_times if t > ev.recovered_at]
    first = f", first token {min(after):.3f} s" if after else ""
    side = f"{ev.side} " if getattr(ev, "side", "") else ""
    lines.append(f"{side}stage(s) {list(ev.stages)}: killed {ev.failed_at:.3f} s, detected "
                 f"{ev.detected_at:.3f} s, replaced and resumed {ev.recovered_at:.3f} s{first} "
                 f"({ev.handled_by})")
  return lines


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
