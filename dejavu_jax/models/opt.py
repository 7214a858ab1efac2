"""OPT: Hugging Face config and weight names -> dejavu_jax ModelConfig and params."""

from __future__ import annotations

import numpy as np

from dejavu_jax.config import ModelConfig


def config_from_hf(hf: dict, name: str = "hf_opt") -> ModelConfig:
  """ModelConfig from an OPT config.json dict."""
  if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
    raise ValueError("OPT checkpoints without biases or LayerNorm affine are not supported")
  if hf.get("activation_function", "relu") != "relu":
    raise ValueError(f"OPT activation {hf['activation_function']!r} is not supported (relu only)")
  d = hf["hidden_size"]
  proj = hf.get("word_embed_proj_dim", d)
  pre_ln = hf.get("do_layer_norm_before", True)
  if pre_ln and hf.get("_remove_final_layer_norm", False):
    raise ValueError("OPT checkpoints with _remove_final_layer_norm are not supported")
  return ModelConfig(
      name=name, family="opt", num_layers=hf["num_hidden_layers"], hidden_size=d,
      num_heads=hf["num_attention_heads"], ffn_dim=hf["ffn_dim"], vocab_size=hf["vocab_size"],
      max_positions=hf["max_position_embeddings"],
      word_embed_proj_dim=proj if proj != d else None, pre_layer_norm=pre_ln,
      eos_token_id=hf.get("eos_token_id", 2), pad_token_id=hf.get("pad_token_id", 1))


def _linear(sd, prefix):
  # torch Linear stores [out, in]; Flax Dense wants [in, out].
  out = {"kernel": np.ascontiguousarray(sd[prefix + ".weight"].T)}
  if prefix + ".bias" in sd:
    out["bias"] = sd[prefix + ".bias"]
  return out


def _norm(sd, prefix):
  return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def params_from_hf(cfg: ModelConfig, sd: dict[str, np.ndarray]) -> dict:
  """Params tree from an OPT state dict whose keys start at `decoder.` (prefixes stripped)."""
  p = {"embed_tokens": {"embedding": sd["decoder.embed_tokens.weight"]},
       "embed_positions": {"embedding": sd["decoder.embed_positions.weight"]}}
  if cfg.embed_dim != cfg.hidden_size:
    p["project_in"] = {"kernel": np.ascontiguousarray(sd["decoder.project_in.weight"].T)}
    p["project_out"] = {"kernel": np.ascontiguousarray(sd["decoder.project_out.weight"].T)}
  if cfg.has_final_norm:
    p["final_norm"] = _norm(sd, "decoder.final_layer_norm")
  for i in range(cfg.num_layers):
    pre = f"decoder.layers.{i}."
    p[f"layers_{i}"] = {
        "attn": {n: _linear(sd, pre + "self_attn." + n)
                 for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "attn_norm": _norm(sd, pre + "self_attn_layer_norm"),
        "mlp": {"fc1": _linear(sd, pre + "fc1"), "fc2": _linear(sd, pre + "fc2")},
        "mlp_norm": _norm(sd, pre + "final_layer_norm"),
    }
  return p


def strip_prefix(sd: dict) -> dict:
  """Accepts OPTForCausalLM (`model.decoder.*`), OPTModel (`decoder.*`) or bare keys."""
  out = {}
  for k, v in sd.items():
    if k.startswith("model."):
      k = k[len("model."):]
    if not k.startswith("decoder.") and not k.startswith("lm_head."):
      k = "decoder." + k
    out[k] = v
  return out
