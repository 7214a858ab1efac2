"""Packing (gather / scatter): a non-contiguous KV slice <-> one contiguous device buffer.

This module owns `Packed`, the unit every other part of the streaming library moves around, the
two jitted kernels that make and consume it, and `check_range`, the layer/row range check the
host log shares.

A slice of a cache is a layer range x a batch-row range x some token positions of each row. In
the cache `[L, B, S, H, K]` such a slice is many small strided pieces (one per layer, row and k/v);
`gather` copies them into one buffer so that a transfer is one large copy instead of hundreds of
small ones (the paper's "buffered copies", its largest single win). `scatter` writes a buffer back;
`write_prefix` writes a prefix (positions [0, T) of every row) back as one block (swap-ins).

    Packed.data       [2, Ls, Bs, T, H, K]   keys (index 0) and values (index 1)
    Packed.positions  [Bs, T] int32          cache position of each column, per row; -1 = unused

Positions make one format serve both kinds of slices the system streams: a token range shared by
all rows (a prompt block) and one token at a different position in each row (a decode step's
delta in a mixed-length batch). The layer and row ranges are static (a pipeline has a handful of
them); token starts and per-row positions are traced; a token range's length is padded up to its
power-of-two bucket (`models.generate.bucket_length`, the same buckets as prompts), so streaming
a growing range, or every decode step, compiles a few kernels once and never again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dejavu_jax.kv.cache import KVCache
from dejavu_jax.kv.buckets import bucket_length

Range = tuple[int, int]


@struct.dataclass
class Packed:
  """A contiguous KV slice: keys and values of some layers, rows and positions.

  Attributes:
    data: [2, Ls, Bs, T, H, K] keys then values (a device array, or numpy once flushed).
    positions: [Bs, T] int32 cache position of column t in each row; -1 marks an unused column.
    layers: (start, stop) global layer indices of the slice (static).
    rows: (start, stop) batch rows of the slice (static).
  """
  data: jax.Array
  positions: jax.Array
  layers: Range = struct.field(pytree_node=False)
  rows: Range = struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    return int(self.data.nbytes) + int(self.positions.nbytes)

  @property
  def num_layers(self) -> int:
    return self.layers[1] - self.layers[0]


def check_range(r: Range | None, size: int, what: str) -> Range:
  """`r` as a pair of ints ([0, size) when None); ValueError naming `what` if it is empty or
  leaves [0, size). Every range a packed slice or a host log is given goes through it."""
  if r is None:
    return (0, size)
  start, stop = int(r[0]), int(r[1])
  if not 0 <= start < stop <= size:
    raise ValueError(f"{what} range [{start}, {stop}) is empty or outside [0, {size})")
  return (start, stop)


def gather(cache: KVCache, start, size: int, layers: Range | None = None,
           rows: Range | None = None, *, layer_base: int = 0) -> Packed:
  """Packs positions [start, start + size) of some layers and rows into one buffer.

  Args:
    cache: the source cache (not modified, not donated).
    start: first position; an int or a device scalar (traced: no recompile per start).
    size: number of positions, a Python int (it picks the bucket).
    layers: (start, stop) layers of `cache`, default all.
    rows: (start, stop) batch rows, default all.
    layer_base: global index of the cache's layer 0 (a pipeline stage's first layer), so the
      packed slice names global layers and can be routed to a pipeline split differently.
  Returns:
    a Packed whose T is `bucket_length(size, cache.max_len)`: the range length's power-of-two
    bucket, at least 16, capped at the cache length.
  """
  layers = check_range(layers, cache.num_layers, "layer")
  rows = check_range(rows, cache.batch, "row")
  size = int(size)
  if not 0 < size <= cache.max_len:
    raise ValueError(f"token range of {size} is empty or exceeds the cache length "
                     f"{cache.max_len}")
  t = bucket_length(size, cache.max_len)
  data, pos = _gather_range(cache.k, cache.v, jnp.asarray(start, jnp.int32),
                            jnp.asarray(size, jnp.int32), layers=layers, rows=rows, t=t)
  return Packed(data=data, positions=pos,
                layers=(layers[0] + layer_base, layers[1] + layer_base), rows=rows)


def gather_step(cache: KVCache, positions: jax.Array, layers: Range | None = None,
                rows: Range | None = None, *, layer_base: int = 0) -> Packed:
  """Packs one token per row, at `positions` [Bs] (one decode step's delta; -1 = skip the row).

  `positions` indexes the rows of the slice (`rows`), not of the whole batch.
  """
  layers = check_range(layers, cache.num_layers, "layer")
  rows = check_range(rows, cache.batch, "row")
  positions = jnp.asarray(positions, jnp.int32)
  if positions.shape != (rows[1] - rows[0],):
    raise ValueError(f"positions must be [{rows[1] - rows[0]}], got {positions.shape}")
  data = _gather_at(cache.k, cache.v, positions[:, None], layers=layers, rows=rows)
  return Packed(data=data, positions=positions[:, None],
                layers=(layers[0] + layer_base, layers[1] + layer_base), rows=rows)


def scatter(cache: KVCache, packed: Packed, *, layer_base: int = 0) -> KVCache:
  """Writes a packed slice back into `cache`. `cache` is DONATED: do not use it afterwards.

  Args:
    cache: the destination cache; its buffers are donated and updated in place.
    packed: the slice (device or host arrays); its global layers, minus `layer_base`, must lie
      inside the cache's layers.
    layer_base: global index of the cache's layer 0.
  Returns:
    the updated cache; a row's length grows to one past its highest written position.
  """
  l0, l1 = packed.layers[0] - layer_base, packed.layers[1] - layer_base
  check_range((l0, l1), cache.num_layers, "layer")
  check_range(packed.rows, cache.batch, "row")
  k, v, lengths = _scatter(cache.k, cache.v, cache.lengths, jnp.asarray(packed.data),
                           jnp.asarray(packed.positions, jnp.int32), layers=(l0, l1),
                           rows=packed.rows)
  return KVCache(k=k, v=v, lengths=lengths)


def write_prefix(cache: KVCache, packed: Packed, *, layer_base: int = 0) -> KVCache:
  """Writes a prefix slice (column t at position t: `HostKVLog.read_prefix`) into `cache` as one
  block copy, and SETS its rows' lengths to one past each row's last used position. `cache` is
  DONATED. Faster than `scatter` (no per-row indices), for a cache taken over whole (a swap-in).

  Unlike `scatter`, columns marked -1 are written too (whatever the slice holds there): they lie
  at or past the row's new length, where the cache may hold anything (kv/cache.py invariant).
  """
  l0, l1 = packed.layers[0] - layer_base, packed.layers[1] - layer_base
  check_range((l0, l1), cache.num_layers, "layer")
  check_range(packed.rows, cache.batch, "row")
  if packed.data.shape[3] > cache.max_len:
    raise ValueError(f"prefix of {packed.data.shape[3]} positions exceeds the cache length "
                     f"{cache.max_len}")
  k, v, lengths = _write_prefix(cache.k, cache.v, cache.lengths, jnp.asarray(packed.data),
                                jnp.asarray(packed.positions, jnp.int32), layers=(l0, l1),
                                rows=packed.rows)
  return KVCache(k=k, v=v, lengths=lengths)


# ---- kernels: layer and row ranges and the bucket are static, everything else traced ----
@functools.partial(jax.jit, static_argnames=("layers", "rows"), donate_argnums=(0, 1, 2))
def _write_prefix(k, v, lengths, data, positions, *, layers, rows):
  (l0, l1), (r0, r1) = layers, rows
  k = k.at[l0:l1, r0:r1, :data.shape[3]].set(data[0].astype(k.dtype))
  v = v.at[l0:l1, r0:r1, :data.shape[3]].set(data[1].astype(v.dtype))
  return k, v, lengths.at[r0:r1].set(jnp.max(positions, axis=1) + 1)


@functools.partial(jax.jit, static_argnames=("layers", "rows", "t"))
def _gather_range(k, v, start, size, *, layers, rows, t):
  s = k.shape[2]
  # A dynamic slice clamps its start so the bucket stays inside the cache; the columns before
  # `start` (or past start + size) that clamping or padding pull in are marked unused.
  s0 = jnp.clip(start, 0, s - t)
  (l0, l1), (r0, r1) = layers, rows
  kk = jax.lax.dynamic_slice_in_dim(k[l0:l1, r0:r1], s0, t, axis=2)  # [Ls, Bs, T, H, K]
  vv = jax.lax.dynamic_slice_in_dim(v[l0:l1, r0:r1], s0, t, axis=2)  # [Ls, Bs, T, H, K]
  cols = s0 + jnp.arange(t, dtype=jnp.int32)                         # [T]
  valid = (cols >= start) & (cols < start + size)
  pos = jnp.broadcast_to(jnp.where(valid, cols, -1), (r1 - r0, t))  # [Bs, T]
  return jnp.stack([kk, vv]), pos


@functools.partial(jax.jit, static_argnames=("layers", "rows"))
def _gather_at(k, v, positions, *, layers, rows):
  (l0, l1), (r0, r1) = layers, rows
  pos = jnp.clip(positions, 0, k.shape[2] - 1)     # [Bs, T]
  ridx = jnp.arange(r0, r1)[:, None]               # [Bs, 1]
  return jnp.stack([k[l0:l1, ridx, pos], v[l0:l1, ridx, pos]])  # [2, Ls, Bs, T, H, K]


@functools.partial(jax.jit, static_argnames=("layers", "rows"), donate_argnums=(0, 1, 2))
def _scatter(k, v, lengths, data, positions, *, layers, rows):
  (l0, l1), (r0, r1) = layers, rows
  s = k.shape[2]
  pos = jnp.where(positions < 0, s, positions)     # [Bs, T]; out of range -> dropped
  ridx = jnp.arange(r0, r1)[:, None]               # [Bs, 1]
  k = k.at[l0:l1, ridx, pos].set(data[0].astype(k.dtype), mode="drop")
  v = v.at[l0:l1, ridx, pos].set(data[1].astype(v.dtype), mode="drop")
  top = jnp.max(positions, axis=1) + 1             # [Bs]; 0 when nothing was written
  lengths = lengths.at[r0:r1].set(jnp.maximum(lengths[r0:r1], top))
  return k, v, lengths


def to_host(packed: Packed) -> Packed:
  """The same slice with numpy arrays (blocks until the device copy is done)."""
  return packed.replace(data=np.asarray(packed.data), positions=np.asarray(packed.positions))
