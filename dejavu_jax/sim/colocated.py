"""The colocated baseline: prompt and token steps share one pipeline (FasterTransformer-style).

`replicas` data-parallel pipelines of `num_stages` stages each share one request queue. Each
pipeline keeps up to `max_inflight` (default: its depth D) microbatches in flight and admits a new
one as soon as one finishes (microbatch injection). A microbatch runs one prompt step and then its
token steps; each step visits the stages in order and every stage runs one step at a time, FIFO.
Optional microbatch swapping (`swap_link`) and failures with recovery, see `pipeline` and
`failures`.
"""

from __future__ import annotations

import math
from typing import Sequence

from dejavu_jax import costmodel as cm
from dejavu_jax.kv import budget as kv_budget
from dejavu_jax.sim.engine import EventLoop, Microbatch, record_step
from dejavu_jax.sim.failures import Failure, FailureManager, RecoveryConfig
from dejavu_jax.sim.feed import RequestFeed
from dejavu_jax.sim.pipeline import Pipeline, split_layers
from dejavu_jax.sim.records import RequestRecord, SimResult


def step_time(cost: cm.CostModel, layers: int, mb: Microbatch, first: bool, last: bool,
              include_head: bool, live_rows_only: bool = False) -> float:
  """A stage's compute time for `mb`'s next step (prefill or decode) plus its share of the head.

  With `live_rows_only` a token step is charged for the rows still generating only (those of
  requests finished earlier ride along as padding), as the engine's paced mode charges them.
  """
  if mb.is_prefill():
    t = cost.prompt_time(layers, mb.step_tokens(), mb.batch)
    batch = mb.batch
  else:
    batch = mb.live_rows() if live_rows_only else mb.batch
    t = cost.token_time(layers, batch, mb.context())
  if include_head and last:
    t += cost.head_time(batch)  # the LM head projects one position per row
  return t


class _Colocated:
  """Hooks of the baseline pipelines (see `PipelineHooks`)."""

  def __init__(self, cost, loop, batch_size, max_inflight, include_head, live_rows_only):
    self.cost, self.loop = cost, loop
    self.max_inflight, self.include_head = max_inflight, include_head
    self.live_rows_only = live_rows_only
    self.pipes: list[Pipeline] = []
    self.feed: RequestFeed | None = None
    self.finish_times: list[float] = []
    self._rr = 0

  def step_time(self, pipe, stage, mb):
    return step_time(self.cost, pipe.stages[stage].layers, mb, stage == 0,
                     stage == pipe.num_stages - 1, self.include_head, self.live_rows_only)

  def on_pass(self, pipe, mb, step):
    record_step(mb, step, self.loop.now)
    if mb.done >= mb.num_steps:
      pipe.retire(mb)
      self.finish_times.append(self.loop.now)
      self.try_inject()
    else:
      pipe.next_step(mb)

  def on_requeue(self, pipe, mb, mode):
    # As the engine's scheduler: the requests, not the microbatch, go back to the queue; they
    # are cut into microbatches again once every lost one is requeued (`on_up`).
    return self.feed.requeue(mb, mode)

  def on_up(self, pipe):
    self.try_inject()

  def try_inject(self):
    n = len(self.pipes)
    for i in range(n):
      pipe = self.pipes[(self._rr + i) % n]
      while pipe.up and len(pipe.inflight) < self.max_inflight and self.feed.has_work():
        pipe.admit(self.feed.take())
    self._rr = (self._rr + 1) % n


def simulate_colocated(cost: cm.CostModel, requests: Sequence[RequestRecord], num_stages: int,
                       batch_size: int = 8, replicas: int = 1, max_inflight: int | None = None,
                       stage_link: cm.Link | None = None, swap_link: cm.Link | None = None,
                       failures: Sequence[Failure] = (), recovery: RecoveryConfig | None = None,
                       include_head: bool = True, until: float = math.inf,
                       microbatching: str = "greedy",
                       live_rows_only: bool = False, kv_budget_bytes: float | None = None,
                       max_len: int | None = None) -> SimResult:
  """Simulates the colocated baseline on `requests` (their timing fields are filled in).

  Args:
    cost: the cost model (bound to the model).
    requests: fresh `RequestRecord`s (see `dejavu_jax.sim.workload`).
    num_stages: pipeline depth D of each replica.
    batch_size: requests per microbatch.
    replicas: data-parallel pipelines (D * replicas machines in all).
    max_inflight: microbatches in flight per pipeline (default D).
    stage_link: link between consecutive stages (None: free hops).
    swap_link: device<->host link for microbatch swapping (None: no swapping).
    failures: `Failure`s with pipeline "main" (stage index within replica 0) or "main<i>".
    recovery: how failures are recovered (default `RecoveryConfig()`: replica strategy), by the
      engine's strategy objects (sim/failures.py).
    include_head: add the LM head's time to the last stage.
    until: stop the simulation at this time.
    microbatching: how waiting requests form a microbatch: "greedy" (up to `batch_size` in
      arrival order) or "paper" (only consecutive requests of equal prompt and output length, as
      the engine's paper mode); see `dejavu_jax.sim.feed`.
    live_rows_only: charge a token step (and the head) for the rows still generating, not the
      whole microbatch (the engine's paced "mixed" mode does; equal-length microbatches never
      differ).
    kv_budget_bytes: device memory per stage for KV cache buffers; when given, `batch_size` is
      replaced by the largest batch whose buffers of `max_len` tokens fit: `max_inflight` of
      them, or 2 with swapping (`kv.budget.batch_for_budget`; a budget too small is a
      `KVBudgetError`). `info["batch_size"]` reports the batch used.
  """
  if replicas < 1:
    raise ValueError(f"replicas must be >= 1, got {replicas}")
  max_inflight = num_stages if max_inflight is None else max_inflight
  if max_inflight < 1:
    raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
  recovery = recovery or RecoveryConfig()
  if kv_budget_bytes is not None:
    if max_len is None:
      raise ValueError("kv_budget_bytes needs max_len (the cache length a buffer holds)")
    batch_size = kv_budget.batch_for_budget(
        cost.model, split_layers(cost.model.num_layers, num_stages), max_len, kv_budget_bytes,
        max_inflight, swap_link is not None)
  loop = EventLoop()
  sys = _Colocated(cost, loop, batch_size, max_inflight, include_head, live_rows_only)
  layers = split_layers(cost.model.num_layers, num_stages)
  opts = recovery.pipeline_options(failures)
  for i in range(replicas):
    sys.pipes.append(Pipeline(loop, f"main{i}", cost.model, layers, sys, stage_link, swap_link,
                              **opts))
  names = {p.name: p for p in sys.pipes} | {"main": sys.pipes[0]}
  manager = FailureManager(loop, names, recovery)
  manager.schedule(failures)
  sys.feed = RequestFeed(loop, requests, batch_size, sys.try_inject, microbatching)
  loop.run(until)
  info = {"system": "colocated", "num_stages": num_stages, "replicas": replicas,
          "machines": num_stages * replicas, "batch_size": batch_size,
          "max_inflight": max_inflight, "microbatching": microbatching,
          "swapping": swap_link is not None, "kv_budget_bytes": kv_budget_bytes,
          "strategy": recovery.strategy if failures else None,
          "stage_busy_s": [sum(p.busy_time[s] for p in sys.pipes) for s in range(num_stages)]}
  return SimResult(list(requests), manager.recoveries, sys.finish_times, loop.now,
                   loop.events_run, info)
