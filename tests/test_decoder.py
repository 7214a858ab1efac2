"""Cached vs uncached, stages composed vs whole model, mixed lengths vs alone, no retraces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.config import tiny_config
from dejavu_jax.kv.cache import init_cache_for
from dejavu_jax.models import init_params, stage_apply, stage_params
from dejavu_jax.models.generate import generate, make_steps, pad_prompts

CFGS = [tiny_config("opt"), tiny_config("gpt2"),
        tiny_config("opt", word_embed_proj_dim=32, pre_layer_norm=False)]


@pytest.fixture(scope="module", params=range(len(CFGS)), ids=["opt", "gpt2", "opt350"])
def model(request):
  cfg = CFGS[request.param]
  return cfg, init_params(cfg, jax.random.key(request.param))


def _full_forward(cfg, params, seq):
  b, t = seq.shape
  cache = init_cache_for(cfg, cfg.num_layers, b, t)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  return stage_apply(cfg, 0, cfg.num_layers, params, cache, jnp.asarray(seq), pos)[1]


def test_cached_decode_equals_uncached_forward(model):
  cfg, params = model
  seq = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 24)).astype(np.int32)
  full = np.asarray(_full_forward(cfg, params, seq))                           # [B, T, V]
  prefill, decode = make_steps(cfg)
  tokens, positions = pad_prompts(seq[:, :8], 16, cfg.pad_token_id)
  cache = init_cache_for(cfg, cfg.num_layers, 3, 32)
  cache, logits = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(positions))
  np.testing.assert_allclose(np.asarray(logits), full[:, 7], atol=1e-5)
  for t in range(8, 24):
    cache, logits = decode(params, cache, jnp.asarray(seq[:, t]), jnp.full((3,), t, jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=1e-5)
  assert np.asarray(cache.lengths).tolist() == [24, 24, 24]


@pytest.mark.parametrize("bounds", [(0, 2, 4), (0, 1, 2, 3, 4), (0, 3, 4)])
def test_stages_compose_to_whole_model(model, bounds):
  cfg, params = model
  seq = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
  want = np.asarray(_full_forward(cfg, params, seq))
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  x = jnp.asarray(seq)
  for a, b in zip(bounds[:-1], bounds[1:]):
    cache = init_cache_for(cfg, b - a, 2, 12)
    _, x = stage_apply(cfg, a, b, stage_params(cfg, params, a, b), cache, x, pos)
  np.testing.assert_allclose(np.asarray(x), want, atol=1e-5)


def test_mixed_prompt_lengths_equal_each_alone(model):
  cfg, params = model
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 17, 9, 1)]
  together = generate(cfg, params, prompts, 10, eos_token_id=-1)
  for p, got in zip(prompts, together):
    assert generate(cfg, params, [p], 10, eos_token_id=-1)[0] == got


def test_eos_stops_a_row_and_is_kept(model):
  cfg, params = model
  prompt = [5, 6, 7, 8]
  free = generate(cfg, params, [prompt], 12, eos_token_id=-1)[0]
  eos = free[4]
  stopped = generate(cfg, params, [prompt, prompt[:2]], 12, eos_token_id=eos)
  assert stopped[0] == free[:free.index(eos) + 1]
  assert len(stopped[1]) <= 12


def test_no_retrace_over_50_decode_steps():
  cfg = tiny_config("opt", max_positions=128)
  params = init_params(cfg, jax.random.key(0))
  make_steps.cache_clear()
  prefill, decode = make_steps(cfg)
  cache = init_cache_for(cfg, cfg.num_layers, 2, 64)
  tokens, positions = pad_prompts([[4, 5], [6, 7, 8]], 16, cfg.pad_token_id)
  cache, logits = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(positions))
  pos = np.array([2, 3], np.int32)
  for _ in range(50):
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    cache, logits = decode(params, cache, nxt, jnp.asarray(pos))
    pos += 1
  assert decode._cache_size() == 1  # pylint: disable=protected-access
  assert prefill._cache_size() == 1  # pylint: disable=protected-access


def test_stale_cache_entries_are_never_read():
  """A reused cache full of garbage beyond each row's length gives the same logits."""
  cfg = tiny_config("opt")
  params = init_params(cfg, jax.random.key(1))
  prefill, decode = make_steps(cfg)
  tokens, positions = pad_prompts([[4, 5, 6]], 16, cfg.pad_token_id)
  clean = init_cache_for(cfg, cfg.num_layers, 1, 32)
  # Built before `clean` is donated, sharing no buffer with it.
  dirty = init_cache_for(cfg, cfg.num_layers, 1, 32)
  dirty = dirty.replace(k=jnp.full_like(dirty.k, 7.0), v=jnp.full_like(dirty.v, -3.0))
  outs = []
  for cache in (clean, dirty):
    cache, logits = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(positions))
    cache, logits = decode(params, cache, jnp.array([9], jnp.int32), jnp.array([3], jnp.int32))
    outs.append(np.asarray(logits))
  np.testing.assert_array_equal(outs[0], outs[1])
