"""A fake stage program whose tokens you can compute by hand, for serving, streaming and recovery
tests that run in milliseconds.

It has the interface of `StageProgram` (prefill/decode over a donated `KVCache` on the stage's
devices) and an arithmetic "model" in place of a transformer. Hidden states are integers. At
global layer g, for a token at position p in row b:

    k[g, b, p, 0, 0] = h                      the layer's input is what the cache keeps
    v[g, b, p, 0, 0] = g + 1                  which layer (so which stage) wrote the entry
    h <- (h + 1 + sum_{j <= p} k[g, b, j, 0, 0]) mod 1009

and the last stage's logits are one-hot at h mod vocab_size of each row's last written position.
Every layer's output depends on every earlier entry of that layer's cache, so a restored cache
with a hole, a stale entry that is not masked, or a step run twice with other inputs changes the
tokens. The masking rule is the real model's (a query at p sees keys j <= p; position -1 writes
nothing), so everything that relies on it (bucket padding, reused buffers, rewinding a microbatch)
is exercised as with the model. `fake_generate` is the oracle: the same recurrence in plain
Python, one sequence at a time.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dejavu_jax.config import ModelConfig
from dejavu_jax.kv.cache import KVCache, init_cache_for
from dejavu_jax.pipeline import plan as plan_lib
from dejavu_jax.pipeline.stage import StageSlot
from dejavu_jax.stream import packing

MOD = 1009


def _stage_step(cfg: ModelConfig, start: int, stop: int, cache: KVCache, x, positions,
                lo=0, hi=None, head: bool | None = None):
  """(cache, out): out is logits [B, V] on the last stage, else hidden [B, T] (int32). Only the
  stage's local layers [lo, hi) run (default all; traced: one program for every layer group of a
  layer-wise prefill), and `head` (default: this is the last stage) says whether they end the
  model."""
  hi = stop - start if hi is None else hi
  head = stop == cfg.num_layers if head is None else head
  if positions.ndim == 1:
    positions = positions[:, None]
  h = x if x.ndim == 2 else x[:, None]                                  # [B, T]
  h = h.astype(jnp.int32)
  s = cache.max_len
  onehot = positions[:, :, None] == jnp.arange(s)[None, None, :]        # [B, T, S]
  written = onehot.any(axis=1)                                          # [B, S]
  sees = jnp.arange(s)[None, None, :] <= positions[:, :, None]          # [B, T, S]

  def layer(i, carry):
    # A loop, not an unrolled Python for: compile time stays flat in the layer count (a fake
    # stage may stand for a paper-scale one, e.g. 64 layers in the disaggregation scenario).
    k, v, h = carry
    new = jnp.einsum("bts,bt->bs", onehot.astype(jnp.float32), h.astype(jnp.float32))
    k0 = jnp.where(written, new, k[i, :, :, 0, 0])                       # [B, S]
    k = k.at[i, :, :, 0, 0].set(k0)
    v = v.at[i, :, :, 0, 0].set(jnp.where(written, (start + i + 1).astype(v.dtype),
                                          v[i, :, :, 0, 0]))
    total = jnp.einsum("bts,bs->bt", sees.astype(jnp.float32), k0)       # [B, T]
    return k, v, (h + 1 + jnp.round(total).astype(jnp.int32)) % MOD

  k, v, h = jax.lax.fori_loop(lo, hi, layer, (cache.k, cache.v, h))
  lengths = jnp.maximum(cache.lengths, positions.max(axis=1) + 1)
  cache = KVCache(k=k, v=v, lengths=lengths)
  if not head:
    return cache, h
  last = jnp.take_along_axis(h, jnp.argmax(positions, axis=1)[:, None], axis=1)[:, 0]
  return cache, jax.nn.one_hot(last % cfg.vocab_size, cfg.vocab_size, dtype=jnp.float32)


def _decode_step(cfg: ModelConfig, start: int, stop: int, cache: KVCache, x, positions):
  """`_stage_step` for one token per row (positions [B]), vectorized over the layers: the same
  integers, computed as the recurrence h <- (2 h + 1 + prior_g) mod 1009 per layer, where prior_g
  sums the row's cache entries before its position (exact: sums stay far below 2**24)."""
  pos = positions                                                       # [B]
  h = (x if x.ndim == 1 else x[:, 0]).astype(jnp.int32)                 # [B]
  s = cache.max_len
  live = pos >= 0
  before = (jnp.arange(s)[None, :] < pos[:, None]).astype(jnp.float32)  # [B, S]
  old_k = cache.k[:, :, :, 0, 0]                                        # [L, B, S]
  prior = jnp.round(jnp.einsum("lbs,bs->lb", old_k.astype(jnp.float32), before)
                    ).astype(jnp.int32)                                 # [L, B]

  def layer(i, carry):
    h, hs = carry
    hs = hs.at[i].set(h)
    total = jnp.where(live, prior[i] + h, 0)
    return (h + 1 + total) % MOD, hs

  h, hs = jax.lax.fori_loop(0, stop - start, layer,
                            (h, jnp.zeros((stop - start,) + h.shape, jnp.int32)))
  # Only each live row's entry at its position is written (in place: the cache is donated).
  rows = jnp.arange(pos.shape[0])[None, :]                              # [1, B]
  at = jnp.where(live, pos, s)[None, :]                                 # [1, B]; s: dropped
  n = stop - start
  layer_ids = jnp.broadcast_to((start + 1 + jnp.arange(n))[:, None], (n, pos.shape[0]))
  k = cache.k.at[:, rows, at, 0, 0].set(hs[:, None, :].astype(cache.k.dtype), mode="drop")
  v = cache.v.at[:, rows, at, 0, 0].set(layer_ids[:, None, :].astype(cache.v.dtype), mode="drop")
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
    keys = [[] for _ in range(cfg.num_layers)]   # per layer: k at positions 0, 1, ...
    out = []
    seq = list(prompt)
    tok = None
    for p, x in enumerate(seq):
      tok = _forward(cfg, keys, x)
    while len(out) < max_new_tokens:
      out.append(tok)
      if tok == eos_token_id or len(out) == max_new_tokens:
        break
      tok = _forward(cfg, keys, tok)
    outs.append(out)
  return outs


def _forward(cfg: ModelConfig, keys: list, x: int) -> int:
  h = int(x)
  for layer in keys:
    layer.append(h)
    h = (h + 1 + sum(layer)) % MOD
  return h % cfg.vocab_size

