"""Text in, text out: a real model (a llama GGUF file, by default the packaged SmolLM2-135M-Instruct)
served by the pipeline engine at any depth.

    cfg, params, tok = load_text_model()                     # offline; see models/gguf.py
    with PipelineEngine(cfg, params, text_serve_config(tok, num_stages=2)) as engine:
      for c in complete(engine, tok, ["What is the capital of France?"], max_new_tokens=32):
        print(c.prompt, "->", c.text)

`experiments/generate.py` is the command-line front end; the README main job uses `read_prompts`
and `encode_prompts` (models/tokenizer.py) with the same model.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from dejavu_jax.config import ServeConfig
from dejavu_jax.models import gguf
from dejavu_jax.models.generate import bucket_length
from dejavu_jax.models.tokenizer import GGUFTokenizer, encode_prompts


@dataclasses.dataclass(frozen=True)
class Completion:
  prompt: str
  prompt_ids: tuple[int, ...]
  token_ids: tuple[int, ...]     # generated ids (the stop token included when one was produced)
  text: str                      # decoded, special tokens skipped


def load_text_model(path: str = "", dtype: str = "float32"):
  """(ModelConfig, params, tokenizer) of a llama GGUF file; "" is the packaged SmolLM2."""
  if not path:
    return gguf.load_smollm2(dtype)
  return gguf.load_llama_gguf(path, dtype)


def cache_length(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, limit: int) -> int:
  """A KV cache length that fits the longest prompt plus the new tokens (a power of two, at most
  `limit`, the model's context)."""
  return bucket_length(max(len(p) for p in prompt_ids) + max_new_tokens, limit)


def text_serve_config(tok: GGUFTokenizer, **kw) -> ServeConfig:
  """A ServeConfig that stops each row at the tokenizer's end-of-turn/EOS token."""
  kw.setdefault("eos_token_id", tok.eos_token_id)
  return ServeConfig(**kw)


def complete(engine, tok: GGUFTokenizer, prompts: Sequence[str], max_new_tokens: int,
             chat: bool = True, system: str | None = None) -> list[Completion]:
  """Generates a completion per prompt with `engine` (a PipelineEngine or anything with its
  `generate(prompt_ids, max_new_tokens)`), in order."""
  ids = encode_prompts(tok, prompts, chat=chat, system=system)
  outs = engine.generate(ids, max_new_tokens)
  return [Completion(p, tuple(i), tuple(o), tok.decode(o)) for p, i, o in zip(prompts, ids, outs)]
