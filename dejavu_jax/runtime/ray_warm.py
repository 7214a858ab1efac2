"""What keeps a Ray runtime's spare actor warm (runtime/ray_actor.py): `StepLog` notes each
distinct step signature a live stage runs, and `replay` runs one on zeros in the spare, so that
its steps are traced and compiled before it takes a stage."""

from __future__ import annotations

import threading

import numpy as np

from dejavu_jax.models.generate import decode_context


class StepLog:
  """A stage program that notes each distinct step signature it runs (kind, input shape and
  dtype, positions, cache size) and hands each new one to `on_new`: what a warm spare replays so
  that a replacement's first steps are already traced (module doc). Everything else is the
  program's own."""

  def __init__(self, program, on_new):
    self._program, self._on_new = program, on_new
    self.calls: list[tuple] = []
    self._seen: set = set()
    self._lock = threading.Lock()

  def __getattr__(self, name):
    return getattr(self._program, name)

  def prefill(self, params, cache, x, positions):
    self._note("prefill", cache, x, positions)
    return self._program.prefill(params, cache, x, positions)

  def decode(self, params, cache, x, positions):
    self._note("decode", cache, x, positions)
    return self._program.decode(params, cache, x, positions)

  def _note(self, kind, cache, x, positions) -> None:
    pos = np.asarray(positions)
    # A decode compiles per context bucket (models/generate.decode_context), a prefill per
    # shape: the signature keeps what picks the program.
    context = decode_context(pos, cache.max_len) if kind == "decode" else None
    key = (kind, tuple(x.shape), str(x.dtype), pos.shape, context, cache.batch, cache.max_len)
    with self._lock:
      if key in self._seen:
        return
      self._seen.add(key)
      call = (kind, tuple(x.shape), str(x.dtype), pos.copy(), cache.batch, cache.max_len)
      self.calls.append(call)
    self._on_new([call])


def replay(program, params, call) -> None:
  """Runs one noted step signature on zeros (a warm spare tracing and compiling it)."""
  import jax  # pylint: disable=g-import-not-at-top
  kind, shape, dtype, positions, batch, max_len = call
  cache = program.new_cache(batch, max_len)
  x = program.to_stage(np.zeros(shape, np.dtype(dtype)))
  fn = program.prefill if kind == "prefill" else program.decode
  jax.block_until_ready(fn(params, cache, x, positions))
