"""stream_out / stream_in: route a cache's layer ranges between pipelines of different depths.

This module owns layer routing. A pipeline is described by its *splits*: the global layer range
of each stage, e.g. `((0, 12), (12, 24))` for two stages of a 24-layer model (any contiguous
ranges from layer 0; `dejavu_jax.partition.balanced_ranges` gives the even split the pipeline
and the simulator use). A cache produced by stage s of a D1-stage pipeline holds layers src[s];
each destination stage d of a D2-stage pipeline owns dst[d]; the piece that moves from s to d is
the intersection of the two ranges.
This covers D2 a multiple of D1 (each source stage feeds D2/D1 stages) and arbitrary uneven
splits (a source stage straddles two destinations, a destination takes from two sources).

- `stream_out` (sender side): one `Packed` per destination stage its layers overlap, each
  gathered into one contiguous buffer and named by global layers.
- `stream_out_layers`: the same for one layer range of the source cache only (a layer-wise
  prefill streams each layer group as soon as it is computed).
- `stream_in` (receiver side): scatters packets into the stage's cache (donated).
- `stream_out_to_logs`: the disaggregation one-liner, stream_out into the destinations' host KV
  logs through the async streamer.
- `reroute`: every stage's cache of one pipeline into every stage's cache of another (tests and
  recovery use it).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import jax

from dejavu_jax.kv.cache import KVCache
from dejavu_jax.stream import packing as gather_lib
from dejavu_jax.stream.packing import Packed, Range
from dejavu_jax.stream import transport

Splits = Sequence[Range]


def check_splits(splits: Splits) -> int:
  """Validates contiguous, non-empty stage ranges from layer 0; returns the layer count."""
  expect = 0
  for start, stop in splits:
    if start != expect or stop <= start:
      raise ValueError(f"stage ranges must be contiguous and non-empty from 0: {tuple(splits)}")
    expect = stop
  return expect


@dataclasses.dataclass(frozen=True)
class Route:
  src_stage: int
  dst_stage: int
  layers: Range  # global layers that move


def plan_routes(src: Splits, dst: Splits) -> list[Route]:
  """Every (source stage, destination stage, layer range) piece that must move."""
  if check_splits(src) != check_splits(dst):
    raise ValueError(f"pipelines hold different layer counts: {tuple(src)} vs {tuple(dst)}")
  routes = []
  for s, (a0, a1) in enumerate(src):
    for d, (b0, b1) in enumerate(dst):
      lo, hi = max(a0, b0), min(a1, b1)
      if lo < hi:
        routes.append(Route(s, d, (lo, hi)))
  return routes


def stream_out(cache: KVCache, stage: int, src: Splits, dst: Splits, *, start=0,
               size: int | None = None, positions=None,
               rows: Range | None = None) -> list[tuple[int, Packed]]:
  """Packs what source stage `stage` (holding `cache`) owes each destination stage.

  Args:
    cache: the stage's cache, layers src[stage].
    stage, src, dst: the source stage and both pipelines' splits.
    start, size: the token range (default the whole cache); or
    positions: [Bs] one position per row (a decode step's delta) instead of a range.
    rows: batch rows (default all).
  Returns:
    [(destination stage, Packed with global layers)], in destination order.
  """
  base = src[stage][0]
  if cache.num_layers != src[stage][1] - base:
    raise ValueError(f"stage {stage} owns layers {src[stage]} but its cache has "
                     f"{cache.num_layers}")
  out = []
  for r in plan_routes(src, dst):
    if r.src_stage != stage:
      continue
    local = (r.layers[0] - base, r.layers[1] - base)
    if positions is not None:
      p = gather_lib.gather_step(cache, positions, local, rows, layer_base=base)
    else:
      p = gather_lib.gather(cache, start, cache.max_len if size is None else size, local, rows,
                            layer_base=base)
    out.append((r.dst_stage, p))
  return out


def stream_out_layers(cache: KVCache, layer_base: int, layers: Range, dst: Splits, *, start=0,
                      size: int | None = None) -> list[tuple[int, Packed]]:
  """Packs global layers `layers` of `cache` (whose layer 0 is global `layer_base`) for the
  destination stages that own them: [(destination stage, Packed)], in destination order."""
  lo, hi = int(layers[0]), int(layers[1])
  if not layer_base <= lo < hi <= layer_base + cache.num_layers:
    raise ValueError(f"layers {tuple(layers)} are not inside the cache's "
                     f"[{layer_base}, {layer_base + cache.num_layers})")
  return [(d, gather_lib.gather(cache, start, cache.max_len if size is None else size,
                                (a - layer_base, b - layer_base), layer_base=layer_base))
          for d, (a, b) in owners(layers, dst)]


def owners(layers: Range, dst: Splits) -> list[tuple[int, Range]]:
  """[(destination stage, the part of global `layers` it owns)], in destination order."""
  check_splits(dst)
  lo, hi = int(layers[0]), int(layers[1])
  return [(d, (max(lo, b0), min(hi, b1))) for d, (b0, b1) in enumerate(dst)
          if max(lo, b0) < min(hi, b1)]


def stream_in(cache: KVCache, packets: Iterable[Packed], stage: int, dst: Splits) -> KVCache:
  """Scatters packets (global layers inside dst[stage]) into the stage's cache (DONATED)."""
  base = dst[stage][0]
  for p in packets:
    cache = gather_lib.scatter(cache, p, layer_base=base)
  return cache


def stream_out_to_logs(streamer, cache: KVCache, stage: int, src: Splits, dst: Splits, logs,
                       *, start=0, size: int | None = None, rows: Range | None = None,
                       key_prefix=()) -> list:
  """stream_out into `logs[d]` (destination d's HostKVLog) on the streamer; returns tickets."""
  return [streamer.submit(p, logs[d].write, key=(*key_prefix, d))
          for d, p in stream_out(cache, stage, src, dst, start=start, size=size, rows=rows)]


def reroute(caches: Sequence[KVCache], src: Splits, dst: Splits, empties: Sequence[KVCache],
            *, start=0, size: int | None = None,
            devices: Sequence[jax.Device] | None = None) -> list[KVCache]:
  """Moves every source stage's cache into the destination stages' caches.

  Args:
    caches: the source pipeline's caches, caches[s] holding layers src[s].
    src, dst: the two pipelines' splits.
    empties: destination caches (DONATED), empties[d] holding layers dst[d].
    start, size: token range to move (default all positions).
    devices: destination stage devices; packets are copied device -> device when given.
  Returns:
    the destination pipeline's caches.
  """
  inbox: list[list[Packed]] = [[] for _ in dst]
  for s, cache in enumerate(caches):
    for d, p in stream_out(cache, s, src, dst, start=start, size=size):
      inbox[d].append(transport.copy_packed(p, devices[d]) if devices is not None else p)
  return [stream_in(empties[d], inbox[d], d, dst) for d in range(len(dst))]
