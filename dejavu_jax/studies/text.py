"""Text in, text out: a real model (a llama GGUF file, by default the packaged SmolLM2-135M-Instruct)
served by the pipeline engine at any depth.

    cfg, params, tok = load_text_model()                     # offline; see models/gguf.py
    with PipelineEngine(cfg, params, text_serve_config(tok, num_stages=2)) as engine:
      for c in complete(engine, tok, ["What is the capital of France?"], max_new_tokens=32):
        print(c.prompt, "->", c.text)

`run_config` serves the prompts of a `configs/generate.py` config (what `experiments/generate.py`,
the command-line front end, calls); the README main job uses `read_prompts` and `encode_prompts`
(models/tokenizer.py) with the same model.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from dejavu_jax.config import ServeConfig
from dejavu_jax.models import gguf
from dejavu_jax.kv.buckets import bucket_length
from dejavu_jax.models.tokenizer import GGUFTokenizer, encode_prompts, read_prompts


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


def run_config(c, prompts: Sequence[str] | None = None) -> list[Completion]:
  """Loads the model of config `c` (configs/generate.py) and serves `prompts` (default: the
  config's `prompts_file`, else its `prompt`) on the configured pipeline."""
  from dejavu_jax.serving.engine import PipelineEngine  # pylint: disable=g-import-not-at-top
  if not prompts:
    prompts = read_prompts(c.prompts_file) if c.prompts_file else [c.prompt]
  cfg, params, tok = load_text_model(c.gguf, c.dtype)
  system = c.system or None
  ids = encode_prompts(tok, prompts, chat=c.chat, system=system)
  max_len = c.max_len or cache_length(ids, c.max_new_tokens, cfg.max_positions)
  serve = text_serve_config(
      tok, num_stages=c.num_stages, tensor=c.tensor, microbatch_size=c.microbatch_size,
      max_len=max_len, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, seed=c.seed)
  with PipelineEngine(cfg, params, serve) as engine:
    return complete(engine, tok, prompts, c.max_new_tokens, chat=c.chat, system=system)
