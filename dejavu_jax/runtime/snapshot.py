"""Periodic orbax snapshots of a worker's KV caches (the `snapshot` recovery strategy's state).

`Snapshotter` lives inside a worker. Every `every` steps of the worker, on the worker thread
right after the step, it takes a device copy of each in-flight microbatch's cache (`jnp.copy`:
dispatched, not waited for, so the next step may donate the originals) and hands the copies to
its one background thread. That thread brings them to host memory and writes them with an orbax
`CheckpointManager` (the save is asynchronous to the worker's steps because it runs on this
thread; orbax's own async mode is off: its extra threads raced on the temporary directory when
several workers snapshot at once) under
`directory/stage_{s}/worker_{w}/{id}` (a replacement worker never writes where a dead one may have
left a half-written checkpoint); when the checkpoint is complete it emits `SnapshotSaved` with its
path and the step of every microbatch it holds. While a save is still running, newer snapshots
are skipped (counted), so a slow disk costs staleness, never a growing queue or a stalled step.
A save that fails is counted in `errors` (the worker's `WorkerStats.snapshot_errors`, the serve
summary's `snapshot_errors`) and logged once per kind of error.

A replacement worker restores snapshot `id` from that path (`restore`), for every microbatch the
recovery plan resumes from it. Orbax keeps each worker's last `keep` complete snapshots.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dejavu_jax.kv.cache import KVCache

_LOGGED: set[str] = set()   # kinds of save error already logged in this process


def worker_dir(directory: str, stage: int, worker_id: int) -> str:
  return os.path.join(os.path.abspath(directory), f"stage_{stage}", f"worker_{worker_id}")


def _manager(path: str, keep: int) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=False)
  return ocp.CheckpointManager(path, options=opts)


class Snapshotter:
  """See module doc. `emit(path, snapshot_id, steps)` announces a complete snapshot."""

  def __init__(self, directory: str, stage: int, worker_id: int, every: int,
               emit: Callable[[str, int, dict], None], keep: int = 2):
    if every < 1:
      raise ValueError(f"snapshot_every must be >= 1, got {every}")
    self.path = worker_dir(directory, stage, worker_id)
    self.stage, self.every, self._emit = stage, every, emit
    self._mngr = _manager(self.path, keep)
    self._next_id = 0
    self._dead = threading.Event()
    self._steps = 0
    self._busy = threading.Event()
    self._jobs: queue.Queue = queue.Queue()
    self.saved = self.skipped = self.errors = 0
    self.save_s: list[float] = []          # wall time of each save, off the critical path
    self._thread = threading.Thread(target=self._run, daemon=True, name=f"snapshot-{stage}")
    self._thread.start()

  def after_step(self, caches: dict[int, tuple[KVCache, int]]) -> None:
    """Called on the worker thread after every step: mb_id -> (cache, last step run here), or
    a function returning that (called only when a snapshot is due). Host (numpy) caches, a
    swapping worker's host logs, are already copies and are kept as they are."""
    self._steps += 1
    if self._steps % self.every:
      return
    if callable(caches):
      caches = caches()
    if not caches:
      return
    if self._busy.is_set():
      self.skipped += 1
      return
    self._busy.set()
    copy = lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x  # noqa: E731
    copies = {mb: (KVCache(k=copy(c.k), v=copy(c.v), lengths=copy(c.lengths)), step)
              for mb, (c, step) in caches.items()}
    self._jobs.put((self._next_id, copies))
    self._next_id += 1

  def _run(self) -> None:
    while True:
      job = self._jobs.get()
      if job is None or self._dead.is_set():
        return
      sid, copies = job
      try:
        t0 = time.perf_counter()
        tree = {str(mb): {"k": np.asarray(c.k), "v": np.asarray(c.v),
                          "lengths": np.asarray(c.lengths), "step": np.int64(step)}
                for mb, (c, step) in copies.items()}
        del copies
        self._mngr.save(sid, args=ocp.args.StandardSave(tree))
        self._mngr.wait_until_finished()
        self.save_s.append(time.perf_counter() - t0)
        self.saved += 1
        if not self._dead.is_set():
          self._emit(self.path, sid, {int(mb): int(v["step"]) for mb, v in tree.items()})
      except Exception as e:  # pylint: disable=broad-except
        # A failed snapshot is one that never completes: recovery uses an older one or falls
        # back; the worker keeps serving. Counted (the serve summary's `snapshot_errors`) and
        # logged once per kind of error, so a broken directory does not flood the log.
        self.errors += 1
        kind = type(e).__name__
        if kind not in _LOGGED:
          _LOGGED.add(kind)
          logging.warning("snapshot %d of stage %d under %s failed (%s: %s); further %s errors "
                          "are counted, not logged", sid, self.stage, self.path, kind, e, kind)
      finally:
        self._busy.clear()

  def close(self) -> None:
    """Finishes the save in progress, then stops."""
    self._jobs.put(None)
    self._thread.join(timeout=60)
    self._mngr.close()

  def crash(self) -> None:
    """Stops without finishing or announcing anything (the worker died)."""
    self._dead.set()
    self._jobs.put(None)


def restore(path: str, snapshot_id: int) -> dict[int, tuple[KVCache, int]]:
  """Snapshot `snapshot_id` saved under `path`: mb_id -> (host KVCache of numpy arrays, step)."""
  mngr = _manager(path, keep=1_000_000)
  try:
    if snapshot_id not in mngr.all_steps():
      raise ValueError(f"no complete snapshot {snapshot_id} in {path}")
    tree = mngr.restore(snapshot_id, args=ocp.args.StandardRestore())
  finally:
    mngr.close()
  out = {}
  for mb, v in tree.items():
    out[int(mb)] = (KVCache(k=np.asarray(v["k"]), v=np.asarray(v["v"]),
                            lengths=np.asarray(v["lengths"])), int(v["step"]))
  return out

