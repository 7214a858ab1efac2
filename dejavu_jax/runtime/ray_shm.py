"""The Ray runtime's shared-memory transport: replica writes between two actors on one node.

`SharedMemoryTransport` (the sender's side, `ray_transport="shm"`, the default) and `ShmReader`
(the receiver's mappings) move a write's bytes through a segment the sender reuses, so a 100 MB
block costs one copy in and the replica log's write out, plus one small Ray call
(benchmarks/transport.py measures it against the object store and memcpy). Everything else the
transport carries (activations, writes to another node) goes in the Ray call, as object_store.
"""

from __future__ import annotations

import dataclasses
import itertools
import mmap
import os
import threading

import numpy as np
import ray

from dejavu_jax.runtime.replication import ReplicaWrite


class SharedMemoryTransport:
  """Replica writes to an actor on this node through a shared-memory segment (module doc).

  The sender keeps one segment per receiving actor (a file in /dev/shm, grown when a write does
  not fit) and reuses it: a write is one copy into pages already mapped, then a Ray call that
  carries only the write's header; the receiver maps the segment once (and unlinks its name at
  once, so a SIGKILL of either side leaves nothing in /dev/shm beyond the sender's window
  before the first landing) and lands the data straight from the mapping into its replica log.
  Sends to one receiver are serialized by a lock and each waits for the landing, so the segment
  is never rewritten under a reader. Activations and writes to another node go as object_store.
  """
  name = "shm"
  DIR = "/dev/shm"

  def __init__(self, device=None, timeout_s: float = 30.0):
    del device
    self.timeout_s = timeout_s
    self.node = ray.get_runtime_context().get_node_id()
    self._segs: dict[str, tuple] = {}     # receiver actor id -> (lock, [mmap, path, size])
    self._lock = threading.Lock()
    self._names = itertools.count()

  def address(self):
    return None

  def send_step(self, peer, step, token: str) -> None:
    peer.submit.remote(step, token)

  def send_replica(self, peer, write: ReplicaWrite, token: str, node: str | None = None) -> int:
    data = write.packed.data
    if node != self.node or data is None:   # another node: in the call, as object_store
      return ray.get(peer.receive_replica.remote(write, token), timeout=self.timeout_s)
    data = np.asarray(data)
    key = peer._actor_id.hex()  # pylint: disable=protected-access
    with self._lock:
      lock, seg = self._segs.setdefault(key, (threading.Lock(), [None, None, 0]))
    with lock:
      if seg[2] < data.nbytes:
        self._close(seg)
        path = os.path.join(self.DIR, f"dejavu_{os.getpid()}_{next(self._names)}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
          size = max(data.nbytes, 1 << 20)
          os.ftruncate(fd, size)
          seg[:] = [mmap.mmap(fd, size), path, size]
        finally:
          os.close(fd)
      np.copyto(np.ndarray(data.shape, data.dtype, buffer=seg[0]), data)
      bare = dataclasses.replace(write, packed=write.packed.replace(data=None))
      ticket = (seg[1], seg[2], data.shape, str(data.dtype))
      return ray.get(peer.receive_replica_shm.remote(bare, ticket, token), timeout=self.timeout_s)

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


class ShmReader:
  """The receiving side's mappings of its senders' segments (by name: a sender's new segment
  replaces its old one, which is unmapped)."""

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
        os.unlink(path)   # mapped by both sides now: nothing outlives the two processes
        prefix = path.rsplit("_", 1)[0] + "_"
        for old in [p for p in self._maps if p.startswith(prefix)]:
          self._maps.pop(old).close()
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
