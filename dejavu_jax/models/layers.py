"""Decoder building blocks of every family: attention over an explicit KV cache (grouped-query,
RoPE or ALiBi when the family says so), MLP (plain or gated), norms, the decoder block.

Shape vocabulary: B batch, T new tokens, S cache length, D hidden, H query heads, Hkv key/value
heads, G = H / Hkv queries per KV head, K head dim. The cache is passed in and returned (never kept
in a Flax collection), so a caller can slice it per microbatch, stream it, swap it or restore it.
What differs between families is read from `models.families.get(cfg.family)`, never from a
comparison of family names.

On one CPU device a decode step (`generate.decode_params`: a `packed` collection beside the
params) runs its float32 products and its attention through the custom calls of
`models.cpu_kernels` (`Dense`, `Attention`); everywhere else, and for prefill, the XLA
formulations below (`attend`, `attend_decode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dejavu_jax.config import ModelConfig
from dejavu_jax.kv.cache import write_kv
from dejavu_jax.models import cpu_kernels
from dejavu_jax.models import positions as positions_lib
from dejavu_jax.models import families


class Dense(nn.Module):
  """`flax.linen.Dense` (same parameters, names, initializers and dtype rules), plus: when the
  variables passed to `apply` carry a `packed` collection holding this layer's kernel packed by
  `cpu_kernels.pack` (the decode steps' `generate.decode_params`), the product reads that copy
  through the CPU custom call instead of XLA's dot."""
  features: int
  use_bias: bool = True
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    packed = self.get_variable("packed", "kernel")
    if packed is not None and x.dtype == jnp.float32:
      y = cpu_kernels.packed_matmul(x, packed, self.features)
    else:
      y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias


def _dense(cfg: ModelConfig, features: int, name: str, use_bias: bool | None = None) -> Dense:
  use_bias = families.get(cfg.family).bias if use_bias is None else use_bias
  return Dense(features, use_bias=use_bias, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype,
               name=name)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, with the statistics in float32 and the scale applied after casting back
  (Hugging Face's LlamaRMSNorm order)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.cfg.jnp_dtype)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.cfg.layer_norm_eps)
    return scale * h.astype(x.dtype)


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
  if families.get(cfg.family).norm == "rmsnorm":
    return RMSNorm(cfg, name=name)
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.jnp_dtype,
                      param_dtype=cfg.jnp_dtype, name=name)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, scale: float,
           scale_queries: bool, slopes: np.ndarray | None = None) -> jax.Array:
  """Causal attention of new queries over a cache.

  Args:
    q: [B, T, H, K] queries. k, v: [B, S, Hkv, K] the cache, new entries already written; query
      head h reads KV head h // G.
    q_pos: [B, T] position of each query (negative for padding).
    scale: the score scale (usually 1/sqrt(K)). scale_queries: OPT scales q before the product,
      the others the scores after (kept apart so float32 logits match Hugging Face to the bits).
    slopes: [H] ALiBi slopes, or None: adds slopes[h] * key position to the scores (softmax is
      shift-invariant per query, so this equals the distance bias, and is what BLOOM computes).
  Returns:
    [B, T, H, K].
  """
  if scale_queries:
    q = q * jnp.asarray(scale, q.dtype)
  b, t, h, kd = q.shape
  hkv = k.shape[2]
  if t == 1:
    return _attend_one(q[:, 0], k, v, q_pos[:, 0], scale, scale_queries, slopes)[:, None]
  q = q.reshape(b, t, hkv, h // hkv, kd)                                       # [B, T, Hkv, G, K]
  scores = jnp.einsum("BTHGK,BSHK->BHGTS", q, k, preferred_element_type=jnp.float32)
  if not scale_queries:
    scores = scores * scale
  key_pos = jnp.arange(k.shape[1])
  if slopes is not None:
    bias = slopes.reshape(hkv, -1)[:, :, None, None] * key_pos.astype(jnp.float32)  # [Hkv, G, 1, S]
    scores = scores + bias
  # Key j is visible to a query at position p iff j <= p: every position below p has been written,
  # so stale entries beyond a row's length (padding, a freed slot) are never read.
  mask = key_pos[None, None, :] <= q_pos[:, :, None]                           # [B, T, S]
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)                      # [B, Hkv, G, T, S]
  out = jnp.einsum("BHGTS,BSHK->BTHGK", probs, v)
  return out.reshape(b, t, h, kd)


def _attend_one(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, scale: float,
                scale_queries: bool, slopes: np.ndarray | None) -> jax.Array:
  """`attend` for one query per row (a decode step): q [B, H, K] (already scaled for OPT),
  q_pos [B]; returns [B, H, K].

  Both products are a multiply and a sum over the cache in its own [B, S, Hkv, K] layout, fused by
  XLA with the read of the layer's slice. The einsums of `attend` lower, for T == 1, to a
  transposed copy of every layer's cache slice plus B * H tiny matrix-vector products. On the
  2-core development CPU (OPT-125M shapes, 256 positions) this path with
  generate.CPU_COMPILER_OPTIONS took a decode step from about 35 to 30 ms at batch 1 and from 88
  to 77 ms at batch 8 (medians). Without those options it is slower than the einsums (see there).
  """
  f32 = jnp.float32
  b, h, kd = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, 1, hkv, h // hkv, kd)                                       # [B, 1, Hkv, G, K]
  scores = jnp.sum(q.astype(f32) * k[:, :, :, None].astype(f32), axis=-1)      # [B, S, Hkv, G]
  if not scale_queries:
    scores = scores * scale
  key_pos = jnp.arange(k.shape[1])
  if slopes is not None:
    scores = scores + key_pos.astype(f32)[:, None, None] * slopes.reshape(hkv, -1)
  mask = key_pos[None, :] <= q_pos[:, None]                                    # [B, S]
  scores = jnp.where(mask[:, :, None, None], scores, jnp.finfo(f32).min)
  probs = jax.nn.softmax(scores, axis=1)                                        # [B, S, Hkv, G]
  out = jnp.sum(probs[..., None] * v[:, :, :, None].astype(f32), axis=1)        # [B, Hkv, G, K]
  return out.reshape(b, h, kd).astype(v.dtype)


def attend_decode(q: jax.Array, k_old: jax.Array, v_old: jax.Array, k_new: jax.Array,
                  v_new: jax.Array, q_pos: jax.Array, scale: float, scale_queries: bool,
                  slopes: np.ndarray | None) -> jax.Array:
  """One decode query per row over an old cache slice plus the row's new entry, which is not in
  the slice: the result equals `attend` over the slice with the new entry written at q_pos.

  q [B, H, K]; scale and scale_queries as in `attend`; k_old, v_old [B, C, Hkv, K]: entries at
  positions below q_pos are read, the rest (stale or unwritten) never; k_new, v_new [B, Hkv, K];
  q_pos [B] (a negative position is a padding row: nothing visible, a finite result). Returns
  [B, H, K]. The softmax runs over the slice and the new entry together.

  Two formulations, chosen by the heads per KV head G (benchmarks/decode_matmul.py, cases
  step_* and attn_*, one CPU, process CPU time): with G == 1 (OPT, GPT-2, BLOOM) multiply + sum
  in the cache's own layout (`attend_decode_mulsum`): a batch-8 OPT-125M step at 256 positions
  took 90 instead of 129 ms of CPU time with the dots (13-14% less under the earlier
  CPU_COMPILER_OPTIONS); the dots' einsums copy every layer's K slice transposed to
  [B, Hkv, K, C] first. With G > 1 (SmolLM2) the dots (`attend_decode_einsum`): the multiply +
  sum materializes G products of the slice, and its batch-8 step took 2.2x the CPU time.
  """
  if q.shape[1] == k_old.shape[2]:
    return attend_decode_mulsum(q, k_old, v_old, k_new, v_new, q_pos, scale, scale_queries,
                                slopes)
  return attend_decode_einsum(q, k_old, v_old, k_new, v_new, q_pos, scale, scale_queries, slopes)


def attend_decode_einsum(q: jax.Array, k_old: jax.Array, v_old: jax.Array, k_new: jax.Array,
                         v_new: jax.Array, q_pos: jax.Array, scale: float, scale_queries: bool,
                         slopes: np.ndarray | None) -> jax.Array:
  """`attend_decode` with both products as dots (YNNPACK on CPU). Measured on the 2-core
  development CPU, 30 SmolLM2 layers at 256 positions, batch 8: about half the time of
  `_attend_one` over a slice with the entry written in."""
  f32 = jnp.float32
  if scale_queries:
    q = q * jnp.asarray(scale, q.dtype)
  b, h, kd = q.shape
  hkv = k_old.shape[2]
  q = q.reshape(b, hkv, h // hkv, kd)                                          # [B, Hkv, G, K]
  scores = jnp.einsum("BHGK,BSHK->BHGS", q, k_old, preferred_element_type=f32)  # [B, Hkv, G, C]
  new = jnp.einsum("BHGK,BHK->BHG", q, k_new, preferred_element_type=f32)       # [B, Hkv, G]
  if not scale_queries:
    scores, new = scores * scale, new * scale
  key_pos = jnp.arange(k_old.shape[1])
  if slopes is not None:
    sl = jnp.asarray(slopes, f32).reshape(hkv, -1)                             # [Hkv, G]
    scores = scores + sl[:, :, None] * key_pos.astype(f32)
    new = new + sl * q_pos.astype(f32)[:, None, None]
  neg = jnp.finfo(f32).min
  scores = jnp.where((key_pos[None, :] < q_pos[:, None])[:, None, None], scores, neg)
  new = jnp.where((q_pos >= 0)[:, None, None], new, neg)
  top = jnp.maximum(jnp.max(scores, axis=-1), new)                             # [B, Hkv, G]
  probs = jnp.exp(scores - top[..., None])
  p_new = jnp.exp(new - top)
  denom = jnp.sum(probs, axis=-1) + p_new
  out = jnp.einsum("BHGS,BSHK->BHGK", probs.astype(v_old.dtype), v_old,
                   preferred_element_type=f32)
  out = (out + p_new[..., None] * v_new[:, :, None].astype(f32)) / denom[..., None]
  return out.reshape(b, h, kd).astype(v_old.dtype)


def _decode_scores_tail(scores, new, q_pos, key_pos, scale, scale_queries, slopes, hkv):
  """Scale, bias and mask of decode scores [B, C, Hkv, G] and new [B, Hkv, G]."""
  f32 = jnp.float32
  if not scale_queries:
    scores, new = scores * scale, new * scale
  if slopes is not None:
    sl = jnp.asarray(slopes, f32).reshape(hkv, -1)
    scores = scores + key_pos.astype(f32)[:, None, None] * sl
    new = new + sl * q_pos.astype(f32)[:, None, None]
  neg = jnp.finfo(f32).min
  scores = jnp.where((key_pos[None, :] < q_pos[:, None])[:, :, None, None], scores, neg)
  new = jnp.where((q_pos >= 0)[:, None, None], new, neg)
  return scores, new


def attend_decode_mulsum(q: jax.Array, k_old: jax.Array, v_old: jax.Array, k_new: jax.Array,
                         v_new: jax.Array, q_pos: jax.Array, scale: float, scale_queries: bool,
                         slopes: np.ndarray | None) -> jax.Array:
  """`attend_decode` with both products as multiply + sum in the cache's own [B, C, Hkv, K]
  layout: XLA loop fusions that read the slice in place (no transposed copy, no library call)."""
  f32 = jnp.float32
  if scale_queries:
    q = q * jnp.asarray(scale, q.dtype)
  b, h, kd = q.shape
  hkv = k_old.shape[2]
  q = q.reshape(b, hkv, h // hkv, kd).astype(f32)                              # [B, Hkv, G, K]
  scores = jnp.sum(q[:, None] * k_old[:, :, :, None].astype(f32), axis=-1)     # [B, C, Hkv, G]
  new = jnp.sum(q * k_new[:, :, None].astype(f32), axis=-1)                    # [B, Hkv, G]
  key_pos = jnp.arange(k_old.shape[1])
  scores, new = _decode_scores_tail(scores, new, q_pos, key_pos, scale, scale_queries, slopes, hkv)
  top = jnp.maximum(jnp.max(scores, axis=1), new)                              # [B, Hkv, G]
  probs = jnp.exp(scores - top[:, None])
  p_new = jnp.exp(new - top)
  denom = jnp.sum(probs, axis=1) + p_new
  out = jnp.sum(probs[..., None] * v_old[:, :, :, None].astype(f32), axis=1)   # [B, Hkv, G, K]
  out = (out + p_new[..., None] * v_new[:, :, None].astype(f32)) / denom[..., None]
  return out.reshape(b, h, kd).astype(v_old.dtype)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, k_all, v_all, layer: int, positions, context: int | None = None):
    """x [B, T, D]; k_all, v_all [L, B, S, Hkv, K] (this stage's caches); layer indexes L.

    Returns (out, k_all, v_all) with this layer's new entries written, or, with `context` (a
    decode step: static, > every position of the step), (out, k, v): the new entries [B, T, Hkv,
    K] for the caller to write for all layers at once, attention having read only the first
    `context` positions. Why: writing each layer into the stacked cache and then reading that
    layer back made XLA:CPU copy the whole cache once per layer, so a decode step cost grew with
    the allocated length S rather than with the context; one write after the last layer is in
    place (the cache is donated) and the reads are slices of the old cache."""
    cfg, fam = self.cfg, families.get(self.cfg.family)
    b, t, _ = x.shape
    h, hkv, kd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = _dense(cfg, h * kd, "q_proj")(x).reshape(b, t, h, kd)                  # [B, T, H, K]
    k = _dense(cfg, hkv * kd, "k_proj")(x).reshape(b, t, hkv, kd)              # [B, T, Hkv, K]
    v = _dense(cfg, hkv * kd, "v_proj")(x).reshape(b, t, hkv, kd)
    if fam.positions == "rope":
      q = positions_lib.rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
      k = positions_lib.rope(k, positions, cfg.rope_theta, cfg.rope_scaling)
    slopes = positions_lib.alibi_slopes(h) if fam.positions == "alibi" else None
    scale = kd**-0.5 if cfg.attn_scale is None else cfg.attn_scale
    if context is None:
      k_all, v_all = write_kv(k_all, v_all, layer, k, v, positions)
      out = attend(q, k_all[layer], v_all[layer], positions, scale, fam.scale_queries, slopes)
    elif t == 1:
      # Attend over the old cache slice as it is, plus the new entry apart: writing the new entry
      # into a slice first materialized a copy of every layer's slice (measured: half of a batch-8
      # SmolLM2 attention at 256 positions).
      def xla():
        return attend_decode(q[:, 0], k_all[layer, :, :context], v_all[layer, :, :context],
                             k[:, 0], v[:, 0], positions[:, 0], scale, fam.scale_queries, slopes)
      # Packed params (generate.decode_params: one CPU device) select the CPU custom calls.
      if "q_proj" in self.variables.get("packed", {}) and k_all.dtype == jnp.float32:
        qs = q[:, 0] * jnp.asarray(scale, q.dtype) if fam.scale_queries else q[:, 0]
        out = cpu_kernels.attend_decode(qs, k_all, v_all, layer, context, k[:, 0], v[:, 0],
                                        positions[:, 0], 1.0 if fam.scale_queries else scale,
                                        slopes, xla)[:, None]
      else:
        out = xla()[:, None]
    else:
      k_seen, v_seen = write_kv(k_all[layer:layer + 1, :, :context],
                                v_all[layer:layer + 1, :, :context], 0, k, v, positions)
      out = attend(q, k_seen[0], v_seen[0], positions, scale, fam.scale_queries, slopes)
    out = _dense(cfg, cfg.hidden_size, "out_proj")(out.reshape(b, t, h * kd))
    if context is None:
      return out, k_all, v_all
    return out, k, v


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg, fam = self.cfg, families.get(self.cfg.family)
    if fam.gated_mlp:  # SwiGLU: down(act(gate(x)) * up(x))
      h = fam.activation(_dense(cfg, cfg.ffn_dim, "gate_proj")(x))              # [B, T, F]
      h = h * _dense(cfg, cfg.ffn_dim, "up_proj")(x)
      return _dense(cfg, cfg.hidden_size, "down_proj")(h)
    h = fam.activation(_dense(cfg, cfg.ffn_dim, "fc1")(x))                      # [B, T, F]
    return _dense(cfg, cfg.hidden_size, "fc2")(h)


class DecoderLayer(nn.Module):
  """One transformer block; pre-norm, or post-LayerNorm when cfg.pre_layer_norm is False."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, k_all, v_all, layer: int, positions, context: int | None = None):
    """(x, k_all, v_all), or (x, k, v) with `context` (see `Attention`)."""
    cfg = self.cfg
    attn_norm, mlp_norm = _norm(cfg, "attn_norm"), _norm(cfg, "mlp_norm")
    attn, mlp = Attention(cfg, name="attn"), MLP(cfg, name="mlp")
    if cfg.pre_layer_norm:
      h, k_all, v_all = attn(attn_norm(x), k_all, v_all, layer, positions, context)
      x = x + h
      x = x + mlp(mlp_norm(x))
    else:
      h, k_all, v_all = attn(x, k_all, v_all, layer, positions, context)
      x = attn_norm(x + h)
      x = mlp_norm(x + mlp(x))
    return x, k_all, v_all

