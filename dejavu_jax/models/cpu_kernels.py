"""Hand-written XLA:CPU custom calls for the decode step: float32 matmuls over packed weights, and
attention over the stacked KV cache in place.

A decode step multiplies a few rows (the batch) by every weight matrix once: its floor is the time
to stream the weights from memory. XLA:CPU's dots run these at a quarter to a third of the read
bandwidth. `cpu_kernels.cc` reads weights packed once (`pack`: [K, N] -> [ceil(N/32), K, 32], 32-
column panels stored k-major, so one sequential stream) past an 8-row x 32-column register tile
(benchmarks/decode_matmul.py, cases `ffi/*`). This module owns building that source (g++ on first
use, `-march=native`, cached under ~/.cache/dejavu_jax/kernels, keyed by source, compiler, CPU
flags and jaxlib), registering it as an FFI target, packing, and `packed_matmul`.

Block-quantized weights: a float32 kernel whose values are, block by block of 32 along K, exactly
those of a GGUF Q4_1 or Q8_0 tensor (the real SmolLM2's) is found by `pack_quantized` from its
values and stored as its blocks (0.19 / 0.28 of the float32 bytes); `packed_matmul` reads such a
packing through `dejavu_q_matmul`, which rebuilds each weight bit for bit in registers.

Who uses it: `models.generate.decode_params` packs a model's Dense kernels (and a tied LM head)
for the decode steps of `make_steps`, `make_decode_n` and the pipeline's `StageProgram`, when the
params live on one CPU device, `available()` is true, and `DEJAVU_CPU_KERNELS` is not `0`. Prefill
and every other backend keep XLA's dot; a missing compiler or failed build falls back to it with
one warning. A row's result depends only on its own input row (same k order whatever the batch),
so microbatches and batch sizes decode exactly as the whole batch does. Both calls split their
work over XLA:CPU's intra-op thread pool (one thread under the single-threaded flags), with the
same results at any thread count. `attend_decode` is the decode attention over the stacked cache
in place (16 positions scored at once where the head dim is a multiple of 16).
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

PANEL = 32
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
_TARGETS = {"dejavu_packed_matmul": "DejavuPackedMatmul",
            "dejavu_q_matmul": "DejavuQMatmul",
            "dejavu_attend_decode": "DejavuAttendDecode"}
# Block-quantized layouts (cpu_kernels.cc): blocks of Q_BLOCK values along K, groups of Q_GROUP
# columns interleaved block by block; bytes per block: Q4_1 d, m (float32) + 16 nibble bytes,
# Q8_0 d (float32) + 32 int8.
Q_BLOCK, Q_GROUP, Q4_BYTES, Q8_BYTES = 32, 8, 24, 36
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]

_lock = threading.Lock()
# pack_quantized's results by (shape, SHA-1 of the float32 bytes), least recently used first
_QUANTIZED: "collections.OrderedDict[tuple, np.ndarray]" = collections.OrderedDict()
_QUANTIZED_MAX_BYTES = 512 << 20
_state: dict = {"ready": None, "error": None, "path": None}


def _cache_dir() -> str:
  return os.environ.get("DEJAVU_KERNEL_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "dejavu_jax", "kernels")


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("flags"):
          return line
  except OSError:
    pass
  return ""


def _library_path(compiler: str) -> str:
  h = hashlib.sha256()
  with open(_SOURCE, "rb") as f:
    h.update(f.read())
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  import jaxlib
  for part in (version, _cpu_flags(), jaxlib.__version__, " ".join(_FLAGS)):
    h.update(part.encode())
  return os.path.join(_cache_dir(), f"cpu_kernels_{h.hexdigest()[:16]}.so")


def _build() -> str:
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise RuntimeError("no C++ compiler (g++) on PATH")
  path = _library_path(compiler)
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Built under a private name and renamed: concurrent test workers never load half a file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
  os.replace(tmp, path)
  return path


def available() -> bool:
  """Whether the custom calls are built and registered (builds them on the first call)."""
  if os.environ.get("DEJAVU_CPU_KERNELS", "1") == "0":
    return False
  if _state["ready"] is not None:
    return _state["ready"]
  with _lock:
    if _state["ready"] is None:
      try:
        path = _build()
        lib = ctypes.cdll.LoadLibrary(path)
        for target, symbol in _TARGETS.items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                      platform="cpu")
        _state.update(ready=True, path=path, lib=lib)
      except Exception as e:  # noqa: BLE001  (any build or load failure means: use XLA's dot)
        logging.warning("dejavu_jax CPU matmul kernels unavailable, using XLA's dot: %s", e)
        _state.update(ready=False, error=str(e))
  return _state["ready"]


def status() -> dict:
  """Whether the custom calls are built, where from, and why not (a test's skip reason, a log)."""
  return {"cpu_matmul_kernels": bool(available()), "library": _state["path"],
          "error": _state["error"]}


@jax.jit
def pack(w: jax.Array) -> jax.Array:
  """[K, N] float32 -> [ceil(N / PANEL), K, PANEL] panels (columns past N zero)."""
  k, n = w.shape
  panels = -(-n // PANEL)
  w = jnp.pad(w, ((0, 0), (0, panels * PANEL - n)))
  return w.reshape(k, panels, PANEL).transpose(1, 0, 2)


def _candidates(d0: np.ndarray):
  """d0 (float16) and its two float16 neighbours, as float32: where the value was rounded."""
  up = np.nextafter(d0, np.float16(np.inf))
  down = np.nextafter(d0, np.float16(-np.inf))
  return [c.astype(np.float32) for c in (d0, up, down)]


def _fit(v: np.ndarray, fmt: str):
  """Per block of v [B, 32]: (ok [B], d [B], m [B], q [B, 32]) with the block's values equal to
  q * d + m bit for bit (fmt "q4_1": q in 0..15; "q8_0": q in -128..127 and m = 0)."""
  if fmt == "q4_1":
    m = v.min(-1)
    d0 = ((v.max(-1) - m) / np.float32(15)).astype(np.float16)
    lo, hi = 0, 15
  else:
    m = np.zeros(len(v), np.float32)
    d0 = (np.abs(v).max(-1) / np.float32(127)).astype(np.float16)
    lo, hi = -128, 127
  ok = np.zeros(len(v), bool)
  d = np.zeros(len(v), np.float32)
  q = np.zeros(v.shape, np.float32)
  todo = np.arange(len(v))
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    for cand in _candidates(d0):   # each later candidate only where the earlier ones failed
      c, vt, mt = cand[todo], v[todo], m[todo]
      qc = np.rint((vt - mt[:, None]) / c[:, None])
      qc[~(c > 0)] = 0
      np.clip(qc, lo, hi, out=qc)
      rebuilt = qc * c[:, None] + mt[:, None]
      good = np.isfinite(c) & (c >= 0) & (rebuilt.view(np.uint32) == vt.view(np.uint32)).all(-1)
      hit = todo[good]
      ok[hit], d[hit], q[hit] = True, c[good], qc[good]
      todo = todo[~good]
      if not todo.size:
        break
  return ok, d, m, q


def pack_quantized(w) -> jax.Array | None:
  """[K, N] float32 -> the block-quantized layout of `cpu_kernels.cc` ([ceil(N/8), K/32, 8,
  bytes] uint8), when every block of 32 values along K in every column is exactly q * d + m with
  d a float16 >= 0 and either q in 0..15 (Q4_1: what a GGUF Q4_1 tensor dequantizes to) or q in
  -128..127, m = 0 (Q8_0); None otherwise (random or trained float32 weights fail at the first
  blocks checked, and the caller keeps the float32 panels). Decided from the values alone, so
  every copy of the same weights (a pipeline stage's, a restored replica's) packs the same way
  and decodes with the same numerics; the custom call's weights equal `w` bit for bit."""
  device = next(iter(w.devices())) if isinstance(w, jax.Array) else None
  w = np.asarray(w)
  if w.ndim != 2 or w.dtype != np.float32 or w.shape[0] % Q_BLOCK or w.size == 0:
    return None
  k, n = w.shape
  kb, groups = k // Q_BLOCK, -(-n // Q_GROUP)
  # column 0's first blocks: float32 weights that are not block-quantized fail here, cheaply
  head = np.ascontiguousarray(w[:min(kb, 4) * Q_BLOCK, 0]).reshape(-1, Q_BLOCK)
  formats = [f for f in (("q4_1", Q4_BYTES), ("q8_0", Q8_BYTES)) if _fit(head, f[0])[0].all()]
  if not formats:
    return None
  # The whole check costs ~1 s per 100 M weights; copies of the same weights (every pipeline
  # stage, engine and test builds its own arrays) are recognised by a digest instead (~0.1 s).
  w = np.ascontiguousarray(w)
  key = (w.shape, hashlib.sha1(memoryview(w).cast("B")).digest())
  with _lock:
    hit = _QUANTIZED.get(key)
    if hit is not None:
      _QUANTIZED.move_to_end(key)
  if hit is not None:
    return jax.device_put(hit, device)
  blocks = np.ascontiguousarray(w.T).reshape(n * kb, Q_BLOCK)
  for fmt, nbytes in formats:
    ok, d, m, q = _fit(blocks, fmt)
    if not ok.all():
      continue
    out = np.zeros((groups * Q_GROUP, kb, nbytes), np.uint8)   # padded columns: zero blocks
    out[:n, :, 0:4] = d.reshape(n, kb, 1).view(np.uint8)
    if fmt == "q4_1":
      q = q.astype(np.uint8).reshape(n, kb, Q_BLOCK)
      out[:n, :, 4:8] = m.reshape(n, kb, 1).view(np.uint8)
      out[:n, :, 8:24] = q[..., :16] | (q[..., 16:] << 4)
    else:
      out[:n, :, 4:36] = q.astype(np.int8).reshape(n, kb, Q_BLOCK).view(np.uint8)
    out = np.ascontiguousarray(out.reshape(groups, Q_GROUP, kb, nbytes).transpose(0, 2, 1, 3))
    with _lock:
      _QUANTIZED[key] = out
      while sum(x.nbytes for x in _QUANTIZED.values()) > _QUANTIZED_MAX_BYTES:
        _QUANTIZED.popitem(last=False)
    return jax.device_put(out, device)   # beside the weights
  return None


def unpack_quantized(packed: jax.Array, n: int) -> jax.Array:
  """The [K, N] float32 matrix of a `pack_quantized` one (jnp: the non-CPU path, the tests)."""
  groups, kb, _, nbytes = packed.shape
  blk = packed.transpose(0, 2, 1, 3).reshape(groups * Q_GROUP, kb, nbytes)[:n]
  d = jax.lax.bitcast_convert_type(blk[..., 0:4], jnp.float32)
  if nbytes == Q4_BYTES:
    m = jax.lax.bitcast_convert_type(blk[..., 4:8], jnp.float32)
    qs = blk[..., 8:24]
    q = jnp.concatenate([qs & 15, qs >> 4], axis=-1).astype(jnp.float32)
    w = q * d[..., None] + m[..., None]
  else:
    q = jax.lax.bitcast_convert_type(blk[..., 4:36], jnp.int8).astype(jnp.float32)
    w = q * d[..., None]
  return w.reshape(n, kb * Q_BLOCK).T


def pack_weights(w) -> jax.Array:
  """The packing a decode step reads `w` [K, N] through: its blocks where its values are exactly
  block-quantized (`pack_quantized`), else float32 panels (`pack`)."""
  q = pack_quantized(w)
  return pack(w) if q is None else q


def packed_matmul(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] float32, with `packed` = pack(w) (float32 panels) or
  pack_quantized(w) (uint8 blocks). The custom call on the CPU; elsewhere the same product by
  XLA."""
  k = x.shape[-1]
  lead = x.shape[:-1]
  x2 = x.reshape(math.prod(lead), k).astype(jnp.float32)
  quantized = packed.dtype == jnp.uint8

  def custom(a, w):
    out = jax.ShapeDtypeStruct((a.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call("dejavu_q_matmul" if quantized else "dejavu_packed_matmul", out)(a, w)

  def xla(a, w):
    if quantized:
      return a @ unpack_quantized(w, n)
    return jnp.einsum("mk,pkc->mpc", a, w).reshape(a.shape[0], -1)[:, :n]

  y = jax.lax.platform_dependent(x2, packed, cpu=custom, default=xla) if available() \
      else xla(x2, packed)
  return y.reshape(*lead, n)


def attend_decode(q, k_all, v_all, layer: int, context: int, k_new, v_new, q_pos, scale: float,
                  slopes, fallback):
  """`layers.attend_decode` over layer `layer`'s first `context` positions of the stacked
  float32 cache k_all, v_all [L, B, S, Hkv, K], read in place by the custom call on the CPU
  (no per-layer slice copy, no transposed copy for grouped queries); `fallback()` elsewhere.
  q [B, H, K] already scaled when the family scales queries (then `scale` is 1)."""
  if not available():
    return fallback()
  h = q.shape[1]
  sl = jnp.zeros((h,), jnp.float32) if slopes is None else jnp.asarray(slopes, jnp.float32)

  def custom(q, k_all, v_all, k_new, v_new, q_pos, sl):
    call = jax.ffi.ffi_call("dejavu_attend_decode", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_all, v_all, k_new, v_new, q_pos.astype(jnp.int32), sl,
                layer=np.int64(layer), context=np.int64(context), scale=np.float32(scale))

  def other(*_):
    return fallback()

  return jax.lax.platform_dependent(q, k_all, v_all, k_new, v_new, q_pos, sl, cpu=custom,
                                    default=other)
