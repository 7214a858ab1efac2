"""KV-cache values: the cache pytree (cache.py), length buckets (buckets.py), a worker's caches by
microbatch with a placement-policy interface (store.py: all on the device; the swapping policy is
a worker-side service in `dejavu_jax.runtime.swapping`) and the device KV budget that picks the
microbatch size (budget.py). Slices of a cache (layer, row, token ranges, one step's delta) are
the streaming library's (`dejavu_jax.stream.packing`: gather / gather_step / scatter)."""

from dejavu_jax.kv.cache import KVCache, cache_nbytes, init_cache, init_cache_for, write_kv

__all__ = ["KVCache", "init_cache", "init_cache_for", "write_kv", "cache_nbytes"]
