"""DecoderStage: embeddings (first stage) + a contiguous layer range + final norm and LM head (last).

The whole model is the stage [0, L). A pipeline stage [i, j) is the same module with a subset of
the whole model's parameters (`stage_params`), because every parameter is named globally:
layer 7 is `layers_7` in every stage that owns it, and the embedding table is shared by the first
stage (lookup) and the last (tied LM head; an untied head is its own `lm_head`). What the
embeddings hold (a learned position table, BLOOM's embedding norm) comes from the family
(models/families/).

A stage step is the pure function

    stage_apply(cfg, start, stop, params, cache, x, positions) -> (cache, out)

x: int32 tokens [B, T] on the first stage, hidden states [B, T, D] otherwise;
out: logits [B, T, V] on the last stage, hidden states [B, T, D] otherwise;
positions: [B, T] int32, negative for padding; cache: the stage's KVCache (layers j - i).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from dejavu_jax.config import ModelConfig
from dejavu_jax.kv.cache import KVCache, write_kv_layers
from dejavu_jax.models import cpu_kernels
from dejavu_jax.models.layers import DecoderLayer, Dense, _norm
from dejavu_jax.models import families


class DecoderStage(nn.Module):
  cfg: ModelConfig
  start: int
  stop: int

  def setup(self):
    cfg, fam = self.cfg, families.get(self.cfg.family)
    dt = cfg.jnp_dtype
    first, last = self.start == 0, self.stop == cfg.num_layers
    if first or (last and cfg.tie_word_embeddings):
      self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dt, param_dtype=dt,
                                   embedding_init=nn.initializers.normal(0.02))
    if first and fam.positions == "learned":
      self.embed_positions = nn.Embed(cfg.max_positions + fam.position_offset, cfg.hidden_size,
                                      dtype=dt, param_dtype=dt,
                                      embedding_init=nn.initializers.normal(0.02))
    if first and fam.embed_norm:
      self.embed_norm = _norm(cfg, "embed_norm")
    if last and not cfg.tie_word_embeddings:
      self.lm_head = Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=dt)
    projected = cfg.embed_dim != cfg.hidden_size
    if first and projected:
      self.project_in = Dense(cfg.hidden_size, use_bias=False, dtype=dt, param_dtype=dt)
    if last and projected:
      self.project_out = Dense(cfg.embed_dim, use_bias=False, dtype=dt, param_dtype=dt)
    if last and cfg.has_final_norm:
      self.final_norm = _norm(cfg, "final_norm")
    self.layers = [DecoderLayer(cfg, name=f"layers_{i}") for i in range(self.start, self.stop)]

  def __call__(self, cache: KVCache, x: jax.Array, positions: jax.Array,
               logits: bool = True, select: jax.Array | None = None,
               context: int | None = None):
    """See the module docstring. `select` [B]: the last stage keeps only token select[b] of each
    row before the LM head (a prefill needs just the last prompt token's logits). `context`
    (static): attention reads only the first `context` cache positions, which must exceed every
    position of `positions`, and every layer's new entries are written in one update after the
    last layer (the decode path: its cost follows the context, not the cache length)."""
    cfg, fam = self.cfg, families.get(self.cfg.family)
    first, last = self.start == 0, self.stop == cfg.num_layers
    if first:
      h = self.embed_tokens(x)                                                 # [B, T, E]
      if cfg.embed_dim != cfg.hidden_size:
        h = self.project_in(h)                                                 # [B, T, D]
      if fam.positions == "learned":
        h = h + self.embed_positions(jnp.maximum(positions, 0) + fam.position_offset)
      if fam.embed_norm:
        h = self.embed_norm(h)
    else:
      h = x
    k_all, v_all = cache.k, cache.v
    if context is None:
      for i, layer in enumerate(self.layers):
        h, k_all, v_all = layer(h, k_all, v_all, i, positions)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        h, k, v = layer(h, k_all, v_all, i, positions, context)
        new_k.append(k)
        new_v.append(v)
      # The write must depend on the last layer's output, which depends on every layer's read
      # of the old cache: XLA's copy insertion orders an in-place update after the reads only by
      # data dependence, and without one it copies the whole cache twice per step (k and v,
      # measured in the compiled HLO; an optimization barrier does not order it: it is expanded
      # before copy insertion). Adding 0 * one element of h makes that dependence at no cost
      # (XLA does not fold x * 0 for floats) and leaves the written values unchanged.
      dep = jnp.zeros((), jnp.float32) * h.reshape(-1)[0].astype(jnp.float32)
      new_k = (jnp.stack(new_k) + dep.astype(new_k[0].dtype))
      new_v = (jnp.stack(new_v) + dep.astype(new_v[0].dtype))
      k_all, v_all = write_kv_layers(k_all, v_all, new_k, new_v, positions)
    new_len = jnp.maximum(cache.lengths, jnp.max(positions, axis=1) + 1).astype(jnp.int32)
    cache = KVCache(k=k_all, v=v_all, lengths=new_len)
    if last:
      if select is not None:
        h = jnp.take_along_axis(h, select[:, None, None], axis=1)              # [B, 1, D]
      if cfg.has_final_norm:
        h = self.final_norm(h)
      if logits:
        if cfg.embed_dim != cfg.hidden_size:
          h = self.project_out(h)
        tied = self.get_variable("packed", TIED_HEAD) if cfg.tie_word_embeddings else None
        if tied is not None and h.dtype == jnp.float32:
          h = cpu_kernels.packed_matmul(h, tied, cfg.vocab_size)               # [B, T, V]
        elif cfg.tie_word_embeddings:
          h = self.embed_tokens.attend(h)                                      # [B, T, V]
        else:
          h = self.lm_head(h)                                                  # [B, T, V]
    return cache, h


def stage_apply(cfg: ModelConfig, start: int, stop: int, params, cache: KVCache, x,
                positions, logits: bool = True, select=None, context: int | None = None):
  """Runs the stage [start, stop) of `cfg`; see the module docstring. Not jitted (callers are).
  `params` may be a `PackedParams` (`pack_params`): its packed kernels serve the products."""
  variables = ({"params": params.params, "packed": params.packed}
               if isinstance(params, PackedParams) else {"params": params})
  return DecoderStage(cfg, start, stop).apply(variables, cache, x, positions, logits, select,
                                              context)


# The packed collection's name for a tied LM head (the embedding table, transposed and packed).
TIED_HEAD = "tied_head"


@struct.dataclass
class PackedParams:
  """A stage's params plus copies of its float32 Dense kernels (and tied LM head) in the panel
  layout of `cpu_kernels.pack`, under the same module paths (`packed` collection)."""
  params: dict
  packed: dict


def pack_params(cfg: ModelConfig, params, head: bool) -> PackedParams:
  """Packs (`cpu_kernels.pack_weights`: blocks or panels) every 2-D float32 `kernel` of `params`
  and, if `head` and the embeddings are tied, the embedding table as the LM head. Runs on the params' device (one copy of those weights)."""
  def walk(tree):
    out = {}
    for name, sub in tree.items():
      if isinstance(sub, dict):
        inner = walk(sub)
        if inner:
          out[name] = inner
      elif name == "kernel" and sub.ndim == 2 and sub.dtype == jnp.float32:
        out[name] = cpu_kernels.pack_weights(sub)
    return out
  packed = walk(params)
  table = params.get("embed_tokens", {}).get("embedding")
  if head and cfg.tie_word_embeddings and table is not None and table.dtype == jnp.float32:
    packed[TIED_HEAD] = cpu_kernels.pack_weights(table.T)
  return PackedParams(params=params, packed=packed)


def stage_param_names(cfg: ModelConfig, start: int, stop: int) -> list[str]:
  """Top-level parameter names owned by the stage [start, stop)."""
  fam = families.get(cfg.family)
  names = [f"layers_{i}" for i in range(start, stop)]
  projected = cfg.embed_dim != cfg.hidden_size
  if start == 0:
    names += ["embed_tokens"] + (["embed_positions"] if fam.positions == "learned" else [])
    names += (["embed_norm"] if fam.embed_norm else []) + (["project_in"] if projected else [])
  if stop == cfg.num_layers:
    if cfg.tie_word_embeddings:
      names += ["embed_tokens"] if start != 0 else []
    else:
      names += ["lm_head"]
    names += (["project_out"] if projected else []) + (["final_norm"] if cfg.has_final_norm
                                                        else [])
  return names


def stage_params(cfg: ModelConfig, params, start: int, stop: int):
  """The subset of the whole model's `params` that the stage [start, stop) owns."""
  check_layer_range(cfg, start, stop)
  return {name: params[name] for name in stage_param_names(cfg, start, stop)}


def check_layer_range(cfg: ModelConfig, start: int, stop: int) -> None:
  if not 0 <= start < stop <= cfg.num_layers:
    raise ValueError(f"layer range [{start}, {stop}) is empty or outside the model's "
                     f"{cfg.num_layers} layers")


def _dummy_inputs(cfg: ModelConfig, start: int, stop: int, batch: int = 1, tokens: int = 1):
  cache = jax.ShapeDtypeStruct((stop - start, batch, tokens, cfg.num_kv_heads, cfg.head_dim),
                               cfg.jnp_dtype)
  cache = KVCache(k=cache, v=cache, lengths=jax.ShapeDtypeStruct((batch,), jnp.int32))
  if start == 0:
    x = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
  else:
    x = jax.ShapeDtypeStruct((batch, tokens, cfg.hidden_size), cfg.jnp_dtype)
  return cache, x, jax.ShapeDtypeStruct((batch, tokens), jnp.int32)


def init_params(cfg: ModelConfig, key: jax.Array, start: int = 0, stop: int | None = None):
  """Random parameters of the stage [start, stop) (the whole model by default)."""
  stop = cfg.num_layers if stop is None else stop
  check_layer_range(cfg, start, stop)
  cache, x, pos = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                               _dummy_inputs(cfg, start, stop))
  init = jax.jit(DecoderStage(cfg, start, stop).init)
  return init(key, cache, x, pos)["params"]


def param_shapes(cfg: ModelConfig, start: int = 0, stop: int | None = None):
  """Parameter shapes (`jax.ShapeDtypeStruct`s) without allocating any weights."""
  stop = cfg.num_layers if stop is None else stop
  check_layer_range(cfg, start, stop)
  module = DecoderStage(cfg, start, stop)
  return jax.eval_shape(lambda k, c, x, p: module.init(k, c, x, p)["params"],
                        jax.ShapeDtypeStruct((2,), jnp.uint32), *_dummy_inputs(cfg, start, stop))
