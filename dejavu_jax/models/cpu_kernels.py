"""Hand-written XLA:CPU custom calls for the decode step: float32 matmuls over packed weights, and
attention over the stacked KV cache in place.

A decode step multiplies a few rows (the batch) by every weight matrix once: its floor is the time
to stream the weights from memory. XLA:CPU's dots run these at a quarter to a third of the read
bandwidth. `cpu_kernels.cc` reads weights packed once (`pack`: [K, N] -> [ceil(N/32), K, 32], 32-
column panels stored k-major, so one sequential stream) past an 8-row x 32-column register tile
(benchmarks/decode_matmul.py, cases `ffi/*`). This module owns building that source (g++ on first
use, `-march=native`, cached under ~/.cache/dejavu_jax/kernels, keyed by source, compiler, CPU
flags and jaxlib), registering it as an FFI target, packing, and `packed_matmul`.

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
            "dejavu_attend_decode": "DejavuAttendDecode"}
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]

_lock = threading.Lock()
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


def packed_matmul(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] float32, with `packed` = pack(w). The custom call on the
  CPU; elsewhere the same product by XLA from the panels."""
  k = x.shape[-1]
  lead = x.shape[:-1]
  x2 = x.reshape(math.prod(lead), k).astype(jnp.float32)

  def custom(a, w):
    out = jax.ShapeDtypeStruct((a.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call("dejavu_packed_matmul", out)(a, w)

  def xla(a, w):
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
