"""Decoder building blocks shared by OPT and GPT-2: attention over an explicit KV cache, MLP, block.

Shape vocabulary: B batch, T new tokens, S cache length, D hidden, H heads, K head dim.
The cache is passed in and returned (never kept in a Flax collection), so a caller can slice it
per microbatch, stream it, swap it or restore it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from dejavu_jax.config import ModelConfig
from dejavu_jax.kv.cache import write_kv


def _dense(cfg: ModelConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype, name=name)


def _norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.jnp_dtype,
                      param_dtype=cfg.jnp_dtype, name=name)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, scale: float,
           scale_queries: bool) -> jax.Array:
  """Causal attention of new queries over a cache.

  Args:
    q: [B, T, H, K] queries. k, v: [B, S, H, K] the cache, new entries already written.
    q_pos: [B, T] position of each query (negative for padding).
    scale: 1/sqrt(K). scale_queries: OPT scales q before the product, GPT-2 the scores after
      (kept apart so float32 logits match Hugging Face to the last bits).
  Returns:
    [B, T, H, K].
  """
  if scale_queries:
    q = q * jnp.asarray(scale, q.dtype)
  if q.shape[1] == 1:
    return _attend_one(q[:, 0], k, v, q_pos[:, 0], scale, scale_queries)[:, None]
  scores = jnp.einsum("BTHK,BSHK->BHTS", q, k, preferred_element_type=jnp.float32)
  if not scale_queries:
    scores = scores * scale
  key_pos = jnp.arange(k.shape[1])
  # Key j is visible to a query at position p iff j <= p: every position below p has been written,
  # so stale entries beyond a row's length (padding, a freed slot) are never read.
  mask = key_pos[None, None, :] <= q_pos[:, :, None]                           # [B, T, S]
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)                      # [B, H, T, S]
  return jnp.einsum("BHTS,BSHK->BTHK", probs, v)


def _attend_one(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, scale: float,
                scale_queries: bool) -> jax.Array:
  """`attend` for one query per row (a decode step): q [B, H, K] (already scaled for OPT),
  q_pos [B]; returns [B, H, K].

  Both products are a multiply and a sum over the cache in its own [B, S, H, K] layout, fused by
  XLA with the read of the layer's slice. The einsums of `attend` lower, for T == 1, to a
  transposed copy of every layer's cache slice plus B * H tiny matrix-vector products. On the
  2-core development CPU (OPT-125M shapes, 256 positions) this path with
  generate.CPU_COMPILER_OPTIONS took a decode step from about 35 to 30 ms at batch 1 and from 88
  to 77 ms at batch 8 (medians). Without those options it is slower than the einsums (see there).
  """
  f32 = jnp.float32
  scores = jnp.sum(q[:, None].astype(f32) * k.astype(f32), axis=-1)             # [B, S, H]
  if not scale_queries:
    scores = scores * scale
  mask = jnp.arange(k.shape[1])[None, :] <= q_pos[:, None]                     # [B, S]
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(f32).min)
  probs = jax.nn.softmax(scores, axis=1)                                        # [B, S, H]
  return jnp.sum(probs[..., None] * v.astype(f32), axis=1).astype(v.dtype)      # [B, H, K]


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, k_all, v_all, layer: int, positions):
    """x [B, T, D]; k_all, v_all [L, B, S, H, K] (this stage's caches); layer indexes L."""
    cfg = self.cfg
    b, t, _ = x.shape
    heads = (b, t, cfg.num_heads, cfg.head_dim)
    q = _dense(cfg, cfg.hidden_size, "q_proj")(x).reshape(heads)                # [B, T, H, K]
    k = _dense(cfg, cfg.hidden_size, "k_proj")(x).reshape(heads)
    v = _dense(cfg, cfg.hidden_size, "v_proj")(x).reshape(heads)
    k_all, v_all = write_kv(k_all, v_all, layer, k, v, positions)
    out = attend(q, k_all[layer], v_all[layer], positions, cfg.head_dim**-0.5,
                 scale_queries=cfg.family == "opt")
    out = _dense(cfg, cfg.hidden_size, "out_proj")(out.reshape(b, t, cfg.hidden_size))
    return out, k_all, v_all


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = _dense(cfg, cfg.ffn_dim, "fc1")(x)                                      # [B, T, F]
    # OPT uses ReLU; GPT-2 the tanh approximation of GELU ("gelu_new").
    h = nn.relu(h) if cfg.family == "opt" else nn.gelu(h, approximate=True)
    return _dense(cfg, cfg.hidden_size, "fc2")(h)


class DecoderLayer(nn.Module):
  """One transformer block; pre-LayerNorm, or post-LayerNorm when cfg.pre_layer_norm is False."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, k_all, v_all, layer: int, positions):
    cfg = self.cfg
    attn_norm, mlp_norm = _norm(cfg, "attn_norm"), _norm(cfg, "mlp_norm")
    attn, mlp = Attention(cfg, name="attn"), MLP(cfg, name="mlp")
    if cfg.pre_layer_norm:
      h, k_all, v_all = attn(attn_norm(x), k_all, v_all, layer, positions)
      x = x + h
      x = x + mlp(mlp_norm(x))
    else:
      h, k_all, v_all = attn(x, k_all, v_all, layer, positions)
      x = attn_norm(x + h)
      x = mlp_norm(x + mlp(x))
    return x, k_all, v_all
