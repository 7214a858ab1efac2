"""Position schemes that act inside attention: rotary embeddings of q/k (RoPE) and ALiBi slopes.

Learned position tables are plain embeddings (models/decoder.py). Both functions here are computed
from static sizes and traced positions, with the same float32 formulas as Hugging Face, so no
table is stored and a decode step at any position needs no recompile.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> np.ndarray:
  """RoPE's inverse frequencies [K/2] (float32): theta^(-2i/K), rescaled when `scaling` (a
  ModelConfig.rope_scaling) says so. "linear" divides them all by the factor; "llama3" divides
  the low frequencies (wavelength above original_max / low_freq_factor) by the factor, keeps the
  high ones (wavelength below original_max / high_freq_factor) and interpolates in between."""
  f32 = np.float32
  inv = f32(1.0) / (f32(theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)))
  if scaling is None:
    return inv
  s = dict(scaling)
  factor = f32(s["factor"])
  if s["rope_type"] == "linear":
    return inv / factor
  low, high = f32(s["low_freq_factor"]), f32(s["high_freq_factor"])
  old = f32(s["original_max_position_embeddings"])
  wavelen = f32(2 * math.pi) / inv
  scaled = np.where(wavelen > old / low, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / high) & ~(wavelen > old / low)
  return np.where(medium, smoothed, scaled).astype(f32)


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling=None) -> jax.Array:
  """Rotates x [B, T, H, K] by its positions [B, T] (negative = padding, treated as 0).

  Hugging Face's half-split layout: dimension i pairs with i + K/2 (not adjacent pairs), angle
  position * rope_inv_freq(...)[i], computed in float32 and cast to x's dtype."""
  k = x.shape[-1]
  inv_freq = rope_inv_freq(k, theta, scaling)
  freqs = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq    # [B, T, K/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]                  # [B, T, 1, K]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = x[..., :k // 2], x[..., k // 2:]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's per-head slopes [H] (float32), for any head count: a geometric series over the
  largest power of two n <= H, then every other slope of the series for 2n (BLOOM's layout).

  A numpy constant indexed by the global head axis: under tensor parallelism the scores are split
  by heads and XLA partitions this constant with them, so each device uses its heads' slopes."""
  n = 2 ** math.floor(math.log2(num_heads))
  base = np.float32(2 ** (-(2 ** -(math.log2(n) - 3))))
  slopes = base ** np.arange(1, n + 1, dtype=np.float32)
  if n != num_heads:
    extra = np.float32(2 ** (-(2 ** -(math.log2(2 * n) - 3))))
    rest = min(n, num_heads - n)
    slopes = np.concatenate([slopes, extra ** np.arange(1, 2 * rest, 2, dtype=np.float32)])
  return slopes.astype(np.float32)
