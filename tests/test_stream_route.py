"""stream_out / stream_in: a cache moved between pipelines of different depths arrives whole."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.kv.cache import init_cache
from dejavu_jax.partition import balanced_ranges
from dejavu_jax.stream import route
from dejavu_jax.stream.hostlog import HostKVLog
from dejavu_jax.stream.streamer import Streamer

L, B, S, H, K = 6, 2, 24, 2, 4


def whole_cache(dtype=jnp.bfloat16):
  kk, kv = jax.random.split(jax.random.key(3))
  shape = (L, B, S, H, K)
  c = init_cache(L, B, S, H, K, dtype)
  return c.replace(k=jax.random.normal(kk, shape, dtype), v=jax.random.normal(kv, shape, dtype),
                   lengths=jnp.full((B,), S, jnp.int32))


def split_cache(cache, splits):
  return [cache.replace(k=cache.k[a:b], v=cache.v[a:b]) for a, b in splits]


def empties(splits, dtype=jnp.bfloat16, devices=None):
  out = []
  for d, (a, b) in enumerate(splits):
    c = init_cache(b - a, B, S, H, K, dtype)
    out.append(jax.device_put(c, devices[d]) if devices else c)
  return out


def test_balanced_split_and_routes():
  assert balanced_ranges(6, 4) == ((0, 2), (2, 4), (4, 5), (5, 6))
  routes = route.plan_routes(((0, 4), (4, 6)), ((0, 3), (3, 6)))
  assert [(r.src_stage, r.dst_stage, r.layers) for r in routes] == [
      (0, 0, (0, 3)), (0, 1, (3, 4)), (1, 1, (4, 6))]
  with pytest.raises(ValueError):
    route.plan_routes(((0, 3),), ((0, 4),))
  with pytest.raises(ValueError):
    route.check_splits(((0, 2), (3, 6)))


@pytest.mark.parametrize("src,dst", [
    (((0, 6),), ((0, 3), (3, 6))),                                  # 1 -> 2
    (((0, 3), (3, 6)), balanced_ranges(6, 4)),                     # 2 -> 4 (uneven 2,2,1,1)
    (((0, 1), (1, 4), (4, 6)), ((0, 4), (4, 6))),                   # 3 -> 2, uneven splits
    (((0, 2), (2, 3), (3, 6)), ((0, 5), (5, 6))),                   # a stage straddles two
])
def test_reroute_reproduces_the_whole_cache(src, dst):
  whole = whole_cache()
  devices = jax.devices()[:len(dst)]
  out = route.reroute(split_cache(whole, src), src, dst, empties(dst, devices=devices),
                      devices=devices)
  assert len(out) == len(dst)
  for d, c in enumerate(out):
    assert c.k.devices() == {devices[d]}
  rebuilt = init_cache(L, B, S, H, K, jnp.bfloat16)
  for (a, _), c in zip(dst, out):
    c = jax.device_put(c, jax.devices()[0])
    rebuilt = rebuilt.replace(k=rebuilt.k.at[a:a + c.num_layers].set(c.k),
                              v=rebuilt.v.at[a:a + c.num_layers].set(c.v),
                              lengths=jnp.maximum(rebuilt.lengths, c.lengths))
  np.testing.assert_array_equal(np.asarray(rebuilt.k), np.asarray(whole.k))
  np.testing.assert_array_equal(np.asarray(rebuilt.v), np.asarray(whole.v))
  np.testing.assert_array_equal(np.asarray(rebuilt.lengths), np.asarray(whole.lengths))


@pytest.mark.timeout(60)
def test_stream_out_into_host_logs_through_the_streamer():
  whole = whole_cache()
  src, dst = (((0, 1), (1, 4), (4, 6)), ((0, 4), (4, 6)))
  logs = [HostKVLog(b - a, B, S, H, K, whole.k.dtype, layer_base=a) for a, b in dst]
  with Streamer(num_threads=2) as streamer:
    tickets = []
    for s, cache in enumerate(split_cache(whole, src)):
      tickets += route.stream_out_to_logs(streamer, cache, s, src, dst, logs, start=0, size=20)
    for t in tickets:
      t.wait(30)
  for (a, b), log in zip(dst, logs):
    kv, lengths = log.read_host()
    np.testing.assert_array_equal(kv[0, :, :, :20], np.asarray(whole.k[a:b, :, :20]))
    np.testing.assert_array_equal(kv[1, :, :, :20], np.asarray(whole.v[a:b, :, :20]))
    np.testing.assert_array_equal(lengths, [20] * B)


def test_stream_out_step_delta():
  whole = whole_cache()
  src, dst = ((0, 6),), ((0, 2), (2, 6))
  positions = jnp.array([3, 7], jnp.int32)
  packets = route.stream_out(whole, 0, src, dst, positions=positions)
  assert [(d, p.layers) for d, p in packets] == [(0, (0, 2)), (1, (2, 6))]
  cache = route.stream_in(init_cache(4, B, S, H, K, jnp.bfloat16), [packets[1][1]], 1, dst)
  np.testing.assert_array_equal(np.asarray(cache.k[:, 1, 7]), np.asarray(whole.k[2:, 1, 7]))
  np.testing.assert_array_equal(np.asarray(cache.lengths), [4, 8])
