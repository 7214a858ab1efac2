"""GPT-2: LayerNorm, tanh-GELU, learned positions, biases, fused c_attn stored as Conv1D
([in, out]); Hugging Face `GPT2LMHeadModel` config and weight names.
"""

from __future__ import annotations

import numpy as np

from dejavu_jax.config import FAMILY_TRAITS, ModelConfig
from dejavu_jax.models.families import base


def config_from_hf(hf: dict, name: str = "hf_gpt2") -> ModelConfig:
  """ModelConfig from a GPT-2 config.json dict."""
  act = hf.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ValueError(f"GPT-2 config field activation_function={act!r} is not supported "
                     "(gelu_new only)")
  base.refuse(hf, "GPT-2", scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
  d = base.field(hf, "n_embd", "GPT-2")
  heads = base.field(hf, "n_head", "GPT-2")
  return ModelConfig(
      name=name, family="gpt2", num_layers=base.field(hf, "n_layer", "GPT-2"), hidden_size=d,
      num_heads=heads, ffn_dim=hf.get("n_inner") or 4 * d,
      vocab_size=base.field(hf, "vocab_size", "GPT-2"),
      max_positions=base.field(hf, "n_positions", "GPT-2"),
      layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      # scale_attn_weights=False: raw q.k scores (no 1/sqrt(K)).
      attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
      tie_word_embeddings=hf.get("tie_word_embeddings", True), **base.special_ids(hf, 50256))


def _conv1d(sd, prefix):
  # GPT-2's Conv1D already stores [in, out], as Flax Dense does.
  return {"kernel": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def params_from_hf(cfg: ModelConfig, sd: dict[str, np.ndarray]) -> dict:
  """Params tree from a GPT-2 state dict whose keys start at `transformer.`."""
  d = cfg.hidden_size
  p = base.head(cfg, sd, "transformer.wte.weight")
  p["embed_positions"] = {"embedding": sd["transformer.wpe.weight"]}
  p["final_norm"] = base.layer_norm(sd, "transformer.ln_f")
  for i in range(cfg.num_layers):
    pre = f"transformer.h.{i}."
    w, b = sd[pre + "attn.c_attn.weight"], sd[pre + "attn.c_attn.bias"]      # [D, 3D], [3D]
    if w.shape != (d, 3 * d):
      raise ValueError(f"{pre}attn.c_attn.weight has shape {w.shape}, config implies {(d, 3 * d)}")
    attn = {n: {"kernel": np.ascontiguousarray(w[:, j * d:(j + 1) * d]), "bias": b[j * d:(j + 1) * d]}
            for j, n in enumerate(("q_proj", "k_proj", "v_proj"))}
    attn["out_proj"] = _conv1d(sd, pre + "attn.c_proj")
    p[f"layers_{i}"] = {
        "attn": attn,
        "attn_norm": base.layer_norm(sd, pre + "ln_1"),
        "mlp": {"fc1": _conv1d(sd, pre + "mlp.c_fc"), "fc2": _conv1d(sd, pre + "mlp.c_proj")},
        "mlp_norm": base.layer_norm(sd, pre + "ln_2"),
    }
  return p


def strip_prefix(sd: dict) -> dict:
  """Accepts GPT2LMHeadModel (`transformer.*`) or GPT2Model / original (bare) keys."""
  return base.with_prefix(sd, "transformer.")


FAMILY = base.Family(
    traits=FAMILY_TRAITS["gpt2"], model_types=("gpt2",), activation=base.gelu_tanh,
    config_from_hf=config_from_hf, params_from_hf=params_from_hf, strip_prefix=strip_prefix,
    # The causal-mask buffers of original GPT-2 checkpoints.
    ignored=(r"\.attn\.(masked_)?bias$",))
