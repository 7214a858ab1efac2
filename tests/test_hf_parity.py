"""Logits equal transformers' OPTForCausalLM / GPT2LMHeadModel / LlamaForCausalLM /
BloomForCausalLM on the same random weights (more Llama and BLOOM cases:
tests/test_families_parity.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.config import tiny_config
from dejavu_jax.kv.cache import init_cache_for
from dejavu_jax.models.generate import make_steps, pad_prompts
from dejavu_jax.kv.buckets import bucket_length
from dejavu_jax.models.decoder import stage_apply
from tests import hf_util

CONFIGS = {
    "opt": tiny_config("opt"),
    "opt_350m_style": tiny_config("opt", hidden_size=64, word_embed_proj_dim=32,
                                  pre_layer_norm=False),
    "gpt2": tiny_config("gpt2"),
    "llama": tiny_config("llama"),
    "bloom": tiny_config("bloom"),
}
PROMPT, DECODE = 11, 16
TOL = 1e-4


@pytest.fixture(scope="module", params=list(CONFIGS))
def reference(request, tmp_path_factory):
  cfg = CONFIGS[request.param]
  model, loaded_cfg, params = hf_util.saved_and_loaded(cfg, tmp_path_factory.mktemp(request.param))
  return cfg, loaded_cfg, params, model


def test_config_roundtrip(reference):
  cfg, loaded_cfg, _, _ = reference
  assert loaded_cfg.replace(name=cfg.name) == cfg


def test_prefill_and_decode_logits_match_hf(reference):
  _, cfg, params, model = reference
  rng = np.random.default_rng(0)
  seq = rng.integers(0, cfg.vocab_size, size=(2, PROMPT + DECODE)).astype(np.int32)
  want = hf_util.hf_logits(model, seq)                                          # [B, T, V]

  # Prefill with full logits (padded to a bucket, padding must not matter).
  bucket = bucket_length(PROMPT, cfg.max_positions)
  tokens, positions = pad_prompts(seq[:, :PROMPT], bucket, cfg.pad_token_id)
  cache = init_cache_for(cfg, cfg.num_layers, 2, 64)
  cache, logits = jax.jit(lambda p, c, x, pos: stage_apply(cfg, 0, cfg.num_layers, p, c, x, pos))(
      params, cache, tokens, positions)
  np.testing.assert_allclose(np.asarray(logits)[:, :PROMPT], want[:, :PROMPT], atol=TOL, rtol=0)

  # Then DECODE single-token steps through the jitted decode.
  _, decode = make_steps(cfg)
  for t in range(PROMPT, PROMPT + DECODE):
    cache, step_logits = decode(params, cache, jnp.asarray(seq[:, t]),
                                jnp.full((2,), t, jnp.int32))
    np.testing.assert_allclose(np.asarray(step_logits), want[:, t], atol=TOL, rtol=0,
                               err_msg=f"decode step at position {t}")


def test_jitted_prefill_returns_last_prompt_logits(reference):
  _, cfg, params, model = reference
  prompts = [[3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
  prefill, _ = make_steps(cfg)
  tokens, positions = pad_prompts(prompts, 16, cfg.pad_token_id)
  cache = init_cache_for(cfg, cfg.num_layers, 2, 32)
  _, logits = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(positions))
  for i, p in enumerate(prompts):
    want = hf_util.hf_logits(model, [p])[0, -1]
    np.testing.assert_allclose(np.asarray(logits[i]), want, atol=TOL, rtol=0)


def test_greedy_tokens_match_hf_generate(reference):
  _, cfg, params, model = reference
  import torch  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models.generate import generate  # pylint: disable=g-import-not-at-top
  prompt = [5, 17, 33, 2 if cfg.family == "gpt2" else 40, 9]
  with torch.no_grad():
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=cfg.pad_token_id)[0, len(prompt):]
  ours = generate(cfg, params, [prompt], 12, eos_token_id=-1)
  assert ours[0] == ref.tolist()
