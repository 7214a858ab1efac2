"""gather / scatter / flush / fetch / host log: bit-exact round trips of random slices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dejavu_jax.kv.cache import KVCache, init_cache
from dejavu_jax.kv.buckets import bucket_length
from dejavu_jax.stream import packing as gather_lib
from dejavu_jax.stream import transport
from dejavu_jax.stream.packing import gather, gather_step, scatter
from dejavu_jax.stream.hostlog import HostKVLog

L, B, S, H, K = 3, 3, 40, 2, 4
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def random_cache(dtype, seed=0, lengths=None):
  kk, kv = jax.random.split(jax.random.key(seed))
  shape = (L, B, S, H, K)
  lengths = jnp.full((B,), S, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  return KVCache(k=jax.random.normal(kk, shape, dtype), v=jax.random.normal(kv, shape, dtype),
                 lengths=lengths)


def bits(x):
  """Raw bits, so equality is bit-exact whatever the float type."""
  x = np.asarray(x)
  return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def ranges(n):
  return st.tuples(st.integers(0, n - 1), st.integers(1, n)).filter(lambda r: r[0] < r[1])


@settings(max_examples=12, deadline=None)
@given(dtype=st.sampled_from(sorted(DTYPES)), layers=ranges(L), rows=ranges(B),
       start=st.integers(0, S - 1), size=st.integers(1, S), via_host=st.booleans())
def test_range_round_trip(dtype, layers, rows, start, size, via_host):
  size = min(size, S - start)
  src = random_cache(DTYPES[dtype], seed=start)
  p = gather(src, start, size, layers, rows)
  assert p.data.shape[3] == bucket_length(size, S)
  if via_host:
    p = transport.fetch_packed(transport.flush_packed(p), jax.devices()[0])
  dst = scatter(init_cache(L, B, S, H, K, DTYPES[dtype]), p)
  (l0, l1), (r0, r1) = layers, rows
  sl = (slice(l0, l1), slice(r0, r1), slice(start, start + size))
  for a, b in ((src.k, dst.k), (src.v, dst.v)):
    np.testing.assert_array_equal(bits(a[sl]), bits(b[sl]))
    mask = np.zeros((L, B, S), bool)
    mask[sl] = True
    assert not np.asarray(b, np.float32)[~mask].any(), "scatter wrote outside the slice"
  want = np.zeros(B, np.int32)
  want[r0:r1] = start + size
  np.testing.assert_array_equal(np.asarray(dst.lengths), want)


@settings(max_examples=10, deadline=None)
@given(dtype=st.sampled_from(sorted(DTYPES)), layers=ranges(L), rows=ranges(B),
       pos=st.lists(st.integers(-1, S - 1), min_size=B, max_size=B))
def test_step_round_trip(dtype, layers, rows, pos):
  src = random_cache(DTYPES[dtype], seed=7)
  (l0, l1), (r0, r1) = layers, rows
  positions = jnp.asarray(pos[r0:r1], jnp.int32)
  p = gather_step(src, positions, layers, rows)
  dst = scatter(init_cache(L, B, S, H, K, DTYPES[dtype]), transport.flush_packed(p))
  for i, row in enumerate(range(r0, r1)):
    q = pos[row]
    if q >= 0:
      np.testing.assert_array_equal(bits(src.k[l0:l1, row, q]), bits(dst.k[l0:l1, row, q]))
      np.testing.assert_array_equal(bits(src.v[l0:l1, row, q]), bits(dst.v[l0:l1, row, q]))
    assert int(dst.lengths[row]) == q + 1
  # The step slice holds each row's entry at its own position.
  k_ref = src.k[:, jnp.arange(src.batch), jnp.clip(jnp.asarray(pos, jnp.int32), 0)]
  got = np.asarray(p.data[0, :, :, 0])
  for i, row in enumerate(range(r0, r1)):
    if pos[row] >= 0:
      np.testing.assert_array_equal(bits(got[:, i]), bits(k_ref[l0:l1, row]))


@settings(max_examples=10, deadline=None)
@given(dtype=st.sampled_from(sorted(DTYPES)), layers=ranges(L), rows=ranges(B),
       prompt=st.integers(1, 20), steps=st.integers(0, 6), read_at=st.integers(0, 6))
def test_host_log_reads_any_step(dtype, layers, rows, prompt, steps, read_at):
  src = random_cache(DTYPES[dtype], seed=prompt)
  log = HostKVLog.like(src)
  log.write(gather(src, 0, prompt, layers, rows))
  for s in range(steps):
    log.append(gather_step(src, jnp.full((rows[1] - rows[0],), prompt + s), layers, rows))
  assert log.step == steps
  at = min(read_at, steps)
  got = log.read(at, layers, rows)
  n = prompt + at
  (l0, l1), (r0, r1) = layers, rows
  np.testing.assert_array_equal(bits(got.k[:, :, :n]), bits(src.k[l0:l1, r0:r1, :n]))
  np.testing.assert_array_equal(bits(got.v[:, :, :n]), bits(src.v[l0:l1, r0:r1, :n]))
  assert not np.asarray(got.k[:, :, n:], np.float32).any(), "later steps leaked into the read"
  np.testing.assert_array_equal(np.asarray(got.lengths), np.full(r1 - r0, n))


def test_flush_methods_and_fallback():
  x = jnp.arange(24, dtype=jnp.bfloat16).reshape(2, 3, 4)
  dev = jax.devices()[0]
  assert transport.host_memory_kind(dev) in ("pinned_host", "unpinned_host", None)
  for method in transport.METHODS:
    out = np.empty(x.shape, x.dtype)
    assert transport.flush(x, out, method=method) is out
    np.testing.assert_array_equal(out, np.asarray(x))
    owned = transport.flush(x, method=method)
    assert owned.flags.owndata and np.array_equal(owned, np.asarray(x))
  # A device without host memory kinds falls back to the async path.
  class Bare:
    platform = "gpu"
    def addressable_memories(self):
      raise AttributeError
  assert transport.resolve_method("pinned", Bare()) == "async"
  with pytest.raises(ValueError):
    transport.resolve_method("bogus", dev)
  # Pinned host arrays come back to the device, and device <-> device copies work.
  h = transport.start_flush(x, "pinned")
  y = transport.fetch(h, jax.devices()[1])
  assert y.devices() == {jax.devices()[1]} and np.array_equal(y, x)
  z = transport.copy_to(y, jax.devices()[2])
  assert z.devices() == {jax.devices()[2]} and np.array_equal(z, x)


def test_streaming_every_decode_step_never_recompiles():
  cache = random_cache(jnp.float32, lengths=[5, 9, 2])
  log = HostKVLog.like(cache)

  def sizes():
    return (gather_lib._gather_range._cache_size(), gather_lib._gather_at._cache_size(),
            gather_lib._scatter._cache_size())

  def one_step(i, cache):
    pos = cache.lengths + 0
    log.append(transport.flush_packed(gather_step(cache, pos)))
    p = gather(cache, 0, 10 + i % 6)              # a growing range inside one bucket
    return scatter(cache, p)

  cache = one_step(0, cache)
  before = sizes()
  for i in range(1, 12):
    cache = one_step(i, cache)
  assert sizes() == before
  assert log.step == 12


def test_bad_ranges_raise():
  cache = random_cache(jnp.float32)
  with pytest.raises(ValueError):
    gather(cache, 0, 4, layers=(2, 2))
  with pytest.raises(ValueError):
    gather(cache, 0, S + 1)
  with pytest.raises(ValueError):
    gather_step(cache, jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError):
    scatter(cache, gather(cache, 0, 4), layer_base=1)
  log = HostKVLog.like(cache)   # the host log checks its ranges with the same helper
  with pytest.raises(ValueError, match="row range"):
    log.read_host(rows=(0, B + 1))
  with pytest.raises(ValueError, match="layer range"):
    log.write(gather(cache, 0, 4, layer_base=1))
