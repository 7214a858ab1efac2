"""OPT: LayerNorm, ReLU, learned positions (offset 2), biases, q scaled before q.k; Hugging Face
`OPTForCausalLM` config and weight names (including OPT-350M's projections and post-LayerNorm).
"""

from __future__ import annotations

import numpy as np
from flax import linen as nn

from dejavu_jax.config import FAMILY_TRAITS, ModelConfig
from dejavu_jax.models.families import base


def config_from_hf(hf: dict, name: str = "hf_opt") -> ModelConfig:
  """ModelConfig from an OPT config.json dict."""
  base.refuse(hf, "OPT", enable_bias=True, layer_norm_elementwise_affine=True,
              activation_function="relu")
  d = base.field(hf, "hidden_size", "OPT")
  proj = hf.get("word_embed_proj_dim") or d
  pre_ln = hf.get("do_layer_norm_before", True)
  if pre_ln:
    base.refuse(hf, "OPT", _remove_final_layer_norm=False)
  return ModelConfig(
      name=name, family="opt", num_layers=base.field(hf, "num_hidden_layers", "OPT"),
      hidden_size=d, num_heads=base.field(hf, "num_attention_heads", "OPT"),
      ffn_dim=base.field(hf, "ffn_dim", "OPT"), vocab_size=base.field(hf, "vocab_size", "OPT"),
      max_positions=base.field(hf, "max_position_embeddings", "OPT"),
      word_embed_proj_dim=proj if proj != d else None, pre_layer_norm=pre_ln,
      tie_word_embeddings=hf.get("tie_word_embeddings", True), **base.special_ids(hf, 2))


def params_from_hf(cfg: ModelConfig, sd: dict[str, np.ndarray]) -> dict:
  """Params tree from an OPT state dict whose keys start at `decoder.` (see strip_prefix)."""
  p = base.head(cfg, sd, "decoder.embed_tokens.weight")
  p["embed_positions"] = {"embedding": sd["decoder.embed_positions.weight"]}
  if cfg.embed_dim != cfg.hidden_size:
    p["project_in"] = {"kernel": np.ascontiguousarray(sd["decoder.project_in.weight"].T)}
    p["project_out"] = {"kernel": np.ascontiguousarray(sd["decoder.project_out.weight"].T)}
  if cfg.has_final_norm:
    p["final_norm"] = base.layer_norm(sd, "decoder.final_layer_norm")
  for i in range(cfg.num_layers):
    pre = f"decoder.layers.{i}."
    p[f"layers_{i}"] = {
        "attn": {n: base.linear(sd, pre + "self_attn." + n)
                 for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "attn_norm": base.layer_norm(sd, pre + "self_attn_layer_norm"),
        "mlp": {"fc1": base.linear(sd, pre + "fc1"), "fc2": base.linear(sd, pre + "fc2")},
        "mlp_norm": base.layer_norm(sd, pre + "final_layer_norm"),
    }
  return p


def strip_prefix(sd: dict) -> dict:
  """Accepts OPTForCausalLM (`model.decoder.*`), OPTModel (`decoder.*`) or bare keys."""
  return base.with_prefix(sd, "decoder.", drop="model.")


FAMILY = base.Family(
    traits=FAMILY_TRAITS["opt"], model_types=("opt",), activation=nn.relu, scale_queries=True,
    config_from_hf=config_from_hf, params_from_hf=params_from_hf, strip_prefix=strip_prefix)
