"""Sampling and input validation of the generation loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.config import tiny_config
from dejavu_jax.models import init_params
from dejavu_jax.models.generate import SamplingConfig, generate, sample
from dejavu_jax.kv.buckets import bucket_length

CFG = tiny_config("opt", max_positions=64)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def test_bucket_length():
  assert [bucket_length(n, 1024) for n in (1, 16, 17, 100, 2000)] == [16, 16, 32, 128, 1024]


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.key(0)
  greedy = sample(logits, keys)
  assert set(np.asarray(greedy).tolist()) == {0}
  top2 = np.asarray(sample(logits, keys, temperature=1.0, top_k=2))
  assert set(top2.tolist()) == {0, 1}
  assert abs((top2 == 0).mean() - 0.5 / 0.8) < 0.05
  topp = np.asarray(sample(logits, keys, temperature=1.0, top_p=0.9))
  assert set(topp.tolist()) == {0, 1, 2}
  full = np.asarray(sample(logits, keys, temperature=1.0))
  assert abs((full == 3).mean() - 0.05) < 0.02


def test_sampled_generation_is_reproducible(params):
  s = SamplingConfig(temperature=0.8, top_k=20)
  a = generate(CFG, params, [[4, 5, 6]], 8, s, key=jax.random.key(3), eos_token_id=-1)
  b = generate(CFG, params, [[4, 5, 6]], 8, s, key=jax.random.key(3), eos_token_id=-1)
  c = generate(CFG, params, [[4, 5, 6]], 8, s, key=jax.random.key(4), eos_token_id=-1)
  assert a == b and a != c


@pytest.mark.parametrize("prompts,new,match", [
    ([[1] * 60], 8, "prompt 0 of 60 tokens \\+ 8 new tokens is longer than the context of 64"),
    ([[3, 4], []], 4, "prompt 1 is empty"),
    ([[3, 400]], 4, "token id 400 outside the vocabulary \\[0, 128\\)"),
    ([[3, -1]], 4, "token id -1 outside the vocabulary"),
    ([], 4, "no prompts"),
    ([[3]], 0, "max_new_tokens must be >= 1"),
])
def test_bad_input_is_named(params, prompts, new, match):
  with pytest.raises(ValueError, match=match):
    generate(CFG, params, prompts, new)


def test_bad_sampling_config():
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)


def test_decode_n_loop_equals_generate(params):
  """The jitted multi-step decode loop (benchmarks use it) gives generate()'s greedy tokens."""
  from dejavu_jax.kv.cache import init_cache_for  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models.generate import make_decode_n, make_steps, pad_prompts  # pylint: disable=g-import-not-at-top
  prompts = [[4, 5, 6], [7, 8, 9, 10, 11]]
  want = generate(CFG, params, prompts, 9, eos_token_id=-1, max_len=32)
  prefill, _ = make_steps(CFG)
  tokens, positions = pad_prompts(prompts, 16, CFG.pad_token_id)
  cache = init_cache_for(CFG, CFG.num_layers, 2, 32)
  cache, logits = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(positions))
  first = jnp.argmax(logits, -1).astype(jnp.int32)
  _, new = make_decode_n(CFG, 8)(params, cache, first, jnp.array([3, 5], jnp.int32),
                                 jax.random.key(0))
  got = np.concatenate([np.asarray(first)[:, None], np.asarray(new)], axis=1)
  assert got.tolist() == want
