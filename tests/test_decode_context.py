"""A decode step at a bucketed context with one write for all layers equals the per-layer write
over the whole cache (the layout and numerics the streaming library, swapping and replication
rely on), and a row at position -1 writes nothing."""

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import tiny_config
from dejavu_jax.kv.cache import init_cache_for, write_kv, write_kv_layers
from dejavu_jax.models import init_params
from dejavu_jax.models.decoder import stage_apply
from dejavu_jax.models.generate import decode_context, make_steps


def test_write_kv_layers_equals_write_kv_per_layer():
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.normal(size=(3, 4, 16, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, 4, 16, 2, 8)), jnp.float32)
  nk = jnp.asarray(rng.normal(size=(3, 4, 1, 2, 8)), jnp.float32)
  nv = jnp.asarray(rng.normal(size=(3, 4, 1, 2, 8)), jnp.float32)
  pos = jnp.array([[5], [0], [-1], [15]], jnp.int32)
  gk, gv = write_kv_layers(k, v, nk, nv, pos)
  wk, wv = k, v
  for layer in range(3):
    wk, wv = write_kv(wk, wv, layer, nk[layer], nv[layer], pos)
  np.testing.assert_array_equal(gk, wk)
  np.testing.assert_array_equal(gv, wv)
  np.testing.assert_array_equal(gk[:, 2], k[:, 2])   # position -1: untouched


def test_decode_at_a_bucketed_context_equals_the_whole_cache():
  cfg = tiny_config("llama")
  params = init_params(cfg, jax.random.key(0))
  prefill, decode = make_steps(cfg)
  toks = jnp.tile(jnp.arange(3, 19, dtype=jnp.int32)[None], (2, 1))
  pos = jnp.tile(jnp.arange(16, dtype=jnp.int32)[None], (2, 1))
  cache, _ = prefill(params, init_cache_for(cfg, cfg.num_layers, 2, 128), toks, pos)
  step_pos = np.array([16, 16], np.int32)
  x = jnp.array([5, 7], jnp.int32)
  want_cache, want = stage_apply(cfg, 0, cfg.num_layers, params,
                                 jax.tree.map(jnp.copy, cache), x[:, None],
                                 jnp.asarray(step_pos)[:, None])
  assert decode_context(step_pos, 128) == 32
  got_cache, got = decode(params, cache, x, jnp.asarray(step_pos),
                          context=decode_context(step_pos, 128))
  np.testing.assert_allclose(got, want[:, 0], rtol=1e-5, atol=1e-5)
  # The bucketed step attends with layers.attend_decode, the whole-cache one with `attend`: the
  # same function in another summation order, so deeper layers' entries differ by rounding only.
  np.testing.assert_allclose(got_cache.k, want_cache.k, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_cache.v, want_cache.v, rtol=1e-5, atol=1e-5)
