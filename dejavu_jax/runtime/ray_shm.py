"""The Ray runtime's shared-memory transport: KV between two actors on one node.

`SharedMemoryTransport` (the sender's side, `ray_transport="shm"`, the default) and `ShmReader`
(the receiver's mappings) move a message's bytes through a segment the sender reuses per
receiver, so a 100 MB block costs one copy in and the receiver's write out, plus one small Ray
call that carries only the header. One segment mechanism (`through_segment`) carries two message
kinds: a replica write (`send_replica`, landed by `receive_replica_shm` into the successor's
replica log) and a prompt layer group's KV (`send_prompt`, landed by `put_layer_shm` into a token
actor's host slot). benchmarks/transport.py measures both against the object store and memcpy.
Everything else (activations, messages to another node) goes in the Ray call, as object_store.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import mmap
import os
import threading

import numpy as np
import ray

from dejavu_jax.runtime.replication import ReplicaWrite

PREFIX = "dejavu_"
# Segment names are unique per process for its whole life (a pooled actor builds a new
# transport per pipeline; a receiver that mapped an old name must never see it again).
_NAMES = itertools.count()


class SharedMemoryTransport:
  """KV to an actor on this node through a shared-memory segment (module doc).

  The sender keeps one segment per receiving actor (a file in /dev/shm, grown when a message
  does not fit) and reuses it: a message is one copy into pages already mapped, then a Ray call
  that carries only its header; the receiver maps the segment once (and unlinks its name at
  once, so a SIGKILL of either side leaves nothing in /dev/shm beyond the sender's window
  before the first landing; `sweep` removes what a killed sender left in that window) and lands
  the data straight from the mapping. Sends to one receiver are serialized by a lock and each
  waits for the landing, so the segment is never rewritten under a reader; a send that fails
  (receiver dead, timeout) drops the segment, so a late reader never sees it rewritten either.
  """
  name = "shm"
  DIR = "/dev/shm"

  def __init__(self, device=None, timeout_s: float = 30.0):
    del device
    self.timeout_s = timeout_s
    self.node = ray.get_runtime_context().get_node_id()
    self._segs: dict[str, tuple] = {}     # receiver actor id -> (lock, [mmap, path, size])
    self._lock = threading.Lock()

  def address(self):
    return None

  def same_node(self, node: str | None) -> bool:
    return node is not None and node == self.node

  def send_step(self, peer, step, token: str) -> None:
    peer.submit.remote(step, token)

  def send_replica(self, peer, write: ReplicaWrite, token: str, node: str | None = None,
                   lane=None) -> int:
    """`lane`: a lane (ray_lane.py) to the receiver, which then carries the header instead of
    a Ray call (the landing's answer comes back on it)."""
    if not self.same_node(node) or write.packed.data is None:   # in the call, as object_store
      return ray.get(peer.receive_replica.remote(write, token), timeout=self.timeout_s)
    return self.through_segment(
        peer, write.packed,
        lambda bare, ticket: _call(peer, lane, "receive_replica_shm",
                                   dataclasses.replace(write, packed=bare), ticket, token))

  def send_prompt(self, peer, mb_id: int, packet, lengths, token: str, sender: tuple) -> None:
    """A prompt packet (host numpy) into a token actor's host slot on this node
    (`put_layer_shm`); returns once it is written there."""
    self.through_segment(
        peer, packet,
        lambda bare, ticket: peer.put_layer_shm.remote(mb_id, bare, ticket, lengths, token,
                                                       sender))

  def through_segment(self, peer, packed, call):
    """Copies `packed.data` into the segment kept for `peer`, then `call(bare, ticket)` (the
    packet without its data, and where the data lies) must return the receiver's Ray call (or
    its answer, from a lane); returns its answer once the receiver landed the data."""
    data = np.ascontiguousarray(packed.data)
    key = peer._actor_id.hex()  # pylint: disable=protected-access
    with self._lock:
      lock, seg = self._segs.setdefault(key, (threading.Lock(), [None, None, 0]))
    with lock:
      if seg[2] < data.nbytes:
        self._close(seg)
        path = os.path.join(self.DIR, f"{PREFIX}{os.getpid()}_{next(_NAMES)}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
          size = max(data.nbytes, 1 << 20)
          os.ftruncate(fd, size)
          seg[:] = [mmap.mmap(fd, size), path, size]
        finally:
          os.close(fd)
      np.copyto(np.ndarray(data.shape, data.dtype, buffer=seg[0]), data)
      ticket = (seg[1], seg[2], data.shape, str(data.dtype))
      try:
        out = call(packed.replace(data=None), ticket)
        return ray.get(out, timeout=self.timeout_s) if isinstance(out, ray.ObjectRef) else out
      except BaseException:
        self._close(seg)   # a dead or late reader: this segment is never written again
        raise

  @staticmethod
  def _close(seg: list) -> None:
    if seg[0] is not None:
      seg[0].close()
      try:
        os.unlink(seg[1])   # the receiver unlinks it on its first landing; not if none came
      except FileNotFoundError:
        pass
    seg[:] = [None, None, 0]

  def close(self) -> None:
    with self._lock:
      for _, seg in self._segs.values():
        self._close(seg)
      self._segs.clear()


def _call(peer, lane, name: str, *args):
  """The receiver's method `name`: on `lane` (answered when this returns) or as a Ray call."""
  if lane is not None:
    return lane.call((name, args))
  return getattr(peer, name).remote(*args)


def sweep(pids) -> list[str]:
  """Unlinks the segments that processes `pids` created on this node and no receiver mapped
  yet (a sender SIGKILLed in the window before its first landing); only for pids that no
  longer run here. Returns the paths removed."""
  gone = []
  for pid in set(pids):
    try:
      os.kill(pid, 0)
      continue   # alive (here): its segments are its own
    except ProcessLookupError:
      pass
    except PermissionError:
      continue
    for path in glob.glob(os.path.join(SharedMemoryTransport.DIR, f"{PREFIX}{pid}_*")):
      try:
        os.unlink(path)
        gone.append(path)
      except FileNotFoundError:
        pass
  return gone


class ShmReader:
  """The receiving side's mappings of its senders' segments (by name: a sender's new segment
  replaces its old one, which is unmapped). Both message kinds land through `view`."""

  def __init__(self):
    self._maps: dict[str, mmap.mmap] = {}
    self._lock = threading.Lock()

  def view(self, ticket) -> np.ndarray:
    path, size, shape, dtype = ticket
    with self._lock:
      m = self._maps.get(path)
      if m is None:
        fd = os.open(path, os.O_RDWR)
        try:
          m = mmap.mmap(fd, size)
        finally:
          os.close(fd)
        try:
          os.unlink(path)   # mapped by both sides now: nothing outlives the two processes
        except FileNotFoundError:
          pass
        prefix = path.rsplit("_", 1)[0] + "_"
        for old in [p for p in self._maps if p.startswith(prefix)]:
          try:
            self._maps.pop(old).close()
          except BufferError:   # a late landing still reads it: unmapped when it is done
            pass
        self._maps[path] = m
    return np.ndarray(shape, np.dtype(dtype), buffer=m)

  def close(self) -> None:
    with self._lock:
      for m in self._maps.values():
        try:
          m.close()
        except BufferError:   # a view still exported: the mapping goes with the process
          pass
      self._maps.clear()
