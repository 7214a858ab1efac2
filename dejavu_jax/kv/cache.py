"""KVCache: the keys and values of one stage for one microbatch, as a value.

Shape vocabulary: L layers of the stage, B batch rows, S cache length (max tokens), H key/value
heads (the model's num_kv_heads: fewer than its query heads under grouped-query attention),
K head dim, T tokens of a slice.

    k, v     [L, B, S, H, K]
    lengths  [B] int32, tokens written per row (positions 0..lengths-1 are valid)

Every function here is pure: it returns a new cache and never mutates. Slices of a cache (a layer
range for a stage split differently, a row range, a token range such as a prompt block, one decode
step's per-row delta) are the streaming library's `gather` / `gather_step` / `scatter`
(stream/packing.py), which streaming, swapping and replication all use.

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


def write_kv_layers(k_all: jax.Array, v_all: jax.Array, k_new: jax.Array, v_new: jax.Array,
                    positions: jax.Array):
  """Writes one new token's keys/values of every layer at once, where `write_kv` writes one
  layer: per row, one `dynamic_update_slice` of [L, 1, 1, H, K] (XLA updates those in place in a
  donated cache; a scatter made XLA:CPU copy the whole cache first).

  Args:
    k_all, v_all: [L, B, S, H, K] stacked caches.
    k_new, v_new: [L, B, 1, H, K].
    positions: [B, 1] int32; a negative position marks a row that writes nothing.
  """
  for b in range(k_all.shape[1]):
    p = positions[b, 0]
    at = (0, b, jnp.maximum(p, 0), 0, 0)
    for name in ("k", "v"):
      cache, new = (k_all, k_new) if name == "k" else (v_all, v_new)
      upd = new[:, b:b + 1].astype(cache.dtype)                                # [L, 1, 1, H, K]
      old = jax.lax.dynamic_slice(cache, at, upd.shape)
      cache = jax.lax.dynamic_update_slice(cache, jnp.where(p >= 0, upd, old), at)
      if name == "k":
        k_all = cache
      else:
        v_all = cache
  return k_all, v_all
