"""BLOOM: LayerNorm (also right after the token embedding), tanh-GELU, ALiBi (a per-head linear
bias on the attention scores instead of positions), biases, tied LM head; Hugging Face
`BloomForCausalLM` config and weight names.

Hugging Face stores q, k and v as one `query_key_value` Linear whose output features are
interleaved per head, [H, 3, K] (head 0's q, k, v, then head 1's ...), not [3, H, K] as GPT-2's
c_attn: the converter splits it into q_proj / k_proj / v_proj by that layout.
"""

from __future__ import annotations

import numpy as np

from dejavu_jax.config import FAMILY_TRAITS, ModelConfig
from dejavu_jax.models.families import base


def config_from_hf(hf: dict, name: str = "hf_bloom") -> ModelConfig:
  """ModelConfig from a BLOOM config.json dict (older files name sizes n_embed / num_attention_heads)."""
  base.refuse(hf, "BLOOM", apply_residual_connection_post_layernorm=False, slow_but_exact=False)
  d = hf.get("hidden_size") or hf.get("n_embed")
  if d is None:
    raise ValueError("BLOOM config lacks the required field 'hidden_size'")
  heads = hf.get("n_head") or hf.get("num_attention_heads")
  if heads is None:
    raise ValueError("BLOOM config lacks the required field 'n_head'")
  return ModelConfig(
      name=name, family="bloom", num_layers=hf.get("n_layer") or base.field(
          hf, "num_hidden_layers", "BLOOM"),
      hidden_size=d, num_heads=heads, ffn_dim=4 * d,
      vocab_size=base.field(hf, "vocab_size", "BLOOM"),
      # ALiBi has no position table; 2048 is the training length (seq_length where recorded).
      max_positions=hf.get("seq_length") or 2048,
      layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      tie_word_embeddings=hf.get("tie_word_embeddings", True), **base.special_ids(hf, 2))


def split_qkv(w: np.ndarray, b: np.ndarray, heads: int):
  """query_key_value weight [H*3*K, D] and bias [H*3*K] -> ((q_w, q_b), (k_w, k_b), (v_w, v_b)),
  each weight [H*K, D] (torch layout) and bias [H*K]."""
  d = w.shape[1]
  w = w.reshape(heads, 3, -1, d)                                                # [H, 3, K, D]
  b = b.reshape(heads, 3, -1)                                                   # [H, 3, K]
  return tuple((w[:, j].reshape(-1, d), b[:, j].reshape(-1)) for j in range(3))


def params_from_hf(cfg: ModelConfig, sd: dict[str, np.ndarray]) -> dict:
  """Params tree from a BLOOM state dict whose keys start at `transformer.`."""
  p = base.head(cfg, sd, "transformer.word_embeddings.weight")
  p["embed_norm"] = base.layer_norm(sd, "transformer.word_embeddings_layernorm")
  p["final_norm"] = base.layer_norm(sd, "transformer.ln_f")
  d = cfg.hidden_size
  for i in range(cfg.num_layers):
    pre = f"transformer.h.{i}."
    w = sd[pre + "self_attention.query_key_value.weight"]
    if w.shape != (3 * d, d):
      raise ValueError(f"{pre}self_attention.query_key_value.weight has shape {w.shape}, "
                       f"config implies {(3 * d, d)}")
    qkv = split_qkv(w, sd[pre + "self_attention.query_key_value.bias"], cfg.num_heads)
    attn = {n: {"kernel": np.ascontiguousarray(qw.T), "bias": qb}
            for n, (qw, qb) in zip(("q_proj", "k_proj", "v_proj"), qkv)}
    attn["out_proj"] = base.linear(sd, pre + "self_attention.dense")
    p[f"layers_{i}"] = {
        "attn": attn,
        "attn_norm": base.layer_norm(sd, pre + "input_layernorm"),
        "mlp": {"fc1": base.linear(sd, pre + "mlp.dense_h_to_4h"),
                "fc2": base.linear(sd, pre + "mlp.dense_4h_to_h")},
        "mlp_norm": base.layer_norm(sd, pre + "post_attention_layernorm"),
    }
  return p


def strip_prefix(sd: dict) -> dict:
  """Accepts BloomForCausalLM (`transformer.*`) or BloomModel (bare) keys."""
  return base.with_prefix(sd, "transformer.")


FAMILY = base.Family(
    traits=FAMILY_TRAITS["bloom"], model_types=("bloom",), activation=base.gelu_tanh,
    config_from_hf=config_from_hf, params_from_hf=params_from_hf, strip_prefix=strip_prefix)
