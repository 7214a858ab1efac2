"""A fake stage program whose tokens you can compute by hand, for serving, streaming and recovery
tests that run in milliseconds.

It has the interface of `StageProgram` (prefill/decode over a donated `KVCache` on the stage's
devices) and an arithmetic "model" in place of a transformer. Hidden states are integers mod a
prime M (1009; 251 for a bfloat16 cache, whose integers are exact only up to 256), and so is
every cache entry: stored as the cache's dtype, exactly. Each position of a layer holds 2N
entries, N = H * K (heads times head dim): entry e = 2 (h K + d) is k[.., h, d], entry e + 1 is
v[.., h, d]. At global layer g, for a token at position p in row b with layer input x:

    k[g, b, p, h, d] = (x + g + 2 (h K + d) + 1) mod M     entry e holds (x + g + e + 1) mod M
    v[g, b, p, h, d] = (x + g + 2 (h K + d) + 2) mod M
    w[g, b, j]       = sum_e c_e * entry_e(g, b, j) mod M   c_e = 1 + (e mod (M - 1)): e + 1 for
                                                            e < M - 1, never 0 mod M
    x <- (x + 1 + sum_{j <= p} w[g, b, j]) mod M

and the last stage's logits are one-hot at x mod vocab_size of each row's last written position.
Every layer's output reads every K and V entry, of every head and dim, at every position j <= p
of the row in that layer, each through a coefficient that is a unit mod M: changing any one entry
to a value that differs mod M (a V dropped or taken from another head, K and V swapped, a hole
in a restored cache, a stale entry that is not masked, a step run twice with other inputs)
changes that layer's output. Each layer's output is a bijection of its input (given what it reads)
whenever 1 + sum_e c_e is not 0 mod M (e.g. 185 for the tiny config's 4 heads of 16 dims), so the
change reaches the stage's hidden output; the token, x mod vocab_size, changes unless the two
values collide there. The masking rule is the real model's (a query at p sees keys j <= p;
position -1 writes nothing and reads nothing: x <- x + 1), so everything that relies on it (bucket
padding, reused buffers, rewinding a microbatch) is exercised as with the model.

A freshly written position's weight has a closed form, since every entry is linear in x mod M:
w = ((x + g) C1 + C2) mod M with C1 = sum_e c_e, C2 = sum_e c_e (e + 1). `fake_generate` is the
oracle: the recurrence in plain Python, one sequence at a time, keeping one weight per position
and layer (the closed form; the program computes every entry, so their equality is checked by
every test that compares them).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import ModelConfig
from dejavu_jax.kv.cache import KVCache, init_cache_for
from dejavu_jax.pipeline import plan as plan_lib
from dejavu_jax.pipeline.stage import StageSlot
from dejavu_jax.stream import packing

MOD = 1009
# bfloat16 has 8 significant bits: integers above 256 would round, and the cache must hold
# every entry exactly.
MOD_BFLOAT16 = 251


def modulus(cfg: ModelConfig) -> int:
  """M of the recurrence for `cfg`'s cache dtype (every entry in [0, M) is exact in it)."""
  return MOD_BFLOAT16 if jnp.dtype(cfg.jnp_dtype) == jnp.bfloat16 else MOD


def coefficients(cfg: ModelConfig) -> np.ndarray:
  """c_e of the 2N entries of a position (int32 [2N]), each in [1, M - 1]: a unit mod M."""
  m = modulus(cfg)
  return (1 + np.arange(2 * cfg.num_kv_heads * cfg.head_dim) % (m - 1)).astype(np.int32)


def _entries(cfg: ModelConfig, x, g):
  """(k, v) [..., H, K] int32 written for layer input x [...] at global layer g (broadcast to
  x's shape)."""
  m = modulus(cfg)
  e = jnp.arange(2 * cfg.num_kv_heads * cfg.head_dim, dtype=jnp.int32)
  base = jnp.asarray(x, jnp.int32) % m + jnp.asarray(g, jnp.int32) % m    # g broadcasts to x
  vals = (base[..., None] + e + 1) % m                                    # [..., 2N]
  vals = vals.reshape(vals.shape[:-1] + (cfg.num_kv_heads, cfg.head_dim, 2))
  return vals[..., 0], vals[..., 1]


def _weights(cfg: ModelConfig, k, v):
  """w [...] int32: sum_e c_e entry_e mod M over the (k, v) [..., H, K] of each position."""
  m = modulus(cfg)
  c = jnp.asarray(coefficients(cfg)).reshape(cfg.num_kv_heads, cfg.head_dim, 2)

  def term(a, coef):
    # Read as an integer mod M: what the program wrote is exact; garbage (a freed buffer's,
    # a corrupted copy's) is reduced in float first so a huge value cannot overflow int32.
    a = jnp.mod(jnp.round(a.astype(jnp.float32)), m).astype(jnp.int32)
    # Each product is below M^2 and each sum of N terms below N M: far inside int32.
    return ((a * coef) % m).sum(axis=(-2, -1))

  return (term(k, c[..., 0]) + term(v, c[..., 1])) % m


def _stage_step(cfg: ModelConfig, start: int, stop: int, cache: KVCache, x, positions,
                lo=0, hi=None, head: bool | None = None):
  """(cache, out): out is logits [B, V] on the last stage, else hidden [B, T] (int32). Only the
  stage's local layers [lo, hi) run (default all; traced: one program for every layer group of a
  layer-wise prefill), and `head` (default: this is the last stage) says whether they end the
  model."""
  hi = stop - start if hi is None else hi
  head = stop == cfg.num_layers if head is None else head
  m = modulus(cfg)
  if positions.ndim == 1:
    positions = positions[:, None]
  h = x if x.ndim == 2 else x[:, None]                                  # [B, T]
  h = h.astype(jnp.int32)
  s = cache.max_len
  onehot = positions[:, :, None] == jnp.arange(s)[None, None, :]        # [B, T, S]
  written = onehot.any(axis=1)[:, :, None, None]                        # [B, S, 1, 1]
  sees = jnp.arange(s)[None, None, :] <= positions[:, :, None]          # [B, T, S]

  def layer(i, carry):
    # A loop, not an unrolled Python for: compile time stays flat in the layer count (a fake
    # stage may stand for a paper-scale one, e.g. 64 layers in the disaggregation scenario).
    k, v, h = carry
    at = jnp.where(onehot, h[:, :, None], 0).sum(axis=1)               # [B, S] input at s
    new_k, new_v = _entries(cfg, at, start + i)                         # [B, S, H, K]
    ki = jnp.where(written, new_k.astype(k.dtype), k[i])
    vi = jnp.where(written, new_v.astype(v.dtype), v[i])
    k, v = k.at[i].set(ki), v.at[i].set(vi)
    # Read back from the cache's dtype, as attention would.
    w = _weights(cfg, ki, vi)                                           # [B, S]
    total = jnp.where(sees, w[:, None, :], 0).sum(axis=-1) % m          # [B, T]
    return k, v, (h + 1 + total) % m

  k, v, h = jax.lax.fori_loop(lo, hi, layer, (cache.k, cache.v, h))
  lengths = jnp.maximum(cache.lengths, positions.max(axis=1) + 1)
  cache = KVCache(k=k, v=v, lengths=lengths)
  if not head:
    return cache, h
  last = jnp.take_along_axis(h, jnp.argmax(positions, axis=1)[:, None], axis=1)[:, 0]
  return cache, jax.nn.one_hot(last % cfg.vocab_size, cfg.vocab_size, dtype=jnp.float32)


def _decode_step(cfg: ModelConfig, start: int, stop: int, cache: KVCache, x, positions):
  """`_stage_step` for one token per row (positions [B]), with the reads vectorized over the
  layers: prior[g] sums the row's weights before its position in layer g, and the loop adds the
  weight of the entries it writes at the position (the same integers)."""
  m = modulus(cfg)
  pos = positions                                                       # [B]
  h = (x if x.ndim == 1 else x[:, 0]).astype(jnp.int32)                 # [B]
  s = cache.max_len
  live = pos >= 0
  before = jnp.arange(s)[None, :] < pos[:, None]                        # [B, S]
  w = _weights(cfg, cache.k, cache.v)                                   # [L, B, S]
  prior = jnp.where(before[None], w, 0).sum(axis=-1) % m                # [L, B]

  def layer(i, carry):
    h, hs = carry
    hs = hs.at[i].set(h)
    own = _weights(cfg, *_entries(cfg, h, start + i))                   # [B]
    total = jnp.where(live, prior[i] + own, 0)
    return (h + 1 + total) % m, hs

  n = stop - start
  h, hs = jax.lax.fori_loop(0, n, layer, (h, jnp.zeros((n,) + h.shape, jnp.int32)))
  # Only each live row's entry at its position is written (in place: the cache is donated).
  rows = jnp.arange(pos.shape[0])[None, :]                              # [1, B]
  at = jnp.where(live, pos, s)[None, :]                                 # [1, B]; s: dropped
  new_k, new_v = _entries(cfg, hs, start + jnp.arange(n, dtype=jnp.int32)[:, None])  # [n, B, H, K]
  k = cache.k.at[:, rows, at].set(new_k[:, None].astype(cache.k.dtype), mode="drop")
  v = cache.v.at[:, rows, at].set(new_v[:, None].astype(cache.v.dtype), mode="drop")
  cache = KVCache(k=k, v=v, lengths=jnp.maximum(cache.lengths, pos + 1))
  if stop != cfg.num_layers:
    return cache, h[:, None]
  return cache, jax.nn.one_hot(h % cfg.vocab_size, cfg.vocab_size, dtype=jnp.float32)


def _prefill(cfg, start, stop, cache, x, positions, lo=0, hi=None, head=None):
  # Every layer group resets the lengths too: each ends with the same max(positions) + 1.
  cache = cache.replace(lengths=jnp.zeros_like(cache.lengths))
  return _stage_step(cfg, start, stop, cache, x, positions, lo, hi, head)


# Module-level and keyed by (cfg, start, stop): every engine of a test session or a failure
# campaign shares the compiled steps instead of compiling its own.
_PREFILL = jax.jit(_prefill, static_argnums=(0, 1, 2), donate_argnums=(3,))
_PREFILL_GROUP = jax.jit(_prefill, static_argnums=(0, 1, 2, 8), donate_argnums=(3,))
_DECODE = jax.jit(_decode_step, static_argnums=(0, 1, 2), donate_argnums=(3,))


class FakeProgram(StageSlot):
  """Drop-in for `StageProgram` (same constructor and calls); no params."""

  def __init__(self, cfg: ModelConfig, plan: plan_lib.StagePlan, mesh, s: int):
    super().__init__(cfg, plan, mesh, s)
    self._device = self.devices[0]

  def place_params(self, params):
    del params
    return {}

  def new_cache(self, batch: int, max_len: int) -> KVCache:
    return jax.device_put(init_cache_for(self.cfg, self.num_layers, batch, max_len), self._device)

  def place_cache(self, cache: KVCache) -> KVCache:
    return jax.device_put(cache, self._device)

  def to_stage(self, x):
    return jax.device_put(x, self._device)

  def prefill(self, params, cache: KVCache, x, positions):
    """`cache` is donated."""
    del params
    return _PREFILL(self.cfg, self.start, self.stop, cache, self.to_stage(x),
                    self.to_stage(jnp.asarray(positions, jnp.int32)))

  def _prefill_group(self, params, cache, x, positions, a, b, ranges):
    del params
    cache, out = _PREFILL_GROUP(self.cfg, self.start, self.stop, cache, x, positions,
                                jnp.int32(a - self.start), jnp.int32(b - self.start),
                                b == self.cfg.num_layers)
    size = int(positions.shape[1])
    return cache, out, [packing.gather(cache, 0, size, (r0 - self.start, r1 - self.start),
                                       layer_base=self.start) for r0, r1 in ranges]

  def decode(self, params, cache: KVCache, x, positions):
    """`cache` is donated."""
    del params
    return _DECODE(self.cfg, self.start, self.stop, cache, self.to_stage(x),
                   self.to_stage(jnp.asarray(positions, jnp.int32)))


def fake_generate(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  eos_token_id: int | None = None) -> list[list[int]]:
  """The fake model's greedy tokens, computed one sequence at a time in plain Python."""
  outs = []
  for prompt in prompts:
    weights = [[] for _ in range(cfg.num_layers)]   # per layer: w at positions 0, 1, ...
    out = []
    tok = None
    for x in prompt:
      tok = _forward(cfg, weights, x)
    while len(out) < max_new_tokens:
      out.append(tok)
      if tok == eos_token_id or len(out) == max_new_tokens:
        break
      tok = _forward(cfg, weights, tok)
    outs.append(out)
  return outs


@functools.lru_cache(maxsize=None)
def _closed_form(cfg: ModelConfig) -> tuple[int, int, int]:
  """(M, C1, C2): a fresh position's weight is ((x + g) C1 + C2) mod M."""
  m = modulus(cfg)
  c = coefficients(cfg).astype(np.int64)
  return m, int(c.sum()) % m, int((c * (1 + np.arange(c.size))).sum()) % m


def _forward(cfg: ModelConfig, weights: list, x: int) -> int:
  m, c1, c2 = _closed_form(cfg)
  h = int(x)
  for g, layer in enumerate(weights):
    layer.append(((h + g) * c1 + c2) % m)
    h = (h + 1 + sum(layer)) % m
  return h % cfg.vocab_size
