"""A text tokenizer built from a GGUF file's metadata (no tokenizer.json, nothing downloaded).

llama.cpp stores the tokenizer inside the GGUF file: `tokenizer.ggml.model` (the algorithm),
`tokens` (id -> string), `token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
6 byte), `merges` ("a b" strings, rank order), `pre` (the pre-tokenizer's name), the special ids
and `chat_template` (Jinja, the same text Hugging Face keeps in tokenizer_config.json).

Supported: `model == "gpt2"` (byte-level BPE, what SmolLM2, Llama-3, Qwen and GPT-2 use) with the
pre-tokenizers named in `_PRE_TOKENIZERS`. Anything else is a ValueError naming the value, never
a silently different tokenization.

    tok = tokenizer_from_gguf(metadata)
    ids = tok.encode(tok.chat_prompt("What is the capital of France?"))
    text = tok.decode(ids)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp `tokenizer.ggml.pre` names -> whether digits are split one by one before the GPT-2
# byte-level regex. (llama.cpp's "smollm" runs `\p{N}` and then the GPT-2 regex; "gpt-2" runs
# the GPT-2 regex alone.)
_PRE_TOKENIZERS = {"gpt-2": False, "default": False, "smollm": True}


@dataclasses.dataclass(frozen=True)
class Message:
  role: str
  content: str


class GGUFTokenizer:
  """Encode / decode text and render the chat template, from a GGUF file's tokenizer metadata.

  Attributes:
    vocab_size: number of token ids.
    bos_token_id, eos_token_id, pad_token_id: special ids from the metadata (None if absent).
    chat_template: the Jinja chat template, or None for a model without one.
    special_ids: ids of control tokens (skipped by `decode(skip_special=True)`).
  """

  def __init__(self, tokenizer, *, bos_token_id, eos_token_id, pad_token_id, add_bos: bool,
               chat_template: str | None, special_ids: frozenset[int]):
    self._tok = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
    self.add_bos = add_bos
    self.chat_template = chat_template
    self.special_ids = special_ids
    self._template = None

  # ---- text <-> ids ----
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; control tokens written in the text (`<|im_start|>`) are matched as
    single tokens. A BOS is prepended only when the GGUF says `add_bos_token`."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if self.add_bos and self.bos_token_id is not None:
      ids = [self.bos_token_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def token(self, i: int) -> str:
    """The vocabulary string of id `i` (byte-level form, e.g. 'Ġthe')."""
    return self._tok.id_to_token(int(i))

  # ---- chat ----
  def apply_chat_template(self, messages: Sequence[Message | dict],
                          add_generation_prompt: bool = True) -> str:
    """The chat template rendered over `messages` (dicts with 'role' and 'content', or Message),
    as text; encode it with `encode`."""
    if self.chat_template is None:
      raise ValueError("this GGUF model has no tokenizer.chat_template; encode plain text instead")
    if self._template is None:
      import jinja2.sandbox  # pylint: disable=g-import-not-at-top
      env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
      env.globals["raise_exception"] = _raise_template_error
      self._template = env.from_string(self.chat_template)
    msgs = [dataclasses.asdict(m) if isinstance(m, Message) else dict(m) for m in messages]
    return self._template.render(
        messages=msgs, add_generation_prompt=add_generation_prompt,
        bos_token=self.token(self.bos_token_id) if self.bos_token_id is not None else "",
        eos_token=self.token(self.eos_token_id) if self.eos_token_id is not None else "")

  def chat_prompt(self, user: str, system: str | None = None) -> str:
    """One user turn (after an optional system turn) rendered with the generation prompt."""
    msgs = ([Message("system", system)] if system is not None else []) + [Message("user", user)]
    return self.apply_chat_template(msgs)

  def encode_chat(self, user: str, system: str | None = None) -> list[int]:
    return self.encode(self.chat_prompt(user, system))


def _raise_template_error(message: str):
  raise ValueError(f"chat template: {message}")


def _meta(meta: dict, key: str, default=None):
  return meta.get(key, default)


def tokenizer_from_gguf(meta: dict) -> GGUFTokenizer:
  """A GGUFTokenizer from a GGUF metadata dict (key -> value, as `gguf.read_metadata` gives)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  kind = _meta(meta, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', "
                     "byte-level BPE)")
  pre = _meta(meta, "tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; known: "
                     f"{sorted(_PRE_TOKENIZERS)}")
  tokens = list(meta["tokenizer.ggml.tokens"])
  types = list(_meta(meta, "tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError("GGUF tokenizer.ggml.tokens has duplicate strings")
  unk = _meta(meta, "tokenizer.ggml.unknown_token_id")
  bpe = models.BPE(vocab=vocab, merges=merges, unk_token=None if unk is None else tokens[unk],
                   fuse_unk=False, byte_fallback=False)
  tok = Tokenizer(bpe)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(
      _meta(meta, "tokenizer.ggml.add_space_prefix", False)), use_regex=True)
  if _PRE_TOKENIZERS[pre]:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  # Control and user-defined tokens are matched whole in the input text, before BPE.
  control = [i for i, t in enumerate(types) if t == CONTROL]
  user = [i for i, t in enumerate(types) if t == USER_DEFINED]
  tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
  tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
  for i in control + user:  # adding must not have created new ids
    if tok.token_to_id(tokens[i]) != i:
      raise ValueError(f"GGUF special token {tokens[i]!r} does not map back to id {i}")
  return GGUFTokenizer(
      tok,
      bos_token_id=_meta(meta, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_meta(meta, "tokenizer.ggml.eos_token_id"),
      pad_token_id=_meta(meta, "tokenizer.ggml.padding_token_id"),
      add_bos=bool(_meta(meta, "tokenizer.ggml.add_bos_token", False)),
      chat_template=_meta(meta, "tokenizer.chat_template"),
      special_ids=frozenset(control))


# The prompts shipped in the repository for real-model runs (the README main job, generate.py).
PROMPTS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "data", "prompts.txt")


def read_prompts(path: str = PROMPTS_FILE) -> list[str]:
  """Prompts from a text file: one per line; blank lines and lines starting with '#' skipped.
  (`data/prompts.txt` in the repository is the shipped set.)"""
  with open(path, encoding="utf-8") as f:
    prompts = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
  if not prompts:
    raise ValueError(f"no prompts in {path!r}")
  return prompts


def encode_prompts(tok: GGUFTokenizer, prompts: Sequence[str], chat: bool = True,
                   system: str | None = None) -> list[list[int]]:
  """Token ids per prompt: each as one user turn through the chat template (`chat=True`; the
  model's default system turn unless `system` is given), or as plain text."""
  return [tok.encode_chat(p, system) if chat else tok.encode(p) for p in prompts]
