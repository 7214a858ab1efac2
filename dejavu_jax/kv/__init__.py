"""The KV cache as a value (cache.py) and a worker's caches by microbatch (store.py). Slices of a
cache (layer, row, token ranges, one step's delta) are the streaming library's
(`dejavu_jax.stream.packing`: gather / gather_step / scatter)."""

from dejavu_jax.kv.cache import KVCache, cache_nbytes, init_cache, init_cache_for, write_kv

__all__ = ["KVCache", "init_cache", "init_cache_for", "write_kv", "cache_nbytes"]
