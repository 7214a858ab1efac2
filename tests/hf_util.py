"""Random-weight Hugging Face reference models written to a local checkpoint directory."""

import torch
import transformers

from dejavu_jax.config import ModelConfig
from dejavu_jax.models.convert import load_hf_checkpoint

HF_CLASSES = {"opt": "OPTForCausalLM", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
              "bloom": "BloomForCausalLM"}


def hf_class(cfg: ModelConfig):
  return getattr(transformers, HF_CLASSES[cfg.family])


def _rope_parameters(cfg: ModelConfig) -> dict:
  params = {"rope_type": "default"}
  for k, v in cfg.rope_scaling or ():
    params[k] = int(v) if k == "original_max_position_embeddings" else v
  return {**params, "rope_theta": cfg.rope_theta}


def hf_config(cfg: ModelConfig):
  tied = cfg.tie_word_embeddings
  if cfg.family == "opt":
    return transformers.OPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, ffn_dim=cfg.ffn_dim,
        num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        word_embed_proj_dim=cfg.embed_dim, do_layer_norm_before=cfg.pre_layer_norm,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
        pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id, bos_token_id=2,
        tie_word_embeddings=tied)
  if cfg.family == "llama":
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.layer_norm_eps,
        rope_parameters=_rope_parameters(cfg),
        tie_word_embeddings=tied, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
        bos_token_id=1)
  if cfg.family == "bloom":
    return transformers.BloomConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, n_layer=cfg.num_layers,
        n_head=cfg.num_heads, layer_norm_epsilon=cfg.layer_norm_eps, hidden_dropout=0.0,
        attention_dropout=0.0, tie_word_embeddings=tied, pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id, bos_token_id=1, seq_length=cfg.max_positions)
  return transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.hidden_size,
      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_dim,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=cfg.eos_token_id,
      bos_token_id=cfg.eos_token_id, tie_word_embeddings=tied,
      scale_attn_weights=cfg.attn_scale is None)


def hf_model(cfg: ModelConfig, seed: int = 0, scale: float = 0.1):
  """A HF model with every parameter random (LayerNorms too, so a wrong epsilon or a swapped
  norm shows up), in eval mode."""
  torch.manual_seed(seed)
  hf = hf_config(cfg)
  hf._attn_implementation = "eager"  # pylint: disable=protected-access
  model = hf_class(cfg)(hf).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or ".ln_" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + scale * torch.randn_like(p))
      else:
        p.copy_(scale * torch.randn_like(p))
  return model


def hf_logits(model, tokens):
  """Full-sequence logits [B, T, V] of the reference (no padding)."""
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def saved_and_loaded(cfg: ModelConfig, directory):
  """(HF model, our (config, params) loaded back from its `save_pretrained` safetensors in
  `directory`): the checkpoint path the parity tests go through."""
  model = hf_model(cfg)
  model.save_pretrained(directory)
  loaded_cfg, params = load_hf_checkpoint(str(directory))
  return model, loaded_cfg, params
