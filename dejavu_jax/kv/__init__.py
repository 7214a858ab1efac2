"""The KV cache as a value (cache.py), a worker's caches by microbatch (store.py; placement
policies: all on the device, or swapping.py's host logs + two device buffers) and the device KV
budget that picks the microbatch size (budget.py). Slices of a
cache (layer, row, token ranges, one step's delta) are the streaming library's
(`dejavu_jax.stream.packing`: gather / gather_step / scatter)."""

from dejavu_jax.kv.cache import KVCache, cache_nbytes, init_cache, init_cache_for, write_kv

__all__ = ["KVCache", "init_cache", "init_cache_for", "write_kv", "cache_nbytes"]
