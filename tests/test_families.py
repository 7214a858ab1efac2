"""The family registry and its pieces: lookups and named refusals, Llama's converter entry points
(the ones the GGUF reader calls), RoPE and ALiBi against transformers' own functions, BLOOM's
per-head fused qkv, and the sharding rules each family supplies."""

import math

import jax
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

from dejavu_jax.config import ModelConfig, get_model_config, tiny_config
from dejavu_jax.models import families, param_shapes
from dejavu_jax.models import positions as positions_lib
from dejavu_jax.models.convert import params_from_state_dict
from dejavu_jax.models.families import bloom, llama
from dejavu_jax.pipeline import plan as plan_lib
from tests import hf_util


def test_registry_lookups_and_refusals():
  assert set(families.names()) == {"opt", "gpt2", "llama", "bloom"}
  assert families.for_model_type("bloom").name == "bloom"
  with pytest.raises(ValueError, match="unknown model family 'mamba'"):
    families.get("mamba")
  with pytest.raises(ValueError, match="unknown model family 'mamba'"):
    tiny_config("opt").replace(family="mamba")
  with pytest.raises(ValueError, match="unsupported model_type 't5'"):
    families.for_model_type("t5")
  with pytest.raises(ValueError, match="num_kv_heads 3 must be >= 1 and divide num_heads 4"):
    tiny_config("llama", num_kv_heads=3)


def test_replacing_heads_keeps_a_multi_head_config_multi_head():
  cfg = get_model_config("opt_125m").replace(num_heads=4, hidden_size=64)
  assert cfg.num_kv_heads == 4
  assert get_model_config("llama2_70b").replace(num_heads=16).num_kv_heads == 8


SMOLLM_STYLE = {  # a transformers-4 style config.json (rope_theta at the top, eos as a list)
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": None}


def test_llama_config_from_hf_both_rope_spellings_and_refusals():
  cfg = llama.config_from_hf(SMOLLM_STYLE, name="smol")
  assert (cfg.name, cfg.num_kv_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (
      "smol", 2, 1e5, True)
  assert (cfg.eos_token_id, cfg.pad_token_id) == (2, 2)
  v5 = {k: v for k, v in SMOLLM_STYLE.items() if k != "rope_theta"}
  v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
  assert llama.config_from_hf(v5, name="smol") == cfg
  with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
    llama.config_from_hf({**SMOLLM_STYLE, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})
  with pytest.raises(ValueError, match="llama3 RoPE scaling lacks the field 'low_freq_factor'"):
    llama.config_from_hf({**SMOLLM_STYLE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
  # Llama-3.1's transformers-4 spelling: "rope_scaling" next to a top-level rope_theta.
  l31 = llama.config_from_hf({**SMOLLM_STYLE, "rope_scaling": {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}})
  assert dict(l31.rope_scaling) == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192.0}
  assert l31.rope_theta == 1e5
  with pytest.raises(ValueError, match="attention_bias=True is not supported"):
    llama.config_from_hf({**SMOLLM_STYLE, "attention_bias": True})
  with pytest.raises(ValueError, match="lacks the required field 'num_hidden_layers'"):
    llama.config_from_hf({k: v for k, v in SMOLLM_STYLE.items() if k != "num_hidden_layers"})


def test_llama_params_from_hf_takes_a_config_dict_and_bare_names():
  """The GGUF reader's path: a HF config dict and tensors named without the `model.` prefix."""
  cfg = llama.config_from_hf(SMOLLM_STYLE, name="smol")
  sd = {k: v.numpy() for k, v in hf_util.hf_model(cfg).state_dict().items()}
  bare = {k.removeprefix("model."): v for k, v in sd.items()}
  raw = llama.params_from_hf(SMOLLM_STYLE, bare)
  checked = params_from_state_dict(cfg, bare)
  jax.tree.map(np.testing.assert_array_equal, raw, jax.tree.map(np.asarray, checked))
  assert jax.tree.structure(raw) == jax.tree.structure(param_shapes(cfg))
  np.testing.assert_array_equal(raw["layers_1"]["attn"]["k_proj"]["kernel"],
                                sd["model.layers.1.self_attn.k_proj.weight"].T)


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 8, 12, 16, 20, 112])
def test_alibi_slopes_equal_transformers(heads):
  from transformers.models.bloom.modeling_bloom import _get_alibi_slopes  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(positions_lib.alibi_slopes(heads),
                             _get_alibi_slopes(heads, "cpu").numpy(), rtol=1e-6, atol=0)


LLAMA3_SCALING = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                  ("original_max_position_embeddings", 32.0), ("rope_type", "llama3"))


@pytest.mark.parametrize("scaling", [None, (("factor", 4.0), ("rope_type", "linear")),
                                     LLAMA3_SCALING], ids=["plain", "linear", "llama3"])
def test_rope_equals_transformers(scaling):
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.models.llama import modeling_llama as ml  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("llama", rope_theta=500000.0, rope_scaling=scaling)
  hf = hf_util.hf_config(cfg)
  assert isinstance(hf, transformers.LlamaConfig)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 4, cfg.head_dim)).astype(np.float32)            # [B, T, H, K]
  pos = np.stack([np.arange(7), np.arange(40, 47)]).astype(np.int32)
  cos, sin = ml.LlamaRotaryEmbedding(hf)(torch.tensor(x), torch.tensor(pos, dtype=torch.long))
  want, _ = ml.apply_rotary_pos_emb(torch.tensor(x), torch.tensor(x), cos, sin, unsqueeze_dim=2)
  got = positions_lib.rope(x, pos, cfg.rope_theta, cfg.rope_scaling)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=0)


def test_bloom_split_qkv_follows_the_per_head_interleaving():
  heads, k, d = 3, 4, 12
  w = np.random.default_rng(0).standard_normal((heads * 3 * k, d)).astype(np.float32)
  b = np.arange(heads * 3 * k, dtype=np.float32)
  (qw, qb), (kw, kb), (vw, vb) = bloom.split_qkv(w, b, heads)
  x = np.random.default_rng(1).standard_normal((5, d)).astype(np.float32)
  fused = (x @ w.T + b).reshape(5, heads, 3, k)        # what HF's BloomAttention._reshape sees
  np.testing.assert_allclose(x @ qw.T + qb, fused[:, :, 0].reshape(5, -1), rtol=1e-6)
  np.testing.assert_allclose(x @ kw.T + kb, fused[:, :, 1].reshape(5, -1), rtol=1e-6)
  np.testing.assert_allclose(x @ vw.T + vb, fused[:, :, 2].reshape(5, -1), rtol=1e-6)


def test_sharding_rules_come_from_the_family():
  def spec(cfg, *path):
    return plan_lib.param_spec([jax.tree_util.DictKey(p) for p in path], cfg)
  lm = tiny_config("llama")
  assert spec(lm, "layers_0", "mlp", "gate_proj", "kernel") == P(None, "tensor")
  assert spec(lm, "layers_0", "mlp", "down_proj", "kernel") == P("tensor", None)
  assert spec(lm, "layers_0", "attn", "k_proj", "kernel") == P(None, "tensor")
  assert spec(lm, "layers_0", "attn_norm", "scale") == P()
  assert spec(lm, "lm_head", "kernel") == P()
  bl = tiny_config("bloom")
  assert spec(bl, "layers_0", "attn", "q_proj", "bias") == P("tensor")
  assert spec(bl, "layers_0", "attn", "out_proj", "bias") == P(None)
  assert spec(bl, "embed_norm", "scale") == P()


def test_every_family_builds_and_counts_its_params():
  for fam in families.names():
    cfg = tiny_config(fam)
    count = sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(cfg)))
    assert count == cfg.param_count(), fam
    assert isinstance(cfg, ModelConfig)


def test_gqa_cache_host_log_and_byte_helpers_agree():
  """The cache holds KV heads only, and the byte helpers count exactly the cache's bytes."""
  from dejavu_jax import costmodel as cm  # pylint: disable=g-import-not-at-top
  from dejavu_jax.kv.cache import init_cache_for  # pylint: disable=g-import-not-at-top
  from dejavu_jax.stream import HostKVLog  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("llama", num_kv_heads=1)
  cache = init_cache_for(cfg, 3, 2, 32)
  assert cache.k.shape == (3, 2, 32, 1, cfg.head_dim)
  assert cm.kv_bytes(cfg, 3, 2, 32) == cache.k.nbytes + cache.v.nbytes
  assert HostKVLog.like(cache).kv.shape == (2, 3, 2, 32, 1, cfg.head_dim)
