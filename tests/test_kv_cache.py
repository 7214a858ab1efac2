"""The KV cache's slicing functions: take/put of layer, row, token and step slices."""

import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax import kv


def _cache(l=4, b=3, s=10, h=2, k=4):
  x = jnp.arange(l * b * s * h * k, dtype=jnp.float32).reshape(l, b, s, h, k)
  return kv.KVCache(k=x, v=-x, lengths=jnp.array([5, 7, 2][:b], jnp.int32))


def test_layers_roundtrip():
  c = _cache()
  part = kv.take_layers(c, 1, 3)
  assert part.k.shape[0] == 2
  empty = kv.init_cache(4, 3, 10, 2, 4)
  back = kv.put_layers(empty, 1, part)
  np.testing.assert_array_equal(back.k[1:3], c.k[1:3])
  np.testing.assert_array_equal(back.k[0], 0)


def test_rows_roundtrip():
  c = _cache()
  part = kv.take_rows(c, 1, 3)
  assert part.lengths.tolist() == [7, 2]
  back = kv.put_rows(kv.init_cache(4, 3, 10, 2, 4), 1, part)
  np.testing.assert_array_equal(back.v[:, 1:], c.v[:, 1:])
  assert back.lengths.tolist() == [0, 7, 2]


def test_tokens_and_step():
  c = _cache()
  k, v = kv.take_tokens(c, 2, 3)
  assert k.shape == (4, 3, 3, 2, 4)
  back = kv.put_tokens(kv.init_cache(4, 3, 10, 2, 4), 2, k, v)
  np.testing.assert_array_equal(back.k[:, :, 2:5], c.k[:, :, 2:5])
  assert back.lengths.tolist() == [5, 5, 5]
  pos = jnp.array([4, 6, 1])
  dk, dv = kv.take_step(c, pos)
  assert dk.shape == (4, 3, 2, 4)
  stepped = kv.put_step(kv.init_cache(4, 3, 10, 2, 4), pos, dk, dv)
  for r, p in enumerate([4, 6, 1]):
    np.testing.assert_array_equal(stepped.k[:, r, p], c.k[:, r, p])
  assert stepped.lengths.tolist() == [5, 7, 2]


def test_bad_ranges_are_named():
  c = _cache()
  with pytest.raises(ValueError, match=r"layer range \[2, 6\)"):
    kv.take_layers(c, 2, 6)
  with pytest.raises(ValueError, match=r"row range \[1, 1\)"):
    kv.take_rows(c, 1, 1)
