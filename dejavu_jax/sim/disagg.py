"""Prompt-token disaggregation: a prompt pipeline streams prompt caches into a token pipeline.

Flow of one microbatch:
  1. it waits until the token side has a free host slot (flow control: the prompt worker asks for
     a slot before it starts) and the prompt pipeline has room (at most `prompt_inflight`
     microbatches, default Dp);
  2. its prompt step runs through the Dp prompt stages; each stage streams every layer's KV to
     the token stage owning that layer over `stream_link` while computing the next layer, so a
     stage with l layers, per-layer compute c and per-layer transfer x takes
     c + x + (l - 1) * max(c, x); `prompt_overhead` (the paper's m) stretches the compute;
  3. when the last prompt stage is done (first token out) the cache sits in the host slots;
  4. the token pipeline admits it when it has fewer than `token_inflight` (default Dt)
     microbatches, freeing the host slot; at admission every token stage starts loading its part
     of the prompt cache from host over `host_link` (one load at a time per stage), overlapped
     with the steps that stage runs meanwhile: its first token step there waits only for what
     is left of the load when it starts;
  5. token steps run as in the colocated pipeline until the microbatch is done.
"""

from __future__ import annotations

import collections
import math
from typing import Sequence

from dejavu_jax import costmodel as cm
from dejavu_jax.sim.colocated import step_time
from dejavu_jax.sim.engine import EventLoop, Microbatch, record_step
from dejavu_jax.sim.failures import Failure, FailureManager, RecoveryConfig
from dejavu_jax.sim.feed import RequestFeed
from dejavu_jax.sim.pipeline import Pipeline, split_layers
from dejavu_jax.sim.records import RequestRecord, SimResult


class _Disaggregated:
  """Hooks of both pipelines (see `PipelineHooks`)."""

  def __init__(self, cost, loop, host_slots, prompt_inflight, token_inflight, stream_link,
               host_link, prompt_overhead, include_head, live_rows_only=False):
    self.cost, self.loop = cost, loop
    self.free_slots, self.prompt_inflight, self.token_inflight = (
        host_slots, prompt_inflight, token_inflight)
    self.stream_link, self.host_link = stream_link, host_link
    self.prompt_overhead, self.include_head = prompt_overhead, include_head
    self.live_rows_only = live_rows_only
    self.prompt: Pipeline | None = None
    self.token: Pipeline | None = None
    self.feed: RequestFeed | None = None
    self.ready: collections.deque[Microbatch] = collections.deque()
    self.finish_times: list[float] = []
    self.loaded_at: dict[Microbatch, list[float]] = {}   # per token stage: prompt cache on device
    self.link_free_at: list[float] = []                  # per token stage: its host link

  def step_time(self, pipe, stage, mb):
    layers = pipe.stages[stage].layers
    last = stage == pipe.num_stages - 1
    t = step_time(self.cost, layers, mb, stage == 0, last, self.include_head,
                  self.live_rows_only and pipe is self.token)
    m = self.cost.model
    if pipe is self.prompt:
      compute = t * self.prompt_overhead
      x = 0.0
      if self.stream_link is not None:
        x = self.stream_link.transfer_time(cm.prompt_kv_bytes_per_layer(m, mb.batch,
                                                                        mb.step_tokens()))
      return cm.streamed_prompt_time(compute, layers, x)
    if mb.done == 1 and not mb.reprefill and mb in self.loaded_at:
      t += max(0.0, self.loaded_at[mb][stage] - self.loop.now)   # what is left of the load
      if stage == pipe.num_stages - 1:
        del self.loaded_at[mb]
    return t

  def on_pass(self, pipe, mb, step):
    now = self.loop.now
    record_step(mb, step, now)
    if pipe is self.prompt:
      pipe.retire(mb)
      if mb.done >= mb.num_steps:
        self._finish(mb, slot=True)
      else:
        self.ready.append(mb)
    elif mb.done >= mb.num_steps:
      pipe.retire(mb)
      self._finish(mb, slot=False)
    else:
      pipe.next_step(mb)
    self.try_admit()

  def _finish(self, mb, slot):
    if slot:
      self.free_slots += 1
    self.finish_times.append(self.loop.now)

  def on_requeue(self, pipe, mb, mode):
    lost = sum(o + mb.done for r, o in zip(mb.requests, mb.offsets_or_zeros()) if not r.done)
    if mode == "continue":
      # The token pipeline re-prefills prompt + tokens in the microbatch's own slot.
      mb.reprefill = True
      pipe.admit(mb)
      return 0
    if pipe is self.prompt:
      self.free_slots += 1  # its slot is asked for again when it is re-admitted
    mb.done, mb.reprefill = 0, False
    for r in mb.requests:
      if not r.done:
        r.first_token = math.nan
    self.feed.redo.append(mb)
    return lost

  def on_up(self, pipe):
    self.try_admit()

  def try_admit(self):
    tok = self.token
    while tok.up and self.ready and len(tok.inflight) < self.token_inflight:
      mb = self.ready.popleft()
      self.free_slots += 1
      if self.host_link is not None:
        now, m = self.loop.now, self.cost.model
        if not self.link_free_at:
          self.link_free_at = [0.0] * tok.num_stages
        ends = []
        for s, n in enumerate(tok.layers):
          end = max(now, self.link_free_at[s]) + cm.swap_in_time(self.host_link, m, n, mb.batch,
                                                                 mb.prompt_len)
          self.link_free_at[s] = end
          ends.append(end)
        self.loaded_at[mb] = ends
      tok.admit(mb)
      if tok.replica_link is not None:  # each token stage replicates the prompt block first
        for s, n in enumerate(tok.layers):
          tok.record_ack(s, mb, 0, cm.kv_bytes(tok.model, n, mb.batch, mb.prompt_len),
                         self.loop.now)
    pro = self.prompt
    while (pro.up and self.free_slots > 0 and len(pro.inflight) < self.prompt_inflight
           and self.feed.has_work()):
      self.free_slots -= 1
      pro.admit(self.feed.take())


def simulate_disaggregated(cost: cm.CostModel, requests: Sequence[RequestRecord],
                           prompt_stages: int, token_stages: int, batch_size: int = 8,
                           host_slots: int | None = None, prompt_inflight: int | None = None,
                           token_inflight: int | None = None,
                           stream_link: cm.Link | None = None, host_link: cm.Link | None = None,
                           prompt_overhead: float = 1.0, stage_link: cm.Link | None = None,
                           failures: Sequence[Failure] = (),
                           recovery: RecoveryConfig | None = None, include_head: bool = True,
                           until: float = math.inf, microbatching: str = "greedy",
                           live_rows_only: bool = False) -> SimResult:
  """Simulates a Dp-stage prompt pipeline feeding a Dt-stage token pipeline.

  Args:
    cost: the cost model.
    requests: fresh `RequestRecord`s.
    prompt_stages, token_stages: Dp and Dt.
    batch_size: requests per microbatch.
    host_slots: prompt caches each token worker can hold in host memory (default Dp + Dt: one
      per prompt in flight plus one waiting per token stage; 2 Dt would starve the prompt side
      when Dp > 2 Dt).
    prompt_inflight: microbatches in the prompt pipeline at once (default Dp).
    token_inflight: microbatches in the token pipeline at once (default Dt).
    stream_link: prompt -> token link for layer-wise streaming (None: free).
    host_link: host -> device link of the token workers (None: free).
    prompt_overhead: the paper's m >= 1 applied to prompt compute (streaming interference).
    stage_link: link between consecutive stages of either pipeline.
    failures: `Failure`s naming pipeline "prompt" or "token".
    recovery: recovery configuration (token pipeline; prompts in flight are always redone).
    include_head: add the LM head's time to the last stage of each pipeline.
    until: stop time.
    microbatching: "greedy" or "paper" (rows of a microbatch share prompt and output length, as
      the engine's paper mode): see `sim.feed`.
    live_rows_only: charge token steps for the rows still generating (the engine's paced mixed
      mode), as `simulate_colocated` does.
  """
  if prompt_overhead < 1:
    raise ValueError(f"prompt_overhead (m) must be >= 1, got {prompt_overhead}")
  host_slots = prompt_stages + token_stages if host_slots is None else host_slots
  prompt_inflight = prompt_stages if prompt_inflight is None else prompt_inflight
  token_inflight = token_stages if token_inflight is None else token_inflight
  for name, v in (("host_slots", host_slots), ("prompt_inflight", prompt_inflight),
                  ("token_inflight", token_inflight)):
    if v < 1:
      raise ValueError(f"{name} must be >= 1, got {v}")
  recovery = recovery or RecoveryConfig()
  loop = EventLoop()
  sys = _Disaggregated(cost, loop, host_slots, prompt_inflight, token_inflight, stream_link,
                       host_link, prompt_overhead, include_head, live_rows_only)
  L = cost.model.num_layers
  sys.prompt = Pipeline(loop, "prompt", cost.model, split_layers(L, prompt_stages), sys,
                        stage_link)
  sys.token = Pipeline(loop, "token", cost.model, split_layers(L, token_stages), sys, stage_link,
                       None, **recovery.pipeline_options(failures))
  manager = FailureManager(loop, {"prompt": sys.prompt, "token": sys.token}, recovery)
  manager.schedule(failures)
  sys.feed = RequestFeed(loop, requests, batch_size, sys.try_admit, microbatching)
  loop.run(until)
  info = {"system": "disaggregated", "prompt_stages": prompt_stages,
          "token_stages": token_stages, "machines": prompt_stages + token_stages,
          "batch_size": batch_size, "host_slots": host_slots, "microbatching": microbatching,
          "strategy": recovery.strategy if failures else None,
          "prompt_busy_s": sys.prompt.busy_time, "token_busy_s": sys.token.busy_time}
  return SimResult(list(requests), manager.recoveries, sys.finish_times, loop.now,
                   loop.events_run, info)
