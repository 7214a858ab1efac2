"""The KV cache: a functional pytree per (stage, microbatch) and its slicing functions."""

from dejavu_jax.kv.cache import (KVCache, init_cache, init_cache_for, write_kv, take_layers,
                                 put_layers, take_rows, put_rows, take_tokens, put_tokens,
                                 take_step, put_step, cache_nbytes)

__all__ = ["KVCache", "init_cache", "init_cache_for", "write_kv", "take_layers", "put_layers",
           "take_rows", "put_rows", "take_tokens", "put_tokens", "take_step", "put_step",
           "cache_nbytes"]
