"""Llama (Llama-2/3 layout, SmolLM2): RMSNorm, SwiGLU MLP, RoPE on q/k (plain, or Llama-3.1's
"llama3" / "linear" frequency scaling), grouped-query attention, no biases, tied or untied LM
head; Hugging Face `LlamaForCausalLM` config and weight names.

Two entry points also serve other sources of Llama weights (the GGUF reader maps its tensors to
these Hugging Face names first):

    config_from_hf(hf_config: dict, name="hf_llama") -> ModelConfig
    params_from_hf(cfg: ModelConfig | dict, tensors: dict[str, np.ndarray]) -> params

`tensors` uses Hugging Face names with or without the `model.` prefix (`model.layers.0.
self_attn.q_proj.weight` or `layers.0...`, `lm_head.weight`). For the checked path (shapes, unused
tensors, NaN/inf, cast to cfg.dtype) call `convert.params_from_state_dict(cfg, tensors)`.
"""

from __future__ import annotations

import numpy as np
from flax import linen as nn

from dejavu_jax.config import FAMILY_TRAITS, ModelConfig
from dejavu_jax.models.families import base


_SCALING_KEYS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings")}


def _rope(hf: dict) -> dict:
  """rope_theta and rope_scaling for ModelConfig, from `rope_theta` + `rope_scaling`
  (transformers < 5) or `rope_parameters` (>= 5). Plain, "linear" and "llama3" RoPE only."""
  rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  kind = rope.get("rope_type", rope.get("type", "default"))
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if kind == "default":
    return {"rope_theta": theta}
  if kind not in _SCALING_KEYS:
    raise ValueError(f"Llama config field rope_type={kind!r} is not supported (only "
                     f"'default', {', '.join(repr(k) for k in _SCALING_KEYS)})")
  missing = [k for k in _SCALING_KEYS[kind] if rope.get(k) is None]
  if missing:
    raise ValueError(f"Llama config's {kind} RoPE scaling lacks the field {missing[0]!r}")
  scaling = {k: float(rope[k]) for k in _SCALING_KEYS[kind]}
  return {"rope_theta": theta, "rope_scaling": tuple(sorted({**scaling, "rope_type": kind}.items()))}


def config_from_hf(hf: dict, name: str = "hf_llama") -> ModelConfig:
  """ModelConfig from a Llama config.json dict (also the dict the GGUF reader builds)."""
  # pretraining_tp only changed how old transformers split the same products: no refusal.
  base.refuse(hf, "Llama", hidden_act="silu", attention_bias=False, mlp_bias=False)
  d = base.field(hf, "hidden_size", "Llama")
  heads = base.field(hf, "num_attention_heads", "Llama")
  if hf.get("head_dim") is not None and hf["head_dim"] != d // heads:
    raise ValueError(f"Llama config field head_dim={hf['head_dim']} is not supported (only "
                     f"hidden_size / num_attention_heads = {d // heads})")
  return ModelConfig(
      name=name, family="llama", num_layers=base.field(hf, "num_hidden_layers", "Llama"),
      hidden_size=d, num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      ffn_dim=base.field(hf, "intermediate_size", "Llama"),
      vocab_size=base.field(hf, "vocab_size", "Llama"),
      max_positions=base.field(hf, "max_position_embeddings", "Llama"),
      layer_norm_eps=hf.get("rms_norm_eps", 1e-6), **_rope(hf),
      # LlamaConfig's default is untied (Llama-2/3); SmolLM2 ties.
      tie_word_embeddings=hf.get("tie_word_embeddings", False), **base.special_ids(hf, 2))


def params_from_hf(cfg: ModelConfig | dict, sd: dict[str, np.ndarray]) -> dict:
  """Params tree from Llama tensors (Hugging Face names; a missing `model.` prefix is added).
  `cfg` may be the Hugging Face config dict itself."""
  if isinstance(cfg, dict):
    cfg = config_from_hf(cfg)
  if not all(k.startswith(("model.", "lm_head.")) for k in sd):
    sd = strip_prefix(sd)  # (a new dict: only when needed, so convert's tracking of reads holds)
  p = base.head(cfg, sd, "model.embed_tokens.weight")
  p["final_norm"] = base.rms_norm(sd, "model.norm")
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    p[f"layers_{i}"] = {
        "attn": {n: base.linear(sd, pre + "self_attn." + hf)
                 for n, hf in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                               ("out_proj", "o_proj"))},
        "attn_norm": base.rms_norm(sd, pre + "input_layernorm"),
        "mlp": {n: base.linear(sd, pre + "mlp." + n)
                for n in ("gate_proj", "up_proj", "down_proj")},
        "mlp_norm": base.rms_norm(sd, pre + "post_attention_layernorm"),
    }
  return p


def strip_prefix(sd: dict) -> dict:
  """Accepts LlamaForCausalLM (`model.*`, `lm_head.*`) or LlamaModel (bare) keys."""
  return base.with_prefix(sd, "model.")


FAMILY = base.Family(
    traits=FAMILY_TRAITS["llama"], model_types=("llama",), activation=nn.silu,
    config_from_hf=config_from_hf, params_from_hf=params_from_hf, strip_prefix=strip_prefix,
    param_axes={**base.ATTENTION_AXES, **base.GATED_MLP_AXES},
    # Old checkpoints store RoPE's inverse frequencies, which we compute from rope_theta.
    ignored=(r"rotary_emb\.inv_freq$",))
