"""The compiled decode step updates the cache in place: no copy of a whole [L, B, S, H, K] cache
in the optimized HLO (such copies made a step's cost grow with the allocated length S)."""

import re

import jax
import jax.numpy as jnp
import pytest

from dejavu_jax.config import tiny_config
from dejavu_jax.kv.cache import init_cache_for
from dejavu_jax.models import init_params
from dejavu_jax.models.generate import make_steps


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_decode_step_copies_no_whole_cache(family):
  cfg = tiny_config(family, num_layers=3, max_positions=256)
  params = init_params(cfg, jax.random.key(0))
  _, decode = make_steps(cfg)
  b, s = 4, 256
  cache = init_cache_for(cfg, cfg.num_layers, b, s)
  hlo = decode.lower(params, cache, jnp.ones((b,), jnp.int32), jnp.full((b,), 31, jnp.int32),
                     context=32).compile().as_text()
  shape = re.escape(f"[{cfg.num_layers},{b},{s},{cfg.num_kv_heads},{cfg.head_dim}]")
  assert re.search(shape, hlo), "the cache shape is not in the HLO: the check would see nothing"
  copies = re.findall(r"\w+" + shape + r"\S* copy\(", hlo)
  assert not copies, f"whole-cache copies in the decode step: {copies}"
