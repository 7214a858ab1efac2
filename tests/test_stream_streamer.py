"""The async streamer: ordering, backpressure, error delivery, shutdown, and donation safety."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.kv.cache import init_cache
from dejavu_jax.stream.hostlog import HostKVLog
from dejavu_jax.stream.streamer import StreamClosed, StreamError, Streamer

pytestmark = pytest.mark.timeout(60)


def payload(i, n=256):
  return np.full((n,), i, np.float32)   # n * 4 bytes


@pytest.mark.parametrize("threads", [1, 3])
def test_in_order_per_key_under_concurrent_producers(threads):
  seen: dict = {}
  lock = threading.Lock()

  def deliver_for(key):
    def deliver(x):
      time.sleep(0.0005 * (hash(key) % 3))   # Different keys deliver at different speeds.
      with lock:
        seen.setdefault(key, []).append(int(x[0]))
      return int(x[0])
    return deliver

  n_producers, n_items = 4, 40
  tickets = {}
  with Streamer(num_threads=threads, max_items=8) as s:
    def produce(p):
      for mb in range(2):
        key = (p, mb)
        tickets[key] = [s.submit(payload(i, 4), deliver_for(key), key=key)
                        for i in range(n_items)]
    producers = [threading.Thread(target=produce, args=(p,)) for p in range(n_producers)]
    for t in producers:
      t.start()
    for t in producers:
      t.join()
    for key, ts in tickets.items():
      assert [t.wait(30) for t in ts] == list(range(n_items))
      assert [t.seq for t in ts] == list(range(n_items))
  assert len(seen) == n_producers * 2
  for key, order in seen.items():
    assert order == list(range(n_items)), key


def test_one_key_shared_by_producers_keeps_submission_order():
  order, got = [], []
  lock = threading.Lock()
  with Streamer(num_threads=2) as s:
    def produce(p):
      for i in range(30):
        with lock:   # The submission order is the order the lock serializes.
          order.append((p, i))
          s.submit(payload(0, 1), lambda x, tag=(p, i): got.append(tag), key="log")
    ts = [threading.Thread(target=produce, args=(p,)) for p in range(3)]
    for t in ts:
      t.start()
    for t in ts:
      t.join()
    s.drain(30)
  assert got == order


def test_backpressure_bounds_pending_memory():
  gate = threading.Event()
  item_bytes = 1024 * 4
  s = Streamer(num_threads=1, max_bytes=4 * item_bytes)
  s.submit(payload(0, 1024), lambda x: gate.wait(30))   # Blocks the only thread.
  for i in range(3):
    s.submit(payload(i, 1024), lambda x: None)
  assert s.pending() == (4, 4 * item_bytes)
  with pytest.raises(TimeoutError):
    s.submit(payload(9, 1024), lambda x: None, timeout=0.2)   # The budget is full.
  done = []
  producer = threading.Thread(
      target=lambda: done.extend(s.submit(payload(i, 1024), lambda x: None) for i in range(20)))
  producer.start()
  time.sleep(0.2)
  assert producer.is_alive() and not done, "the producer should be blocked by backpressure"
  gate.set()
  producer.join(30)
  report = s.close()
  assert s.peak_bytes <= 4 * item_bytes
  assert report.completed == 24 and not report.failed and not report.cancelled


def test_transport_error_reaches_the_waiter_and_poisons_the_key():
  def broken(x):
    raise OSError("link down")
  s = Streamer(num_threads=2)
  ok = s.submit(payload(1), lambda x: "ok", key="a")
  bad = s.submit(payload(2), broken, key="a")
  after = s.submit(payload(3), lambda x: "late", key="a")
  other = s.submit(payload(4), lambda x: "fine", key="b")
  assert ok.wait(30) == "ok"
  with pytest.raises(OSError, match="link down"):
    bad.wait(30)
  with pytest.raises(StreamError, match="earlier transfer") as info:
    after.wait(30)
  assert isinstance(info.value.__cause__, OSError)
  assert other.wait(30) == "fine"
  s.clear_error("a")
  assert s.submit(payload(5), lambda x: "again", key="a").wait(30) == "again"
  report = s.close()
  assert {t.seq for t, _ in report.failed} == {1, 2}


def test_unwaited_failure_is_raised_at_close():
  s = Streamer(num_threads=1)
  t = s.submit(payload(1), lambda x: 1 / 0)
  while not t._future.done():
    time.sleep(0.01)
  with pytest.raises(StreamError, match="nobody waited"):
    s.close()


@pytest.mark.parametrize("wait", [True, False])
def test_shutdown_with_transfers_pending(wait):
  gate, started = threading.Event(), threading.Event()
  delivered = []
  s = Streamer(num_threads=1)
  first = s.submit(payload(0), lambda x: started.set() or gate.wait(30))
  rest = [s.submit(payload(i), lambda x, i=i: delivered.append(i)) for i in range(1, 6)]
  # The first transfer must be running when close() comes (a loaded machine may not have
  # started it yet; then it would be cancelled too, which is not what this test is about).
  assert started.wait(30)
  threading.Timer(0.2, gate.set).start()
  report = s.close(wait=wait, timeout=30)
  assert first.wait(0) is True
  assert report.completed + len(report.cancelled) == 6 and not report.failed
  if wait:
    assert delivered == [1, 2, 3, 4, 5] and all(t.wait(0) is None for t in rest)
  else:
    assert delivered == [] and len(report.cancelled) == 5
    for t in rest:
      with pytest.raises(StreamClosed):
        t.wait(0)
  with pytest.raises(StreamClosed):
    s.submit(payload(9), lambda x: None)


def test_donated_buffers_are_copied_before_the_next_step():
  step = jax.jit(lambda x: x + 1, donate_argnums=0)
  x = jnp.zeros((64, 64))
  got = []
  gate = threading.Event()
  with Streamer(num_threads=1) as s:
    s.submit(None, lambda _: gate.wait(30))     # Delay delivery until after the donation.
    t = s.submit(x, lambda a: got.append(np.asarray(a).copy()), donated=True)
    y = step(x)                                    # x is donated here.
    y.block_until_ready()
    gate.set()
    t.wait(30)
  assert float(got[0].max()) == 0.0 and float(y[0, 0]) == 1.0


def test_stream_step_appends_deltas_to_a_log():
  cache = init_cache(2, 3, 16, 2, 4, jnp.float32)
  cache = cache.replace(k=jnp.arange(cache.k.size, dtype=jnp.float32).reshape(cache.k.shape),
                        v=-jnp.arange(cache.v.size, dtype=jnp.float32).reshape(cache.v.shape))
  log = HostKVLog.like(cache)
  acks = []
  with Streamer() as s:
    tickets = [s.stream_step(cache, jnp.array([i, i + 1, i + 2]), log, key=(1, 0),
                             on_done=lambda t: acks.append(t.seq)) for i in range(5)]
    assert [t.wait(30) for t in tickets] == [1, 2, 3, 4, 5]
    s.stream_tokens(cache, 0, 3, log, key=(1, 0)).wait(30)
  assert acks == [0, 1, 2, 3, 4]
  kv, lengths = log.read_host()
  np.testing.assert_array_equal(lengths, [5, 6, 7])
  np.testing.assert_array_equal(kv[0, :, 2, :7], np.asarray(cache.k[:, 2, :7]))
  np.testing.assert_array_equal(kv[1, :, 0, :5], np.asarray(cache.v[:, 0, :5]))


@pytest.mark.timeout(60)
def test_completed_tickets_are_not_retained():
  """A long-lived streamer (replication submits one transfer per stage per step) keeps no record
  of successful transfers beyond a count."""
  s = Streamer(num_threads=2)
  for i in range(200):
    s.submit(i, lambda x: x, key=i % 3)
  s.drain()
  assert not s._tickets  # pylint: disable=protected-access
  assert s.close().completed == 200
