"""Frozen model configurations and the presets of every public OPT and GPT-2 size.

A `ModelConfig` is static (hashable): it is closed over by jitted step functions, so changing
one recompiles. Everything that varies per request (lengths, positions) is a traced array.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer of the OPT or GPT-2 family.

  Attributes:
    family: "opt" or "gpt2" ("bloom" exists for sizing only: cost model and planner).
    num_layers, hidden_size, num_heads, ffn_dim, vocab_size: the usual sizes.
    max_positions: number of learned positions (prompt + generated tokens must fit).
    word_embed_proj_dim: OPT-350M embeds in 512 and projects to/from hidden_size.
    pre_layer_norm: False for OPT-350M (post-LayerNorm blocks and no final norm).
    layer_norm_eps: LayerNorm epsilon (1e-5 for both families).
    dtype: parameter and compute dtype name ("float32", "bfloat16", "float16").
    eos_token_id, pad_token_id: special ids (OPT: 2 and 1; GPT-2: 50256 for both).
  """

  name: str
  family: str
  num_layers: int
  hidden_size: int
  num_heads: int
  ffn_dim: int
  vocab_size: int
  max_positions: int
  word_embed_proj_dim: int | None = None
  pre_layer_norm: bool = True
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"
  eos_token_id: int = 2
  pad_token_id: int = 1

  def __post_init__(self):
    if self.family not in ("opt", "gpt2", "bloom"):
      raise ValueError(f"unknown model family {self.family!r}; expected 'opt', 'gpt2' or 'bloom'")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(_DTYPES)}")
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def embed_dim(self) -> int:
    """Width of the token embedding (differs from hidden_size only for OPT-350M)."""
    return self.word_embed_proj_dim or self.hidden_size

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def dtype_bytes(self) -> int:
    return jnp.dtype(self.jnp_dtype).itemsize

  @property
  def has_final_norm(self) -> bool:
    return self.pre_layer_norm

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # ---- sizes used by the KV cache, the cost model and the planner ----
  def layer_param_count(self) -> int:
    """Parameters of one decoder layer (attention + MLP + two LayerNorms)."""
    d, f = self.hidden_size, self.ffn_dim
    return 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d

  def embed_param_count(self) -> int:
    """Token + position embeddings, OPT-350M projections and the final norm (LM head is tied)."""
    n = self.vocab_size * self.embed_dim
    if self.family == "opt":
      n += (self.max_positions + 2) * self.hidden_size
    elif self.family == "gpt2":
      n += self.max_positions * self.hidden_size
    if self.word_embed_proj_dim and self.word_embed_proj_dim != self.hidden_size:
      n += 2 * self.hidden_size * self.word_embed_proj_dim
    if self.has_final_norm:
      n += 2 * self.hidden_size
    return n

  def param_count(self) -> int:
    return self.num_layers * self.layer_param_count() + self.embed_param_count()

  def layer_weight_bytes(self) -> int:
    return self.layer_param_count() * self.dtype_bytes

  def kv_bytes_per_token_per_layer(self) -> int:
    """Bytes of K and V for one token of one sequence in one layer."""
    return 2 * self.hidden_size * self.dtype_bytes


def _opt(name, layers, hidden, heads, **kw) -> ModelConfig:
  return ModelConfig(name=name, family="opt", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, ffn_dim=4 * hidden, vocab_size=50272,
                     max_positions=2048, **kw)


def _gpt2(name, layers, hidden, heads, **kw) -> ModelConfig:
  return ModelConfig(name=name, family="gpt2", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, ffn_dim=4 * hidden, vocab_size=50257,
                     max_positions=1024, eos_token_id=50256, pad_token_id=50256, **kw)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "opt_125m": lambda: _opt("opt_125m", 12, 768, 12),
    "opt_350m": lambda: _opt("opt_350m", 24, 1024, 16, word_embed_proj_dim=512,
                             pre_layer_norm=False),
    "opt_1.3b": lambda: _opt("opt_1.3b", 24, 2048, 32),
    "opt_2.7b": lambda: _opt("opt_2.7b", 32, 2560, 32),
    "opt_6.7b": lambda: _opt("opt_6.7b", 32, 4096, 32),
    "opt_13b": lambda: _opt("opt_13b", 40, 5120, 40),
    "opt_30b": lambda: _opt("opt_30b", 48, 7168, 56),
    "opt_66b": lambda: _opt("opt_66b", 64, 9216, 72),
    "gpt2": lambda: _gpt2("gpt2", 12, 768, 12),
    "gpt2_medium": lambda: _gpt2("gpt2_medium", 24, 1024, 16),
    "gpt2_large": lambda: _gpt2("gpt2_large", 36, 1280, 20),
    "gpt2_xl": lambda: _gpt2("gpt2_xl", 48, 1600, 25),
    # Sizing only (cost model, simulator, planner): there is no BLOOM decoder implementation.
    "bloom_176b": lambda: ModelConfig(name="bloom_176b", family="bloom", num_layers=70,
                                      hidden_size=14336, num_heads=112, ffn_dim=4 * 14336,
                                      vocab_size=250880, max_positions=2048, dtype="float16"),
}


def get_model_config(name: str, **overrides) -> ModelConfig:
  """Returns the preset `name` ("opt_125m", "gpt2_xl", ...) with `overrides` applied."""
  key = name.lower().replace("-", "_")
  if key not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
  cfg = PRESETS[key]()
  return cfg.replace(**overrides) if overrides else cfg


def tiny_config(family: str = "opt", **overrides) -> ModelConfig:
  """A model small enough for unit tests (random weights, milliseconds per step)."""
  base = dict(name=f"tiny_{family}", family=family, num_layers=4, hidden_size=64, num_heads=4,
              ffn_dim=128, vocab_size=128, max_positions=128)
  if family == "gpt2":
    base.update(eos_token_id=127, pad_token_id=127)
  base.update(overrides)
  return ModelConfig(**base)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """How a pipeline serves requests (static for the lifetime of an engine).

  Attributes:
    num_stages: pipeline depth D (stages on disjoint devices).
    tensor: devices per stage (tensor parallelism inside a stage).
    stage_ranges: explicit layer ranges per stage, or None for a balanced split.
    microbatch_size: rows per microbatch; D microbatches are in flight.
    max_len: KV cache length per row (prompt + generated tokens must fit).
    mode: "paper" (a microbatch's rows share prompt and output length, all finish together) or
      "mixed" (per-row lengths; a row's result returns as soon as it finishes).
    pacing: "real" (steps last what they last) or "paced" (each stage step still computes for real
      but lasts the duration the cost model gives; see dejavu_jax/serving/pacing.py).
    eos_token_id: stop token, or None to always generate max_new_tokens.
    temperature, top_k, top_p: sampling (temperature 0 is greedy).
    seed: PRNG seed of sampling.
    step_timeout_s: a stage step that takes longer than this is an error (a hang fails fast).
    heartbeat_s, heartbeat_timeout_s: worker heartbeat period, and the silence after which the
      controller declares a worker dead (the paper: 1 s and 3 s).
    recovery: what happens to in-flight work when a worker dies: a strategy or a fallback chain,
      "restart" | "reprefill" | "replica" | "snapshot" | e.g. "replica,snapshot,reprefill" (see
      dejavu_jax/fault/strategies.py).
    snapshot_every, snapshot_dir: the `snapshot` strategy's period (steps of a worker) and
      directory (None: a temporary directory).
    program: "model" (the transformer) or "fake" (pipeline/fake.py: arithmetic you can check by
      hand; tests and failure campaigns).
    max_pending: admission control: at most this many admitted requests wait for a microbatch
      slot; one arriving when the queue is full is rejected ("queue full"). None: unbounded.
    raise_on_error: when serving fails (a stage error, a hang), `serve` raises an `EngineError`
      carrying what was served so far (True), or returns it with `ServeResult.error` set (False).
  """

  num_stages: int = 1
  tensor: int = 1
  stage_ranges: tuple[tuple[int, int], ...] | None = None
  microbatch_size: int = 4
  max_len: int = 256
  mode: str = "mixed"
  pacing: str = "real"
  eos_token_id: int | None = None
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  step_timeout_s: float = 120.0
  heartbeat_s: float = 1.0
  heartbeat_timeout_s: float = 3.0
  recovery: str = "restart"
  snapshot_every: int = 8
  snapshot_dir: str | None = None
  program: str = "model"
  max_pending: int | None = None
  raise_on_error: bool = True

  def __post_init__(self):
    # Each field checked by name here, so a bad value fails at construction, not mid-serve
    # (a heartbeat_s of 0 would spin the heartbeat threads, a NaN timeout never fire).
    _positive_int(self, "max_len", "microbatch_size", "num_stages", "tensor", "snapshot_every")
    _positive_float(self, "step_timeout_s", "heartbeat_s", "heartbeat_timeout_s")
    if not _is_int(self.top_k) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0 (0: no top-k), got {self.top_k!r}")
    if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
      raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
    if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if self.max_pending is not None and (not _is_int(self.max_pending) or self.max_pending < 1):
      raise ValueError(f"max_pending must be None (unbounded) or an integer >= 1, got "
                       f"{self.max_pending!r}")
    if self.eos_token_id is not None and (not _is_int(self.eos_token_id) or
                                          self.eos_token_id < 0):
      raise ValueError(f"eos_token_id must be None or a token id >= 0, got {self.eos_token_id!r}")
    if self.program not in ("model", "fake"):
      raise ValueError(f"unknown stage program {self.program!r}; expected 'model' or 'fake'")
    if self.heartbeat_timeout_s <= self.heartbeat_s:
      raise ValueError(f"heartbeat_timeout_s {self.heartbeat_timeout_s} must exceed the "
                       f"heartbeat period {self.heartbeat_s}")
    if self.mode not in ("paper", "mixed"):
      raise ValueError(f"unknown serving mode {self.mode!r}; expected 'paper' or 'mixed'")
    if self.pacing not in ("real", "paced"):
      raise ValueError(f"unknown pacing {self.pacing!r}; expected 'real' or 'paced'")


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _positive_int(cfg, *names: str) -> None:
  for name in names:
    v = getattr(cfg, name)
    if not _is_int(v) or v < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def _positive_float(cfg, *names: str) -> None:
  for name in names:
    v = getattr(cfg, name)
    if not _is_real(v) or not 0 < v < math.inf:   # NaN fails both comparisons
      raise ValueError(f"{name} must be a finite number > 0 (seconds), got {v!r}")
