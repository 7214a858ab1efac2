"""The Ray runtime's lanes (runtime/ray_lane.py), without Ray: order, answers, a dead receiver,
and the end of a connection as its process's death notice."""

import multiprocessing
import os
import queue
import signal
import time

import pytest

from dejavu_jax.runtime.ray_lane import (LaneClient, LaneError, LaneRemoteError, LaneServer,
                                         process_gone)


def test_messages_arrive_in_order_and_calls_are_answered():
  got = []

  def handler(msg):
    if msg[0] == "boom":
      raise ValueError("no such thing")
    got.append(msg)
    return ("answer", msg[1])

  server = LaneServer(handler, name="t")
  client = LaneClient(server.address)
  try:
    for i in range(200):
      assert client.send(("m", i))
    assert client.call(("c", 7)) == ("answer", 7)   # answered after the 200 before it
    assert got == [("m", i) for i in range(200)] + [("c", 7)]
    with pytest.raises(LaneRemoteError, match="no such thing"):
      client.call(("boom", 0))
    assert client.call(("c", 8)) == ("answer", 8)   # a handler's error keeps the lane
    big = bytes(range(256)) * 8192                 # a frame over the one-send size
    assert client.call(("c", big)) == ("answer", big)
  finally:
    client.close()
    server.close()


def test_a_send_to_a_gone_receiver_fails_and_the_lane_stays_closed():
  server = LaneServer(lambda m: None, name="t")
  client = LaneClient(server.address)
  assert client.send(("m", 0))
  server.close()
  deadline = time.monotonic() + 5
  while client.send(("m", 1)):   # the peer's close reaches this end after a send or two
    assert time.monotonic() < deadline
  assert not client.send(("m", 2))
  with pytest.raises(LaneError):
    client.call(("m", 3))
  assert not LaneClient("\0dejavu-nobody-listens-here").send(("m", 0))


def _child(address):
  c = LaneClient(address)
  c.send(("hello", os.getpid()))
  time.sleep(60)


def test_the_end_of_a_killed_process_lane_is_its_death_notice():
  closed, hello = queue.Queue(), queue.Queue()
  server = LaneServer(hello.put, on_close=closed.put, name="t")
  proc = multiprocessing.get_context("fork").Process(target=_child, args=(server.address,))
  proc.start()
  try:
    _, pid = hello.get(timeout=30)
    assert pid == proc.pid and not process_gone(pid, wait_s=0.0)
    os.kill(pid, signal.SIGKILL)
    assert closed.get(timeout=30) == pid      # the connection's peer, by SO_PEERCRED
    assert process_gone(pid)
  finally:
    proc.join(timeout=10)
    server.close()
