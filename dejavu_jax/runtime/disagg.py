"""Prompt and token workers of a disaggregated deployment, as threads of one process.

Two worker sets over disjoint devices of the mesh, each a `LocalRuntime` of its own depth:

* a `PromptWorker` runs the prefill steps of its stage of the Dp-stage prompt pipeline. Right
  after a step computed (before its output is handed on) it packs what each token stage owns of
  its layers (`stream.route.stream_out`: one packet per overlapping token stage), gives its cache
  buffer back to its pool, and a sender thread copies the packets to host and delivers them
  into the token workers' host slots; the next prompt step does not wait for the transfer.
* a `TokenWorker` runs the decode steps of its stage of the Dt-stage token pipeline and owns
  bounded `HostSlots`. The engine reserves a slot on every token worker before a microbatch's
  prompt starts (`reserve_slot`); when a worker's slot holds every layer it owns, it reports
  `PromptLanded`. `load_prompt` starts the host-to-device copy at once on a loader thread, so it
  overlaps the steps queued before it; the worker installs the placed cache when the message's
  turn comes in its inbox (FIFO: always before the microbatch's first decode step, which the
  engine submits after it), frees the slot and reports `SlotFreed` (the flow-control signal) and
  `CacheLoaded`. With replication the installed cache is sent to the successor as a block, as
  after any install (`LocalWorker._install`).

Events of the prompt runtime reach the engine wrapped in `FromPrompt` on the token runtime's one
event channel, so the engine waits on one queue and stage numbers never collide.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import jax
import numpy as np

from dejavu_jax.kv.cache import init_cache_for
from dejavu_jax.runtime.local import LocalRuntime, LocalWorker, PeerDead, _Free
from dejavu_jax.stream.packing import to_host
from dejavu_jax.stream.route import stream_out
from dejavu_jax.stream.slots import HostSlots


@dataclasses.dataclass
class FromPrompt:
  """An event of the prompt runtime (its `stage` numbers the prompt pipeline's stages)."""
  event: object


@dataclasses.dataclass
class PromptLanded:
  """Token stage `stage` holds microbatch `mb_id`'s complete prompt cache in a host slot."""
  stage: int
  mb_id: int
  worker_id: int


@dataclasses.dataclass
class SlotFreed:
  """Token stage `stage`'s worker freed `mb_id`'s host slot."""
  stage: int
  mb_id: int
  worker_id: int


@dataclasses.dataclass
class _LoadPrompt:
  mb_id: int
  future: concurrent.futures.Future
  epoch: int


class _Tagged:
  """The prompt runtime's event channel: wraps each event and puts it on the shared queue."""

  def __init__(self, target):
    self._target = target

  def put(self, ev) -> None:
    self._target.put(FromPrompt(ev))


class PromptWorker(LocalWorker):
  """A prompt pipeline stage that streams each prefill's KV to the token stages."""

  def __init__(self, runtime: "PromptRuntime", program, params, options):
    super().__init__(runtime, program, params, options)
    self._sender = concurrent.futures.ThreadPoolExecutor(1, f"send-prompt-{self.stage}")

  def _after_compute(self, msg, cache) -> None:
    rt = self._rt
    size = int(np.shape(msg.positions)[1])   # the prompt bucket
    packets = stream_out(cache, self.stage, rt.splits, rt.token_splits, start=0, size=size)
    lengths = cache.lengths
    # The gathers are dispatched: the buffer may be donated to the next prefill (XLA orders
    # the reads first), so it goes back to the pool now, not after the transfer.
    self._store.release(msg.mb_id)
    self._sender.submit(self._send, msg.mb_id, packets, lengths)

  def _send(self, mb_id, packets, lengths) -> None:
    if self._stop.is_set():
      return   # a crashed worker's host memory is gone: nothing more leaves it
    host_lengths = jax.device_get(lengths)
    for dst, packet in packets:
      try:
        self._rt.deliver(dst, mb_id, to_host(packet), host_lengths)
      except PeerDead:
        pass   # the token worker died: the engine requeues the microbatch

  def stop(self, timeout: float = 10.0) -> None:
    super().stop(timeout)
    self._sender.shutdown(wait=False, cancel_futures=True)

  def kill(self) -> None:
    super().kill()
    self._sender.shutdown(wait=False, cancel_futures=True)


class TokenWorker(LocalWorker):
  """A token pipeline stage with bounded host slots for the prompt caches streamed to it."""

  def __init__(self, runtime: "TokenRuntime", program, params, options):
    super().__init__(runtime, program, params, options)
    shape = jax.eval_shape(lambda: init_cache_for(program.cfg, program.num_layers,
                                                  runtime.microbatch_size, runtime.max_len))
    _, b, s, h, k = shape.k.shape
    self.slots = HostSlots(runtime.host_slots, (program.start, program.stop), b, s, h, k,
                           shape.k.dtype)
    self._loader = concurrent.futures.ThreadPoolExecutor(1, f"load-prompt-{self.stage}")
    self._link_free_at = 0.0                 # paced: the modeled host link's next free time
    self._loaded_at: dict[int, float] = {}   # paced: mb -> modeled end of its prompt load

  # ---- messages (engine and prompt senders) ----
  def reserve_slot(self, mb_id: int) -> bool:
    return self.slots.reserve(mb_id)

  def receive_prompt(self, mb_id: int, packet, lengths) -> None:
    if not self.alive:
      raise PeerDead(f"token stage {self.stage} is dead")
    if self.slots.write(mb_id, packet, lengths):
      self._rt.events.put(PromptLanded(self.stage, mb_id, self.worker_id))

  def load_prompt(self, mb_id: int, epoch: int, start_at: float = 0.0,
                  load_s: float = 0.0) -> None:
    """Starts the host-to-device copy now; installs it in inbox order (before later steps).
    Paced: the modeled load starts at `start_at` (perf_counter) once this worker's host link is
    free and lasts `load_s`; the microbatch's first step here starts no earlier than its end."""
    if load_s > 0:
      end = max(start_at, self._link_free_at) + load_s
      self._link_free_at = end
      self._loaded_at[mb_id] = end
    fut = self._loader.submit(lambda: self._program.place_cache(self.slots.read(mb_id)))
    self._inbox.put(_LoadPrompt(mb_id, fut, epoch))

  # ---- worker thread ----
  def _not_before(self, msg) -> float:
    return self._loaded_at.pop(msg.mb_id, 0.0) if msg.kind == "decode" else 0.0

  def _handle(self, msg) -> None:
    if isinstance(msg, _LoadPrompt):
      # Installed whatever the epoch: a microbatch the recovery resumed needs it, one it requeued
      # is freed by the `free` queued behind this load.
      try:
        self._install(msg.mb_id, 0, msg.future.result())
      finally:
        self._free_slot(msg.mb_id)
      return
    super()._handle(msg)
    if isinstance(msg, _Free):
      self._free_slot(msg.mb_id)

  def _free_slot(self, mb_id: int) -> None:
    if self.slots.release(mb_id) and self.alive:
      self._rt.events.put(SlotFreed(self.stage, mb_id, self.worker_id))

  def stop(self, timeout: float = 10.0) -> None:
    super().stop(timeout)
    self._loader.shutdown(wait=False, cancel_futures=True)

  def kill(self) -> None:
    super().kill()
    self._loader.shutdown(wait=False, cancel_futures=True)


class PromptRuntime(LocalRuntime):
  """The prompt pipeline's workers; `deliver` lands packets in the token runtime's workers."""

  def __init__(self, programs, params_for, depth, microbatch_size, max_len, pace, heartbeat_s,
               splits, token_runtime: "TokenRuntime"):
    super().__init__(programs, params_for, depth, microbatch_size, max_len, pace, heartbeat_s)
    self.worker_class = PromptWorker
    self.splits, self.token_splits = tuple(splits), tuple(token_runtime.splits)
    self.token_runtime = token_runtime
    self.events = _Tagged(token_runtime.events)

  def deliver(self, token_stage: int, mb_id: int, packet, lengths) -> None:
    self.token_runtime.worker(token_stage).receive_prompt(mb_id, packet, lengths)


class TokenRuntime(LocalRuntime):
  """The token pipeline's workers, each with `host_slots` host slots."""

  def __init__(self, programs, params_for, depth, microbatch_size, max_len, pace, heartbeat_s,
               splits, host_slots: int):
    super().__init__(programs, params_for, depth, microbatch_size, max_len, pace, heartbeat_s)
    self.worker_class = TokenWorker
    self.splits, self.host_slots = tuple(splits), host_slots
