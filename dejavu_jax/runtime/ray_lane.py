"""The Ray runtime's lanes: a pipeline's hot messages between processes of one node, on sockets.

Why: a Ray actor call costs about 1 ms round trip here (gRPC through both core workers, under
2 cores shared by every process), and one decode step of a D-stage pipeline takes D + 1 of them
(driver -> stage 0 -> ... -> stage D - 1 -> driver): measured, that messaging made a Ray step
1.22x the threads runtime's (benchmarks/runtime.py). A Unix-domain socket between two processes
of one host carries a small message in ~40 us. So, between processes on one node, the messages
on a step's path go on lanes (runtime/ray.py and ray_actor.py use them):

  driver -> actor   every `Worker` message (`submit`, `set_epoch`, `load_cache`, `free`, `arm`,
                    ...), on one connection, so they arrive in the order the driver sent them,
                    as Ray's calls to one actor do; `load_prompt` waits for its answer.
  actor -> actor    a step handed on to the next stage (`forward`).
  actor -> driver   the worker's events (results, progress, heartbeats, acks, ...).

Ray still starts, places, pools, watches and kills the actors, and carries everything else: the
spares' warm-up, disaggregation's slots, replica landings (shm transport), and any message to
another node. A lane's end is a Linux abstract socket name: no file, so a SIGKILLed process
leaves nothing behind; and the name exists only in its network namespace, which is exactly
"one node" (each node of the namespace cluster has its own).

A message is one pickle framed by its length. A lane's reader thread only hands a message on
(to a worker's inbox, to the driver's event queue), so a sender never waits on the receiver's
work. A send to a process that died fails at once (the sender's `send` returns False), and the
message is lost, as a Ray call to a dead actor is; a reader sees the death as the end of its
stream (`on_close(peer pid)`: the driver's fast death notice).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import struct
import threading
import time
import uuid
from typing import Any, Callable

_HEADER = struct.Struct("!Q")
_SMALL = 1 << 16   # below this a frame is one send (header and body joined)


def _send(sock: socket.socket, obj) -> None:
  data = pickle.dumps(obj, protocol=5)
  head = _HEADER.pack(len(data))
  if len(data) < _SMALL:
    sock.sendall(head + data)
  else:
    sock.sendall(head)
    sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
  buf = bytearray(n)
  view, got = memoryview(buf), 0
  while got < n:
    k = sock.recv_into(view[got:])
    if not k:
      raise EOFError("lane closed")
    got += k
  return buf


def _recv(sock: socket.socket):
  (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
  return pickle.loads(_recv_exact(sock, n))


def peer_pid(sock: socket.socket) -> int:
  """The pid of the process at the other end of a Unix-domain connection (SO_PEERCRED)."""
  creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
  return struct.unpack("3i", creds)[0]


def process_gone(pid: int, wait_s: float = 0.2) -> bool:
  """True when `pid` has exited (no such process, or a zombie not reaped yet). A socket closes
  a moment before its process turns zombie, so this looks again for up to `wait_s`."""
  deadline = time.monotonic() + wait_s
  while True:
    try:
      with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
      return True
    if state in ("Z", "X"):
      return True
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.005)


class LaneServer:
  """This process's lane end: accepts connections and runs `handler(message)` for each message
  on the connection's reader thread, in arrival order; a message sent with `call` gets the
  handler's return value back. `on_close(pid)` runs when a connection ends (its peer's pid)."""

  def __init__(self, handler: Callable[[Any], Any],
               on_close: Callable[[int], None] | None = None, name: str = "lane"):
    self.address = f"\0dejavu-{name}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    self._handler, self._on_close = handler, on_close
    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self._sock.bind(self.address)
    self._sock.listen(64)
    self._conns: list[socket.socket] = []
    self._lock = threading.Lock()
    self._closed = False
    threading.Thread(target=self._accept, daemon=True, name=f"{name}-accept").start()

  def _accept(self) -> None:
    while True:
      try:
        conn, _ = self._sock.accept()
      except OSError:
        return   # closed
      with self._lock:
        if self._closed:
          conn.close()
          return
        self._conns.append(conn)
      threading.Thread(target=self._read, args=(conn,), daemon=True, name="lane-reader").start()

  def _read(self, conn: socket.socket) -> None:
    try:
      pid = peer_pid(conn)
    except OSError:
      pid = -1
    try:
      while True:
        want_reply, msg = _recv(conn)
        try:
          out = (True, self._handler(msg))
        except Exception as e:  # pylint: disable=broad-except
          if not want_reply:
            logging.warning("lane: a message from pid %d failed: %s: %s", pid,
                            type(e).__name__, e)
          out = (False, f"{type(e).__name__}: {e}")
        if want_reply:
          _send(conn, out)
    except (EOFError, OSError, pickle.UnpicklingError):
      pass
    finally:
      with self._lock:
        if conn in self._conns:
          self._conns.remove(conn)
      conn.close()
      if self._on_close is not None and not self._closed:
        self._on_close(pid)

  def close(self) -> None:
    with self._lock:
      self._closed = True
      conns, self._conns = self._conns, []
    for c in [self._sock] + conns:
      try:
        c.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
      c.close()


class LaneError(ConnectionError):
  """A lane call that got no answer: the receiver is gone (or the lane broke)."""


class LaneRemoteError(RuntimeError):
  """A lane call whose handler raised on the receiving side (the receiver lives)."""


class LaneClient:
  """A connection to one `LaneServer`, made at the first send; sends keep their order."""

  def __init__(self, address: str, timeout_s: float = 30.0):
    self.address, self.timeout_s = address, timeout_s
    self._sock: socket.socket | None = None
    self._lock = threading.Lock()
    self._broken = False

  def _connected(self) -> socket.socket:
    if self._sock is None:
      if self._broken:
        raise ConnectionError(f"lane to {self.address[1:]!r} is closed")
      s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
      s.connect(self.address)
      self._sock = s
    return self._sock

  def _fail(self) -> None:
    # Once a send failed the receiver is taken for dead: a later message must not reach a
    # process that missed an earlier one (a lane keeps order, or says it failed).
    self._broken = True
    if self._sock is not None:
      self._sock.close()
      self._sock = None

  def send(self, msg) -> bool:
    """Sends `msg`; False when the receiver is gone (the message is lost)."""
    with self._lock:
      try:
        _send(self._connected(), (False, msg))
        return True
      except (OSError, ConnectionError):
        self._fail()
        return False

  def call(self, msg, timeout_s: float | None = None):
    """Sends `msg` and returns the receiver's answer (its handler's return value)."""
    with self._lock:
      try:
        sock = self._connected()
        sock.settimeout(timeout_s or self.timeout_s)
        try:
          _send(sock, (True, msg))
          ok, out = _recv(sock)
        finally:
          if self._sock is not None:
            sock.settimeout(None)
      except (OSError, EOFError, ConnectionError) as e:
        self._fail()
        raise LaneError(f"lane call {msg[0] if isinstance(msg, tuple) else msg!r}: "
                        f"{type(e).__name__}: {e}") from e
    if not ok:
      raise LaneRemoteError(out)
    return out

  def close(self) -> None:
    with self._lock:
      self._fail()
