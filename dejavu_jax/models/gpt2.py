"""GPT-2: Hugging Face config and weight names -> dejavu_jax ModelConfig and params."""

from __future__ import annotations

import numpy as np

from dejavu_jax.config import ModelConfig


def config_from_hf(hf: dict, name: str = "hf_gpt2") -> ModelConfig:
  """ModelConfig from a GPT-2 config.json dict."""
  act = hf.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ValueError(f"GPT-2 activation {act!r} is not supported (gelu_new only)")
  if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
    raise ValueError("GPT-2 variants with per-layer attention scaling are not supported")
  d = hf["n_embd"]
  return ModelConfig(
      name=name, family="gpt2", num_layers=hf["n_layer"], hidden_size=d,
      num_heads=hf["n_head"], ffn_dim=hf.get("n_inner") or 4 * d, vocab_size=hf["vocab_size"],
      max_positions=hf["n_positions"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      eos_token_id=hf.get("eos_token_id", 50256),
      pad_token_id=hf.get("pad_token_id") or hf.get("eos_token_id", 50256))


def _conv1d(sd, prefix):
  # GPT-2's Conv1D already stores [in, out], as Flax Dense does.
  return {"kernel": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def _norm(sd, prefix):
  return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def params_from_hf(cfg: ModelConfig, sd: dict[str, np.ndarray]) -> dict:
  """Params tree from a GPT-2 state dict whose keys start at `transformer.`."""
  d = cfg.hidden_size
  p = {"embed_tokens": {"embedding": sd["transformer.wte.weight"]},
       "embed_positions": {"embedding": sd["transformer.wpe.weight"]},
       "final_norm": _norm(sd, "transformer.ln_f")}
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
        "attn_norm": _norm(sd, pre + "ln_1"),
        "mlp": {"fc1": _conv1d(sd, pre + "mlp.c_fc"), "fc2": _conv1d(sd, pre + "mlp.c_proj")},
        "mlp_norm": _norm(sd, pre + "ln_2"),
    }
  return p


def strip_prefix(sd: dict) -> dict:
  """Accepts GPT2LMHeadModel (`transformer.*`) or GPT2Model / original (bare) keys."""
  out = {}
  for k, v in sd.items():
    if not k.startswith("transformer.") and not k.startswith("lm_head."):
      k = "transformer." + k
    out[k] = v
  return out
