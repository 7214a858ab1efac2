"""The host KV log: a preallocated host copy of one (worker, microbatch) cache, grown step by step.

This module owns `HostKVLog`, the destination of prompt streaming (disaggregation), the swap
space of microbatch swapping and the replica store of state replication. Its life is the
paper's log: first the prompt block (possibly layer by layer, from several sources), then one
appended delta per generated token. After every append the log records each row's length, so it
can be read back as the cache *as it was after any step* (recovery resumes at the last
acknowledged step, not necessarily the last one written).

    kv       [2, L, B, S, H, K]   keys (0) and values (1), preallocated, host numpy
    history  [S + 1, B] int32     row lengths after step s (step 0 = the prompt block)

Writes land at the positions a `Packed` names, so the log is positional: a delta for step s
sits at its token position, and reading step s returns positions below that step's lengths
(later positions are zeroed, so the slice equals the cache of that step wherever a model reads).
Every method takes the log's lock: a streamer thread writes while a recovering worker reads.
"""

from __future__ import annotations

import threading

import jax
import numpy as np

from dejavu_jax.kv.cache import KVCache
from dejavu_jax.stream import hostmem
from dejavu_jax.stream.packing import Packed, Range, check_range


class HostKVLog:
  """Host KV log of one stage's layers for one microbatch.

  Args:
    num_layers, batch, max_len, num_heads, head_dim: the cache shape [L, B, S, H, K] (H: the
      model's num_kv_heads).
    dtype: element type (the cache's).
    layer_base: global index of layer 0 here, so packed slices naming global layers land right.
    memory: the host memory policy of `kv` (stream/hostmem.py; default: the default device's,
      pinned where that device maps host buffers for DMA, pageable numpy on a CPU).
  """

  def __init__(self, num_layers: int, batch: int, max_len: int, num_heads: int, head_dim: int,
               dtype, *, layer_base: int = 0, memory: hostmem.HostMemory | None = None):
    self.memory = hostmem.policy() if memory is None else memory
    self.kv = self.memory.zeros((2, num_layers, batch, max_len, num_heads, head_dim), dtype)
    self.history = np.zeros((max_len + 1, batch), np.int32)
    self.layer_base = layer_base
    self._step = 0
    self._lock = threading.Lock()

  @classmethod
  def like(cls, cache: KVCache, *, layer_base: int = 0,
           memory: hostmem.HostMemory | None = None) -> "HostKVLog":
    """An empty log shaped like `cache` (shape and dtype only; nothing is copied)."""
    _, b, s, h, k = cache.k.shape
    return cls(cache.num_layers, b, s, h, k, cache.k.dtype, layer_base=layer_base, memory=memory)

  @property
  def num_layers(self) -> int:
    return self.kv.shape[1]

  @property
  def layers(self) -> Range:
    return (self.layer_base, self.layer_base + self.num_layers)

  @property
  def step(self) -> int:
    """Number of token deltas appended after the prompt block."""
    return self._step

  @property
  def lengths(self) -> np.ndarray:
    with self._lock:
      return self.history[self._step].copy()

  @property
  def nbytes(self) -> int:
    return self.kv.nbytes

  # ---- writing ----
  def write(self, packed: Packed) -> None:
    """Writes a slice of the current step (a prompt block, or a layer range of one)."""
    data = np.asarray(packed.data)   # On CPU a zero-copy view: the copy below is the only one.
    pos = np.asarray(packed.positions)      # [Bs, T]
    l0, l1 = packed.layers[0] - self.layer_base, packed.layers[1] - self.layer_base
    check_range((l0, l1), self.num_layers, "layer")
    r0, r1 = check_range(packed.rows, self.kv.shape[2], "row")
    if data.shape[:4] != (2, l1 - l0, r1 - r0, pos.shape[1]):
      raise ValueError(f"packed data {data.shape} does not match its ranges and positions "
                       f"{pos.shape}")
    with self._lock:
      run = _shared_run(pos)
      if run is not None:
        c0, c1, p0 = run
        self.kv[:, l0:l1, r0:r1, p0:p0 + c1 - c0] = data[:, :, :, c0:c1]
      else:
        for i in range(r1 - r0):
          cols = np.nonzero(pos[i] >= 0)[0]
          if cols.size:
            self.kv[:, l0:l1, r0 + i, pos[i, cols]] = data[:, :, i, cols]
      top = pos.max(axis=1) + 1                            # [Bs]
      cur = self.history[self._step, r0:r1]
      self.history[self._step, r0:r1] = np.maximum(cur, top)

  def new_step(self) -> int:
    """Opens the next step (lengths carried over); returns its number. `append` calls it."""
    with self._lock:
      if self._step + 1 >= self.history.shape[0]:
        raise ValueError(f"log is full: {self._step} steps in a cache of {self.kv.shape[3]}")
      self.history[self._step + 1] = self.history[self._step]
      self._step += 1
      return self._step

  def append(self, packed: Packed) -> int:
    """Writes one step's delta as a new step of the log; returns that step's number."""
    step = self.new_step()
    self.write(packed)
    return step

  def grow(self, top, rows: Range | None = None) -> None:
    """Raises the current step's row lengths to at least `top` (for writes made into `kv`
    directly, e.g. the naive piece-by-piece transport of the ablation)."""
    r0, r1 = check_range(rows, self.kv.shape[2], "row")
    with self._lock:
      cur = self.history[self._step, r0:r1]
      self.history[self._step, r0:r1] = np.maximum(cur, top)

  def reset(self) -> None:
    """Forgets every step (the microbatch slot is reused); the memory stays allocated."""
    with self._lock:
      self.history[:] = 0
      self._step = 0

  # ---- reading ----
  def read_host(self, step: int | None = None, layers: Range | None = None,
                rows: Range | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kv [2, Ls, Bs, S, H, K], lengths [Bs]) as of `step` (default the latest), on the host."""
    with self._lock:
      step = self._step if step is None else step
      if not 0 <= step <= self._step:
        raise ValueError(f"step {step} is not in the log (0..{self._step})")
      l0, l1 = (0, self.num_layers) if layers is None else (
          layers[0] - self.layer_base, layers[1] - self.layer_base)
      check_range((l0, l1), self.num_layers, "layer")
      r0, r1 = check_range(rows, self.kv.shape[2], "row")
      lengths = self.history[step, r0:r1].copy()
      kv = self.kv[:, l0:l1, r0:r1].copy()
    if step < self._step:
      # Positions written by later steps are hidden, so the slice is the cache of that step.
      live = np.arange(kv.shape[3])[None, :] < lengths[:, None]   # [Bs, S]
      kv = np.where(live[None, None, :, :, None, None], kv, np.zeros((), kv.dtype))
    return kv, lengths

  def prefix_nbytes(self, size: int) -> int:
    """Bytes of `read_prefix(size)` (data and positions), without reading."""
    _, l, b, _, h, k = self.kv.shape
    return 2 * l * b * size * h * k * self.kv.dtype.itemsize + b * size * 4

  def read_prefix(self, size: int, out: np.ndarray | None = None) -> Packed:
    """The latest step's positions [0, size) of every layer and row as one host `Packed`.

    One contiguous copy (the gather of a swap-in: the used prefix, not the whole length S),
    into `out` when given (a 1-D byte buffer of at least the prefix's bytes, reused across
    swap-ins: the pinned staging of runtime/swapping.py), else into a fresh array.
    Columns at or past a row's length are marked -1, so `packing.scatter` writes only the used
    positions and sets each row's length; `data` still holds them (stale, never written).
    """
    s = self.kv.shape[3]
    if not 0 < size <= s:
      raise ValueError(f"prefix of {size} positions is empty or exceeds the log length {s}")
    with self._lock:
      lengths = self.history[self._step].copy()
      src = self.kv[:, :, :, :size]
      if out is None:
        data = np.ascontiguousarray(src)
      else:
        if out.dtype != np.uint8 or out.ndim != 1 or out.nbytes < src.nbytes:
          raise ValueError(f"staging buffer of {out.nbytes} bytes ({out.dtype}, {out.ndim}-D) "
                           f"cannot hold a prefix of {src.nbytes} bytes (1-D uint8 expected)")
        data = out[:src.nbytes].view(src.dtype).reshape(src.shape)
        hostmem.copyto(data, src)
    cols = np.arange(size, dtype=np.int32)[None, :]
    pos = np.where(cols < lengths[:, None], cols, -1).astype(np.int32)
    return Packed(data=data, positions=pos, layers=self.layers, rows=(0, self.kv.shape[2]))

  def read(self, step: int | None = None, layers: Range | None = None,
           rows: Range | None = None, device: jax.Device | None = None) -> KVCache:
    """The log as of `step` as a KVCache on `device` (default: the default device)."""
    kv, lengths = self.read_host(step, layers, rows)
    device = device or jax.devices()[0]
    return KVCache(k=jax.device_put(kv[0], device), v=jax.device_put(kv[1], device),
                   lengths=jax.device_put(lengths, device))


def _shared_run(pos: np.ndarray):
  """(c0, c1, p0) when every row's used columns are c0..c1-1 at positions p0.. in order."""
  used = pos[0] >= 0
  cols = np.nonzero(used)[0]
  if cols.size == 0:
    return None
  c0, c1 = int(cols[0]), int(cols[-1]) + 1
  p0 = int(pos[0, c0])
  if c1 - c0 != cols.size or not (pos == pos[0]).all():
    return None
  if not (pos[0, c0:c1] == p0 + np.arange(c1 - c0)).all():
    return None
  return c0, c1, p0
