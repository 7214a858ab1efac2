"""The KV cache value: construction, sizes, and the positional write rule of `write_kv`."""

import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax import kv
from dejavu_jax.config import tiny_config


def test_init_and_size():
  c = kv.init_cache(4, 3, 10, 2, 4)
  assert c.k.shape == (4, 3, 10, 2, 4) and c.num_layers == 4 and c.batch == 3 and c.max_len == 10
  assert kv.cache_nbytes(c) == 2 * 4 * 3 * 10 * 2 * 4 * 4 + 3 * 4
  with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
    kv.init_cache_for(tiny_config("opt"), 2, 1, 256)


def test_write_kv_skips_negative_positions():
  c = kv.init_cache(2, 2, 6, 1, 1)
  new = jnp.ones((2, 3, 1, 1))
  pos = jnp.array([[0, 1, 2], [3, -1, -1]])
  k, v = kv.write_kv(c.k, c.v, 1, new, -new, pos)
  np.testing.assert_array_equal(np.asarray(k[1, 0, :, 0, 0]), [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(k[1, 1, :, 0, 0]), [0, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(k[0]), 0)
