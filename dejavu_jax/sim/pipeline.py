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
    cache (prompt block, then per-token deltas) to the next stage, which acknowledges it;
  * snapshots every `snapshot_every` steps over `snapshot_link`, blocking the stage: the whole
    cache after a prefill, then only the tokens added since the previous snapshot.

A failure aborts everything in flight by bumping `epoch`: events of an older epoch are ignored.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Protocol

from dejavu_jax import costmodel as cm
from dejavu_jax.config import ModelConfig
from dejavu_jax.partition import balanced_ranges
from dejavu_jax.sim.engine import EventLoop, Microbatch


class PipelineHooks(Protocol):
  """What a driver does when a pipeline finishes a step, restarts a microbatch or comes back up."""

  def step_time(self, pipe: "Pipeline", stage: int, mb: Microbatch) -> float: ...
  def on_pass(self, pipe: "Pipeline", mb: Microbatch, step: int) -> None: ...
  def on_restart(self, pipe: "Pipeline", mb: Microbatch) -> None: ...
  def on_up(self, pipe: "Pipeline") -> None: ...


@dataclasses.dataclass
class _Stage:
  layers: int
  queue: collections.deque = dataclasses.field(default_factory=collections.deque)
  busy: bool = False
  slot_free_at: float = 0.0
  swap_link_free_at: float = 0.0
  replica_free_at: float = 0.0


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

  def record_ack(self, stage: int, mb: Microbatch, step: int, nbytes: int, now: float) -> None:
    """Streams `nbytes` of `mb`'s cache at `stage` to the next stage; acked on arrival."""
    # The sender is busy for bytes / bandwidth; the link latency overlaps the next send.
    st, link = self.stages[stage], self.replica_link
    start = max(now, st.replica_free_at)
    st.replica_free_at = start + nbytes / link.bandwidth
    mb.acks[stage].append((start + link.transfer_time(nbytes), step))

  def _arrive(self, s: int, mb: Microbatch, epoch: int) -> None:
    if epoch != self.epoch:
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
    if self._snapshot_due(mb):
      # Incremental: the whole cache after a prefill, else the tokens since the last snapshot.
      if mb.is_prefill() or mb.snaps[s] < 0:
        tokens = mb.step_tokens() if mb.is_prefill() else mb.context() + 1
      else:
        tokens = mb.step - mb.snaps[s]
      dur += self.snapshot_link.transfer_time(cm.kv_bytes(m, st.layers, mb.batch, tokens))
    self.busy_time[s] += dur
    self.loop.at(start + dur, self._complete, s, mb, mb.step, self.epoch)

  def _snapshot_due(self, mb: Microbatch) -> bool:
    return bool(self.snapshot_every) and mb.step % self.snapshot_every == 0

  def _complete(self, s: int, mb: Microbatch, step: int, epoch: int) -> None:
    if epoch != self.epoch:
      return
    st, now, m = self.stages[s], self.loop.now, self.model
    st.busy = False
    if self.swap_link is not None:
      mb.data_ready[s] = now + cm.swap_out_time(self.swap_link, m, st.layers, mb.batch)
    if self.replica_link is not None:
      tokens = mb.step_tokens() if mb.is_prefill() else 1
      self.record_ack(s, mb, step, cm.kv_bytes(m, st.layers, mb.batch, tokens), now)
    if self._snapshot_due(mb):
      mb.snaps[s] = step
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

  # ---- failures ----
  def abort(self) -> list[Microbatch]:
    """Drops every step in flight and takes the pipeline down; returns the microbatches it held."""
    self.epoch += 1
    self.up = False
    for st in self.stages:
      st.queue.clear()
      st.busy = False
    return list(self.inflight)

  def restore(self, resumed: list[Microbatch]) -> None:
    """Brings the pipeline back up and resumes `resumed` (their `done` already rolled back)."""
    now = self.loop.now
    self.up = True
    for st in self.stages:
      st.slot_free_at = st.swap_link_free_at = st.replica_free_at = now
    for mb in resumed:
      mb.data_ready = [now] * self.num_stages
      if mb.done == 0 and not mb.reprefill:
        self.inflight.pop(mb, None)
        self.hooks.on_restart(self, mb)
      else:
        self._arrive(0, mb, self.epoch)
    self.hooks.on_up(self)
