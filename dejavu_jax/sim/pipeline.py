"""A simulated pipeline: stages that each run one step at a time, in FIFO order.

A microbatch's step visits stages 0..D-1; when the last stage finishes it, the driver (colocated
baseline, prompt pipeline or token pipeline) decides what comes next through `PipelineHooks`.
Optional per-stage mechanisms, each off unless its link is given:

  * activation hops between stages over `stage_link`;
  * microbatch swapping over `swap_link`: the device holds 2 cache slots; a token step can start
    only once its cache is swapped in, and the swap-in of the next microbatch starts as soon as
    the slot it goes into frees, i.e. when the stage starts its current step; after a step only
    the new token's delta is swapped out (on the other direction of the link). With at most 2
    microbatches in flight both stay in the slots and nothing is swapped in (as in the engine);
  * replication over `replica_link`: after each step a background sender streams the step's
    cache (prompt block, then per-token deltas) to the next stage (the ring's holder), which
    acknowledges it: an `Ack` event when the transfer ends, unless sender or holder died first;
  * snapshots every `snapshot_every` steps of a stage's worker, asynchronous as the engine's
    (runtime/snapshot.py): the whole cache of every microbatch the stage holds is written over
    `snapshot_link` in the background (a snapshot due while one is being written is skipped),
    and a `SnapshotSaved` event names the step of each microbatch when the write ends.
Events go to `observe` (the failure manager feeds them to the recovery strategy).

A failure kills one stage's worker (`kill`): its queue and the step it runs are lost, steps that
reach it wait in a dead inbox, and the other stages go on with what they have until the failure
is detected; then `abort` drops everything in flight (a new `epoch`: events of an older epoch
are ignored) and `restore` brings the pipeline back up with replaced workers.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Protocol

from dejavu_jax import costmodel as cm
from dejavu_jax.config import ModelConfig
from dejavu_jax.partition import balanced_ranges
from dejavu_jax.runtime.api import Ack, SnapshotSaved
from dejavu_jax.sim.engine import EventLoop, Microbatch


class PipelineHooks(Protocol):
  """What a driver does when a pipeline finishes a step, requeues a microbatch a recovery could
  not resume ("restart" from the prompt or "continue" from prompt + tokens; returns the tokens to
  be generated again) or comes back up."""

  def step_time(self, pipe: "Pipeline", stage: int, mb: Microbatch) -> float: ...
  def on_pass(self, pipe: "Pipeline", mb: Microbatch, step: int) -> None: ...
  def on_requeue(self, pipe: "Pipeline", mb: Microbatch, mode: str) -> int: ...
  def on_up(self, pipe: "Pipeline") -> None: ...


@dataclasses.dataclass
class _Stage:
  layers: int
  queue: collections.deque = dataclasses.field(default_factory=collections.deque)
  busy: bool = False
  slot_free_at: float = 0.0
  swap_link_free_at: float = 0.0
  replica_free_at: float = 0.0
  worker: int = 0           # bumped when the stage's worker dies: its pending events are void
  dead: bool = False
  started: int = 0          # steps this worker started (armed failures count them)
  completed: int = 0        # steps this worker completed (snapshots are due every k of them)
  snapshot_busy: bool = False
  snapshots: int = 0
  armed: tuple | None = None   # (steps left, callback)


def split_layers(num_layers: int, num_stages: int) -> list[int]:
  """Layers per stage of the even split (`partition.balanced_ranges`), as a served pipeline has."""
  return [stop - start for start, stop in balanced_ranges(num_layers, num_stages)]


class Pipeline:
  """D stages over `layers` (one count per stage); see the module docstring."""

  def __init__(self, loop: EventLoop, name: str, model: ModelConfig, layers: list[int],
               hooks: PipelineHooks, stage_link: cm.Link | None = None,
               swap_link: cm.Link | None = None, replica_link: cm.Link | None = None,
               snapshot_every: int | None = None, snapshot_link: cm.Link | None = None):
    self.loop, self.name, self.model, self.hooks = loop, name, model, hooks
    self.stages = [_Stage(n) for n in layers]
    self.stage_link, self.swap_link = stage_link, swap_link
    self.replica_link = replica_link
    self.snapshot_every, self.snapshot_link = snapshot_every, snapshot_link
    self.epoch = 0
    self.up = True
    self.inflight: dict[Microbatch, None] = {}  # insertion-ordered set
    self.busy_time = [0.0] * len(layers)
    self.observe: Callable[[object], None] = lambda event: None
    self.on_retire: Callable[[int], None] = lambda mid: None

  @property
  def num_stages(self) -> int:
    return len(self.stages)

  @property
  def layers(self) -> list[int]:
    return [st.layers for st in self.stages]

  # ---- admission and step flow ----
  def admit(self, mb: Microbatch) -> None:
    """Takes `mb` in and starts its next step at stage 0."""
    if mb not in self.inflight:
      mb.reset_stage_state(self.num_stages)
    self.inflight[mb] = None
    self._arrive(0, mb, self.epoch)

  def next_step(self, mb: Microbatch) -> None:
    self._arrive(0, mb, self.epoch)

  def retire(self, mb: Microbatch) -> None:
    self.inflight.pop(mb, None)
    self.on_retire(mb.mid)

  def record_ack(self, stage: int, mb: Microbatch, step: int, nbytes: int, now: float) -> None:
    """Streams `nbytes` of `mb`'s cache at `stage` to the next stage; acked on arrival."""
    # The sender is busy for bytes / bandwidth; the link latency overlaps the next send.
    st, link = self.stages[stage], self.replica_link
    start = max(now, st.replica_free_at)
    st.replica_free_at = start + nbytes / link.bandwidth
    holder = (stage + 1) % self.num_stages
    self.loop.at(start + link.transfer_time(nbytes), self._ack, stage, holder, mb, step,
                 st.worker, self.stages[holder].worker)

  def _ack(self, stage, holder, mb, step, sender, receiver) -> None:
    # A transfer whose sender or holder died before it landed is never acknowledged.
    if self.stages[stage].worker == sender and self.stages[holder].worker == receiver and \
        not self.stages[holder].dead:
      self.observe(Ack(holder, stage, mb.mid, step, receiver))

  def arm(self, stage: int, after_steps: int, fire: Callable[[], None]) -> None:
    """Calls `fire` when stage `stage`'s current worker starts its `after_steps`-th step from
    now (the engine's armed failure dies right after that step's compute, before handing on)."""
    self.stages[stage].armed = (after_steps, fire)

  def _arrive(self, s: int, mb: Microbatch, epoch: int) -> None:
    if epoch != self.epoch or self.stages[s].dead:
      return
    st = self.stages[s]
    st.queue.append(mb)
    if not st.busy:
      self._start(s)

  def _start(self, s: int) -> None:
    st, now, m = self.stages[s], self.loop.now, self.model
    mb = st.queue.popleft()
    st.busy = True
    start = now
    if self.swap_link is not None and not mb.is_prefill() and len(self.inflight) > 2:
      prefetch = max(st.slot_free_at, mb.data_ready[s], st.swap_link_free_at)
      ready = prefetch + cm.swap_in_time(self.swap_link, m, st.layers, mb.batch, mb.context())
      st.swap_link_free_at = ready
      start = max(now, ready)
    st.slot_free_at = start
    dur = self.hooks.step_time(self, s, mb)
    self.busy_time[s] += dur
    st.started += 1
    self.loop.at(start + dur, self._complete, s, mb, mb.step, self.epoch, st.worker)
    if st.armed is not None:
      left, fire = st.armed
      st.armed = (left - 1, fire) if left > 1 else None
      if left <= 1:
        self.loop.at(start, fire)

  def _complete(self, s: int, mb: Microbatch, step: int, epoch: int, worker: int) -> None:
    if epoch != self.epoch or worker != self.stages[s].worker:
      return
    st, now, m = self.stages[s], self.loop.now, self.model
    st.busy = False
    if self.swap_link is not None:
      mb.data_ready[s] = now + cm.swap_out_time(self.swap_link, m, st.layers, mb.batch)
    if self.replica_link is not None:
      tokens = mb.step_tokens() if mb.is_prefill() else 1
      self.record_ack(s, mb, step, cm.kv_bytes(m, st.layers, mb.batch, tokens), now)
    mb.last_at[s] = step
    st.completed += 1
    if self.snapshot_every and st.completed % self.snapshot_every == 0:
      self._snapshot(s)
    if s + 1 < self.num_stages:
      hop = 0.0
      if self.stage_link is not None:
        tokens = mb.step_tokens() if mb.is_prefill() else 1
        hop = self.stage_link.transfer_time(cm.activation_bytes(m, mb.batch, tokens))
      self.loop.at(now + hop, self._arrive, s + 1, mb, epoch)
    else:
      self.hooks.on_pass(self, mb, step)
    if st.queue:
      self._start(s)

  def _snapshot(self, s: int) -> None:
    st = self.stages[s]
    held = [mb for mb in self.inflight if mb.last_at[s] >= 0]
    if not held:
      return
    if st.snapshot_busy:
      return   # the engine's snapshotter skips a snapshot due while one is being written
    st.snapshot_busy = True
    nbytes = sum(cm.kv_bytes(self.model, st.layers, mb.batch, mb.prompt_len + mb.last_at[s])
                 for mb in held)
    sid, st.snapshots = st.snapshots, st.snapshots + 1
    self.loop.at(self.loop.now + self.snapshot_link.transfer_time(nbytes), self._snapshot_saved,
                 s, st.worker, sid, {mb.mid: mb.last_at[s] for mb in held})

  def _snapshot_saved(self, s: int, worker: int, sid: int, steps: dict) -> None:
    st = self.stages[s]
    if st.worker != worker:
      return   # the worker died while writing: the snapshot never completed
    st.snapshot_busy = False
    self.observe(SnapshotSaved(s, f"sim/{self.name}/stage_{s}/worker_{worker}", sid, steps))

  # ---- failures ----
  def kill(self, s: int) -> None:
    """Stage `s`'s worker dies: its queue and running step are lost, steps reaching it wait."""
    st = self.stages[s]
    st.dead, st.busy, st.armed, st.snapshot_busy = True, False, None, False
    st.worker += 1
    st.queue.clear()

  def abort(self) -> list[Microbatch]:
    """Drops every step in flight and takes the pipeline down; returns the microbatches it held."""
    self.epoch += 1
    self.up = False
    for st in self.stages:
      st.queue.clear()
      st.busy = False
    return list(self.inflight)

  def restore(self, replaced: list[int], resumed: list[Microbatch]) -> None:
    """Brings the pipeline back up with new workers on `replaced` and resumes `resumed` (their
    `done` already rolled back); the driver requeues the others afterwards."""
    now = self.loop.now
    self.up = True
    for s in replaced:
      st = self.stages[s]
      st.dead, st.started, st.completed = False, 0, 0
    for st in self.stages:
      st.slot_free_at = st.swap_link_free_at = st.replica_free_at = now
    for mb in resumed:
      mb.data_ready = [now] * self.num_stages
      self._arrive(0, mb, self.epoch)
