"""The streaming ablation: one setting picks how much of the paper's optimization stack is on.

This module owns `MODES` and the mode-dependent ways of streaming a prompt cache and a decode
step's delta into a host KV log, so the paper's ablation can be reproduced by changing one string:

    "naive"       one transfer per contiguous piece: every (layer, row, k|v) of the slice is
                  sliced on the device and copied to the host on its own, after the compute.
    "buffered"    gather the whole slice into one device buffer, then one transfer, after the
                  compute (the paper's largest single win).
    "layerwise"   buffered, and the prompt runs as layer groups: each group's KV goes to the
                  streamer as soon as the group is dispatched, so its transfer overlaps the
                  later groups' compute. Token deltas are still copied synchronously.
    "background"  layerwise, and each decode step's delta is handed to the streamer thread, so
                  its transfer overlaps the next step.

Every mode produces the same log, bit for bit (tests check it); only the time differs.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import jax
import numpy as np

from dejavu_jax.kv.cache import KVCache
from dejavu_jax.stream import transport
from dejavu_jax.stream.packing import Range, gather, gather_step
from dejavu_jax.stream.hostlog import HostKVLog

MODES = ("naive", "buffered", "layerwise", "background")


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"unknown streaming mode {mode!r}; expected one of {MODES}")
  return mode


def overlaps_prompt(mode: str) -> bool:
  return check_mode(mode) in ("layerwise", "background")


# ---- the two synchronous transports the ablation compares ----
def stream_naive(cache: KVCache, start: int, size: int, log: HostKVLog, *,
                 layer_base: int = 0) -> None:
  """Copies positions [start, start + size) piece by piece: one transfer per layer, row, k|v."""
  l0 = layer_base - log.layer_base
  for l in range(cache.num_layers):
    for b in range(cache.batch):
      for i, part in enumerate((cache.k, cache.v)):
        span = slice(start, start + size)
        transport.flush(part[l, b, span], out=log.kv[i, l0 + l, b, span])
  log.grow(start + size)


def stream_naive_step(cache: KVCache, positions: np.ndarray, log: HostKVLog, *,
                      layer_base: int = 0) -> int:
  """Appends a decode step's delta piece by piece (one transfer per layer, row, k|v)."""
  l0 = layer_base - log.layer_base
  positions = np.asarray(positions)
  step = log.new_step()
  for l in range(cache.num_layers):
    for b, p in enumerate(positions):
      if p >= 0:
        for i, part in enumerate((cache.k, cache.v)):
          transport.flush(part[l, b, p], out=log.kv[i, l0 + l, b, p])
  log.grow(positions + 1)
  return step


# ---- a prompt cache ----
def stream_prompt(mode: str, cache: KVCache, start: int, size: int, log: HostKVLog, *,
                  streamer=None, key: Hashable = None, layer_base: int = 0) -> list:
  """Streams a (computed) prompt cache into `log`; returns tickets to wait on (overlapped modes).

  naive and buffered block until the data is in the log; layerwise and background hand the
  transfer to `streamer` and return its ticket.
  """
  check_mode(mode)
  if mode == "naive":
    stream_naive(cache, start, size, log, layer_base=layer_base)
    return []
  if mode == "buffered":
    log.write(gather(cache, start, size, layer_base=layer_base))
    return []
  return [streamer.stream_tokens(cache, start, size, log, key, layer_base=layer_base)]


def prefill_and_stream(mode: str, prefills: Sequence, params: Sequence, caches: list[KVCache],
                       groups: Sequence[Range], x, positions, logs, size: int, *,
                       streamer=None, key: Hashable = None):
  """Runs a prefill as layer groups and streams each group's prompt KV as the mode says.

  Args:
    prefills: per group, the jitted prefill step of `dejavu_jax.models.generate.make_steps`.
    params: per group, that stage's params.
    caches: per group, its cache (DONATED to the prefill step).
    groups: per group, its global layer range.
    x, positions: the first group's input tokens [B, T] and positions [B, T].
    logs: the destination: one HostKVLog holding every group's layers, or one per group.
    size: prompt positions to stream (from position 0).
  Returns:
    (caches, out, tickets): the updated caches, the last group's output, and the tickets of
    transfers still in flight (overlapped modes) to wait on before relying on the log.
  """
  tickets, out = [], x
  caches = list(caches)
  logs = [logs] * len(groups) if isinstance(logs, HostKVLog) else list(logs)
  for g, (prefill, p, rng) in enumerate(zip(prefills, params, groups)):
    caches[g], out = prefill(p, caches[g], out, positions)
    if overlaps_prompt(mode):
      # The group's compute is only dispatched; the streamer thread waits for it while the
      # next groups run.
      tickets += stream_prompt(mode, caches[g], 0, size, logs[g], streamer=streamer, key=key,
                               layer_base=rng[0])
  if not overlaps_prompt(mode):
    for cache, rng, log in zip(caches, groups, logs):
      stream_prompt(mode, cache, 0, size, log, layer_base=rng[0])
  return caches, out, tickets


# ---- one decode step's delta ----
def stream_token_step(mode: str, cache: KVCache, positions, log: HostKVLog, *, streamer=None,
                      key: Hashable = None, layer_base: int = 0):
  """Appends a decode step's delta at `positions` [B] to `log`.

  The background mode returns a ticket (the delta was gathered into a fresh buffer, so the next
  step may donate `cache` at once); the others return the log step once the copy is done.
  """
  check_mode(mode)
  if mode == "naive":
    return stream_naive_step(cache, np.asarray(positions), log, layer_base=layer_base)
  if mode == "background":
    return streamer.stream_step(cache, positions, log, key, layer_base=layer_base)
  return log.append(gather_step(cache, jax.numpy.asarray(positions), layer_base=layer_base))
