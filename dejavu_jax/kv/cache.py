"""KVCache: the keys and values of one stage for one microbatch, as a value.

Shape vocabulary: L layers of the stage, B batch rows, S cache length (max tokens), H key/value
heads (the model's num_kv_heads: fewer than its query heads under grouped-query attention),
K head dim, T tokens of a slice.

    k, v     [L, B, S, H, K]
    lengths  [B] int32, tokens written per row (positions 0..lengths-1 are valid)

Every function here is pure: it returns a new cache (or a slice of one) and never mutates. These
slicing functions are what the streaming library, microbatch swapping and state replication build
on: a *layer range* (a stage split differently), a *row range* (a microbatch inside a batch), a
*token range* (a prompt block or one step's delta), and a per-row *step* (one token written at a
different position in each row, for mixed-length batches).

Invariant: a position at or beyond a row's length may hold stale data (a freed slot, padding of a
prompt bucket); attention never reads it, because the mask admits key position j for a query at
position p only when j <= p, and every position below p was written first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
  k: jax.Array        # [L, B, S, H, K]
  v: jax.Array        # [L, B, S, H, K]
  lengths: jax.Array  # [B] int32

  @property
  def num_layers(self) -> int:
    return self.k.shape[0]

  @property
  def batch(self) -> int:
    return self.k.shape[1]

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init_cache(num_layers: int, batch: int, max_len: int, num_heads: int, head_dim: int,
               dtype=jnp.float32) -> KVCache:
  """An empty cache (zeros, lengths 0)."""
  shape = (num_layers, batch, max_len, num_heads, head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 lengths=jnp.zeros((batch,), jnp.int32))


def init_cache_for(cfg, num_layers: int, batch: int, max_len: int) -> KVCache:
  """An empty cache for `num_layers` layers of model `cfg` (a ModelConfig)."""
  if max_len > cfg.max_positions:
    raise ValueError(f"cache length {max_len} exceeds the model's {cfg.max_positions} positions")
  return init_cache(num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_dtype)


def cache_nbytes(cache: KVCache) -> int:
  return cache.k.nbytes + cache.v.nbytes + cache.lengths.nbytes


def write_kv(k_all: jax.Array, v_all: jax.Array, layer: int, k_new: jax.Array,
             v_new: jax.Array, positions: jax.Array):
  """Writes new keys/values of one layer at per-row positions.

  Args:
    k_all, v_all: [L, B, S, H, K] stacked caches.
    layer: static layer index into L.
    k_new, v_new: [B, T, H, K].
    positions: [B, T] int32; a negative position marks padding and is not written.
  Returns:
    the updated (k_all, v_all).
  """
  s = k_all.shape[2]
  # Out-of-range indices are dropped by the scatter: padding never lands in the cache.
  pos = jnp.where(positions < 0, s, positions)
  rows = jnp.arange(k_all.shape[1])[:, None]
  k_all = k_all.at[layer, rows, pos].set(k_new.astype(k_all.dtype), mode="drop")
  v_all = v_all.at[layer, rows, pos].set(v_new.astype(v_all.dtype), mode="drop")
  return k_all, v_all


# ---- layer ranges (static) ----
def take_layers(cache: KVCache, start: int, stop: int) -> KVCache:
  """Layers [start, stop) of the cache, as a cache of stop - start layers."""
  _check_range("layer", start, stop, cache.num_layers)
  return cache.replace(k=cache.k[start:stop], v=cache.v[start:stop])


def put_layers(cache: KVCache, start: int, part: KVCache) -> KVCache:
  """Writes `part` into layers [start, start + part.num_layers)."""
  _check_range("layer", start, start + part.num_layers, cache.num_layers)
  return cache.replace(k=cache.k.at[start:start + part.num_layers].set(part.k),
                       v=cache.v.at[start:start + part.num_layers].set(part.v),
                       lengths=jnp.maximum(cache.lengths, part.lengths))


# ---- batch-row ranges (static) ----
def take_rows(cache: KVCache, start: int, stop: int) -> KVCache:
  """Rows [start, stop) of every layer (a microbatch inside a larger batch)."""
  _check_range("row", start, stop, cache.batch)
  return KVCache(k=cache.k[:, start:stop], v=cache.v[:, start:stop],
                 lengths=cache.lengths[start:stop])


def put_rows(cache: KVCache, start: int, part: KVCache) -> KVCache:
  """Writes `part` (same layers and length) into rows [start, start + part.batch)."""
  stop = start + part.batch
  _check_range("row", start, stop, cache.batch)
  return KVCache(k=cache.k.at[:, start:stop].set(part.k), v=cache.v.at[:, start:stop].set(part.v),
                 lengths=cache.lengths.at[start:stop].set(part.lengths))


# ---- token ranges (start may be traced; the size is static) ----
def take_tokens(cache: KVCache, start, size: int) -> tuple[jax.Array, jax.Array]:
  """Keys and values of positions [start, start + size) of every row: ([L, B, T, H, K]) * 2."""
  if size > cache.max_len:
    raise ValueError(f"token range of {size} exceeds the cache length {cache.max_len}")
  k = jax.lax.dynamic_slice_in_dim(cache.k, start, size, axis=2)
  v = jax.lax.dynamic_slice_in_dim(cache.v, start, size, axis=2)
  return k, v


def put_tokens(cache: KVCache, start, k: jax.Array, v: jax.Array) -> KVCache:
  """Writes a token block [L, B, T, H, K] at positions [start, start + T) of every row.

  Row lengths grow to at least start + T.
  """
  k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), start, axis=2)
  v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), start, axis=2)
  lengths = jnp.maximum(cache.lengths, jnp.asarray(start, jnp.int32) + k.shape[2])
  return KVCache(k=k_all, v=v_all, lengths=lengths)


# ---- one decode step's delta, at a different position per row ----
def take_step(cache: KVCache, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The entries at `positions` [B] of each row: ([L, B, H, K]) * 2. One step's delta."""
  rows = jnp.arange(cache.batch)
  return cache.k[:, rows, positions], cache.v[:, rows, positions]


def put_step(cache: KVCache, positions: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
  """Writes a step delta ([L, B, H, K]) at `positions` [B]; lengths become >= positions + 1."""
  rows = jnp.arange(cache.batch)
  pos = jnp.where(positions < 0, cache.max_len, positions)
  return KVCache(k=cache.k.at[:, rows, pos].set(k.astype(cache.k.dtype), mode="drop"),
                 v=cache.v.at[:, rows, pos].set(v.astype(cache.v.dtype), mode="drop"),
                 lengths=jnp.maximum(cache.lengths, positions + 1))


def _check_range(what: str, start: int, stop: int, size: int) -> None:
  if not 0 <= start < stop <= size:
    raise ValueError(f"{what} range [{start}, {stop}) is empty or outside [0, {size})")
