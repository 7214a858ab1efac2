"""The per-worker CacheStore and the replication halves on their own (no engine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.runtime.replication import ReplicaGap, ReplicaStore, ReplicationTap
from dejavu_jax.kv.cache import init_cache
from dejavu_jax.kv.store import AllOnDevice, CacheStore, StoreFull


def _new():
  return init_cache(2, 3, 16, 2, 4, jnp.float32)


def test_all_on_device_pool_reuses_its_buffers():
  store = CacheStore(AllOnDevice(_new, num_buffers=2))
  before = store.live_device_bytes()
  a, b = store.for_prefill(10), store.for_prefill(11)
  assert a is not b and store.mb_ids() == [10, 11]
  with pytest.raises(StoreFull, match="no free cache buffer for microbatch 12"):
    store.for_prefill(12)
  store.release(10)
  assert store.for_prefill(12) is a            # the freed buffer, not a new allocation
  store.release(11)
  store.install(7, _new())                      # a cache that arrived from elsewhere
  assert store.mb_ids() == [7, 12] and 7 in store
  assert store.live_device_bytes() == before    # no allocation grows the footprint
  with pytest.raises(KeyError, match="no cache for microbatch 99"):
    store.get(99)


def _entries(step, shape):
  """Keys and values of `shape` [..., H, K] all different from each other, in every layer, row,
  head and dim, and from those of another step: a log that drops V, swaps K and V or mis-slices
  an axis cannot read back equal."""
  k = 1000.0 * (step + 1) + jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  return k, -k - 0.5


def _prompt_cache():
  cache = _new()
  k, v = _entries(0, cache.k.shape)
  return cache.replace(k=k, v=v, lengths=jnp.array([4, 4, 4]))


def _step_cache(cache, step, positions):
  """The cache after a decode step that wrote step's entries at `positions` [B] of every layer."""
  rows, pos = jnp.arange(cache.batch), jnp.asarray(positions, jnp.int32)
  k, v = _entries(step, (2, 3, 2, 4))
  return cache.replace(k=cache.k.at[:, rows, pos].set(k), v=cache.v.at[:, rows, pos].set(v),
                       lengths=jnp.maximum(cache.lengths, pos + 1))


def test_replica_store_rejects_gaps_and_reads_only_what_it_holds():
  store, acks = ReplicaStore(), []
  cache = _new()
  tap = ReplicationTap(0, 0, lambda w: acks.append(store.write(w)) or acks[-1])
  cache = cache.replace(lengths=jnp.array([4, 4, 4]))
  tap.after_step(5, 0, cache, None, "prefill", 4)
  tap.streamer.drain()
  assert acks == [0]
  from dejavu_jax.runtime.replication import ReplicaWrite  # pylint: disable=g-import-not-at-top
  from dejavu_jax.stream import packing  # pylint: disable=g-import-not-at-top
  bad = ReplicaWrite(stage=0, mb_id=5, gen=0, step=2, block=False,
                     packed=packing.gather_step(cache, jnp.array([5, 5, 5])),
                     shape=tuple(cache.k.shape), dtype=cache.k.dtype, layer_base=0)
  with pytest.raises(ReplicaGap, match="does not extend the log at step 0"):
    store.write(bad)
  with pytest.raises(ValueError, match="holds steps 0..0, not 3"):
    store.read(0, 5, 3)
  store.drop(5)
  with pytest.raises(ReplicaGap, match="already left the pipeline"):
    store.write(bad)


def test_failed_transfer_is_never_acknowledged_and_the_log_heals():
  """Transfer of step 3 fails: no ack for 3, later deltas are not acked until the tap resent the
  whole cache; every acked step reads back equal to the cache as of that step."""
  store, acked = ReplicaStore(), []

  def send(w):
    if w.step == 3:
      raise ConnectionError("link down")
    step = store.write(w)
    acked.append(step)
    return step

  tap = ReplicationTap(1, 0, send)
  cache = _prompt_cache()
  snapshots = {}
  tap.after_step(0, 0, cache, None, "prefill", 4)
  snapshots[0] = jax.device_get(cache)
  for step in range(1, 9):
    positions = np.full(3, 3 + step)
    cache = _step_cache(cache, step, positions)
    tap.after_step(0, step, cache, positions, "decode", 3 + step)
    tap.streamer.drain()
    snapshots[step] = jax.device_get(cache)
  # Each step is drained before the next, so the failure is known by step 4, which resends the
  # whole cache as a block: the log restarts there.
  assert acked == [0, 1, 2, 4, 5, 6, 7, 8] and tap.failed_transfers == 1
  with pytest.raises(ValueError, match="holds steps 4..8, not 2"):
    store.read(1, 0, 2)
  for step in acked[3:]:
    kv, _ = store.read(1, 0, step)
    want = snapshots[step]
    upto = 4 + step
    # Every layer, row, head and dim of both K and V, at every position the step holds.
    np.testing.assert_array_equal(kv[0][:, :, :upto], np.asarray(want.k)[:, :, :upto])
    np.testing.assert_array_equal(kv[1][:, :, :upto], np.asarray(want.v)[:, :, :upto])
  tap.close()
