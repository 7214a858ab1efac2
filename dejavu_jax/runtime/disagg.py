"""Prompt and token workers of a disaggregated deployment, as threads of one process (the Ray
runtime runs the same worker classes inside its actors, runtime/ray.py item 10).

Two worker sets over disjoint devices of the mesh, each a `LocalRuntime` of its own depth:

* a `PromptWorker` runs the prefill steps of its stage of the Dp-stage prompt pipeline and streams
  their KV to the token stages that own each layer, into the token workers' host slots. Layer-wise
  (the default, `PromptRuntime(layerwise=True)`): the worker thread runs the prefill one layer
  group at a time (`StageSlot.prefill_layerwise`, one jitted program per group) and, right after
  dispatching group l (whose program also packs l's layers for the token stages owning them,
  `stream.route.owners`) hands those packets to its sender thread; it does not wait for them,
  so group l's device-to-host copy overlaps group l+1's compute. The sender thread blocks on
  each packet's copy to host (`to_host`) and delivers it (one delivery per layer group and
  owning token stage, in layer order). Whole-stage (`layerwise=False`, the streaming ablation):
  one jitted prefill, then one packet per overlapping token stage (`stream_out`) after the step.
  Either way the cache buffer goes back to its pool right after the step (the gathers are
  dispatched first) and the next prompt step does not wait for the transfers.
* a `TokenWorker` runs the decode steps of its stage of the Dt-stage token pipeline and owns
  bounded `HostSlots`. The engine reserves a slot on every token worker before a microbatch's
  prompt starts (`reserve_slot`); when a worker's slot holds every layer it owns, it reports
  `PromptLanded`. `load_prompt` starts the host-to-device copy at once on a loader thread, so it
  overlaps the steps queued before it; the worker installs the placed cache when the message's
  turn comes in its inbox (FIFO: always before the microbatch's first decode step, which the
  engine submits after it), frees the slot and reports `SlotFreed` (the flow-control signal) and
  `CacheLoaded`. With replication the installed cache is sent to the successor as a block, as
  after any install (`LocalWorker._install`).

Events of the prompt runtime reach the engine wrapped in `api.FromPrompt` on the token runtime's
one event channel, so the engine waits on one queue and stage numbers never collide; the token
workers' `PromptLanded` and `SlotFreed` are declared in api.py too.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.kv.cache import init_cache_for
from dejavu_jax.runtime.api import FromPrompt, PromptLanded, SlotFreed
from dejavu_jax.runtime.local import LocalRuntime, LocalWorker, PeerDead
from dejavu_jax.stream.packing import to_host
from dejavu_jax.stream.route import owners, stream_out
from dejavu_jax.stream.slots import HostSlots


@dataclasses.dataclass
class _LoadPrompt:
  mb_id: int
  future: concurrent.futures.Future
  epoch: int


class TaggedEvents:
  """The prompt runtime's event channel: wraps each event and puts it on the shared queue (the
  Ray runtime's prompt actors use it too)."""

  def __init__(self, target):
    self._target = target

  def put(self, ev) -> None:
    self._target.put(FromPrompt(ev))


class PromptWorker(LocalWorker):
  """A prompt pipeline stage that streams each prefill's KV to the token stages."""

  def __init__(self, runtime: "PromptRuntime", program, params, options,
               worker_id: int | None = None):
    super().__init__(runtime, program, params, options, worker_id)
    self._sender = concurrent.futures.ThreadPoolExecutor(1, f"send-prompt-{self.stage}")

  def _prefill_fn(self, msg):
    rt = self._rt
    if not rt.layerwise:
      return self._program.prefill
    lengths = []   # the step's row lengths, final after the first group

    pack = lambda a, b: [r for _, r in owners((a, b), rt.token_splits)]  # noqa: E731

    def emit(layers, cache, packets):
      if not lengths:   # a copy: the next group donates the cache, its lengths included
        lengths.append(jnp.copy(cache.lengths))
      dsts = [d for d, _ in owners(layers, rt.token_splits)]
      rt.trace("dispatched", self.stage, msg.mb_id, layers)
      self._sender.submit(self._send, msg.mb_id, list(zip(dsts, packets)), lengths[0])

    return lambda params, cache, x, positions: self._program.prefill_layerwise(
        params, cache, x, positions, emit, rt.layer_group, pack)

  def _after_compute(self, msg, cache) -> None:
    rt = self._rt
    rt.trace("step_done", self.stage, msg.mb_id, (self._program.start, self._program.stop))
    if not rt.layerwise:
      size = int(np.shape(msg.positions)[1])   # the prompt bucket
      packets = stream_out(cache, self.stage, rt.splits, rt.token_splits, start=0, size=size)
      self._sender.submit(self._send, msg.mb_id, packets, cache.lengths)
    # The gathers are dispatched: the buffer may be donated to the next prefill (XLA orders
    # the reads first), so it goes back to the pool now, not after the transfer.
    self._store.release(msg.mb_id)

  def _send(self, mb_id, packets, lengths) -> None:
    if self._stop.is_set():
      return   # a crashed worker's host memory is gone: nothing more leaves it
    host_lengths = jax.device_get(lengths)
    for dst, packet in packets:
      try:
        self._rt.deliver(dst, mb_id, to_host(packet), host_lengths)
      except PeerDead:
        continue   # the token worker died: the engine requeues the microbatch
      self._rt.trace("landed", self.stage, mb_id, packet.layers, dst)

  def stop(self, timeout: float = 10.0) -> None:
    super().stop(timeout)
    self._sender.shutdown(wait=False, cancel_futures=True)

  def kill(self) -> None:
    super().kill()
    self._sender.shutdown(wait=False, cancel_futures=True)


class TokenWorker(LocalWorker):
  """A token pipeline stage with bounded host slots for the prompt caches streamed to it."""

  def __init__(self, runtime: "TokenRuntime", program, params, options,
               worker_id: int | None = None):
    super().__init__(runtime, program, params, options, worker_id)
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
    try:
      fut = self._loader.submit(lambda: self._program.place_cache(self.slots.read(mb_id)))
    except RuntimeError:
      if self.alive:
        raise
      return   # killed meanwhile (its loader is shut down): the message is lost, as to any dead peer
    self._inbox.put(_LoadPrompt(mb_id, fut, epoch))

  # ---- worker thread ----
  def _not_before(self, msg) -> float:
    return self._loaded_at.pop(msg.mb_id, 0.0) if msg.kind == "decode" else 0.0

  def _handle(self, msg) -> None:
    if isinstance(msg, _LoadPrompt):
      # Installed whatever the epoch: a microbatch the recovery resumed needs it, one it requeued
      # is freed by the `free` queued behind this load.
      try:
        self._install(msg.mb_id, 0, msg.future.result(), "prompt_load")
      finally:
        self._free_slot(msg.mb_id)
      return
    super()._handle(msg)

  def _on_free(self, mb_id: int) -> None:
    self._free_slot(mb_id)

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
               splits, token_runtime: "TokenRuntime", layerwise: bool = True,
               layer_group: int = 1):
    super().__init__(programs, params_for, depth, microbatch_size, max_len, pace, heartbeat_s)
    if layer_group < 1:
      raise ValueError(f"layer_group must be >= 1, got {layer_group}")
    self.worker_class = PromptWorker
    self.splits, self.token_splits = tuple(splits), tuple(token_runtime.splits)
    self.token_runtime = token_runtime
    self.events = TaggedEvents(token_runtime.events)
    self.layerwise, self.layer_group = bool(layerwise), int(layer_group)
    # Test hook: (event, prompt stage, mb_id, global layers[, token stage]) for "dispatched"
    # (worker thread, a layer group's gathers dispatched), "landed" (sender thread, a packet
    # delivered into a token worker's slot) and "step_done" (worker thread, the step computed).
    self.tracer = None

  def trace(self, event: str, stage: int, mb_id: int, layers, token_stage: int | None = None):
    tracer = self.tracer
    if tracer is not None:
      tracer(event, stage, mb_id, tuple(layers), token_stage)

  def deliver(self, token_stage: int, mb_id: int, packet, lengths) -> None:
    self.token_runtime.worker(token_stage).receive_prompt(mb_id, packet, lengths)


class TokenRuntime(LocalRuntime):
  """The token pipeline's workers, each with `host_slots` host slots."""

  def __init__(self, programs, params_for, depth, microbatch_size, max_len, pace, heartbeat_s,
               splits, host_slots: int):
    super().__init__(programs, params_for, depth, microbatch_size, max_len, pace, heartbeat_s)
    self.worker_class = TokenWorker
    self.splits, self.host_slots = tuple(splits), host_slots
