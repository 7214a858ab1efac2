"""Frozen model configurations, the presets of public OPT, GPT-2, Llama, SmolLM2 and BLOOM sizes,
and ServeConfig.

A `ModelConfig` is static (hashable): it is closed over by jitted step functions, so changing
one recompiles. Everything that varies per request (lengths, positions) is a traced array.
`FAMILY_TRAITS` holds the shape-level traits of each model family (norm, gating, positions,
biases: what parameter counts and the tiny test configs need); everything else a family means
(activations, Hugging Face names, parameter axes) lives in `models/families/`, which builds its
`Family` records on these traits. This module imports nothing of the package: it is the bottom
layer.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class FamilyTraits:
  """The shape-level traits of one decoder family (declared once, here; `models.families` adds
  the code-level ones).

  Attributes:
    name: the `ModelConfig.family` value.
    norm: "layernorm" (scale and bias) or "rmsnorm" (scale only).
    gated_mlp: MLP is down(act(gate(x)) * up(x)) (SwiGLU) instead of fc2(act(fc1(x))).
    positions: "learned" (a position table added to the embeddings), "rope" (rotary embedding of
      q and k) or "alibi" (a per-head linear bias on the attention scores).
    position_offset: rows of the learned table in front of position 0 (OPT's fairseq legacy: 2).
    bias: whether the attention and MLP projections have biases.
    embed_norm: a norm right after the token embedding (BLOOM's word_embeddings_layernorm).
    tiny: what `tiny_config(name)` changes for this family (ids, head layout), as pairs.
  """

  name: str
  norm: str
  gated_mlp: bool
  positions: str
  position_offset: int = 0
  bias: bool = True
  embed_norm: bool = False
  tiny: tuple[tuple[str, object], ...] = ()

  def __post_init__(self):
    if self.norm not in ("layernorm", "rmsnorm"):
      raise ValueError(f"family {self.name}: unknown norm {self.norm!r}")
    if self.positions not in ("learned", "rope", "alibi"):
      raise ValueError(f"family {self.name}: unknown position scheme {self.positions!r}")


FAMILY_TRAITS: dict[str, FamilyTraits] = {t.name: t for t in (
    FamilyTraits("opt", "layernorm", False, "learned", position_offset=2),
    FamilyTraits("gpt2", "layernorm", False, "learned",
                 tiny=(("eos_token_id", 127), ("pad_token_id", 127))),
    FamilyTraits("llama", "rmsnorm", True, "rope", bias=False,
                 tiny=(("num_kv_heads", 2), ("tie_word_embeddings", False),
                       ("layer_norm_eps", 1e-5), ("pad_token_id", 0))),
    # HF BLOOM's MLP is always 4 x hidden.
    FamilyTraits("bloom", "layernorm", False, "alibi", embed_norm=True,
                 tiny=(("ffn_dim", 256), ("pad_token_id", 3))),
)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer of a registered family.

  Attributes:
    family: a name in the family registry ("opt", "gpt2", "llama", "bloom").
    num_layers, hidden_size, num_heads, ffn_dim, vocab_size: the usual sizes.
    max_positions: context length (learned positions: rows of the table; RoPE and ALiBi: the
      longest context the cache may hold). Prompt + generated tokens must fit.
    word_embed_proj_dim: OPT-350M embeds in 512 and projects to/from hidden_size.
    pre_layer_norm: False for OPT-350M (post-LayerNorm blocks and no final norm).
    layer_norm_eps: LayerNorm or RMSNorm epsilon.
    dtype: parameter and compute dtype name ("float32", "bfloat16", "float16").
    eos_token_id: stop token (None: the model has none); pad_token_id: fills padding (never
      attended, so any id in the vocabulary is sound).
    num_kv_heads: key/value heads (grouped-query attention); None means num_heads. The KV cache
      is [L, B, S, num_kv_heads, K].
    tie_word_embeddings: the LM head is the token embedding (else a separate `lm_head`).
    rope_theta: RoPE base (families with rotary positions).
    rope_scaling: None (plain RoPE) or sorted (key, value) pairs of a frequency rescaling, as
      Hugging Face's rope_parameters name them: rope_type "linear" (factor) or "llama3" (factor,
      low_freq_factor, high_freq_factor, original_max_position_embeddings; Llama-3.1 and later).
    attn_scale: attention score scale; None means 1/sqrt(head_dim) (GPT-2's
      scale_attn_weights=False is 1.0).
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
  eos_token_id: int | None = 2
  pad_token_id: int = 1
  num_kv_heads: int | None = None
  tie_word_embeddings: bool = True
  rope_theta: float = 10000.0
  attn_scale: float | None = None
  rope_scaling: tuple[tuple[str, float | str], ...] | None = None

  def __post_init__(self):
    if self.family not in FAMILY_TRAITS:
      raise ValueError(f"unknown model family {self.family!r}; expected one of "
                       f"{', '.join(FAMILY_TRAITS)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads {self.num_kv_heads} must be >= 1 and divide num_heads "
                       f"{self.num_heads}")
    # (Not checked against vocab_size: presets shrunk by overrides keep their special ids.)
    if self.pad_token_id is None or self.pad_token_id < 0:
      raise ValueError(f"pad_token_id must be a token id (int >= 0), got {self.pad_token_id!r}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(_DTYPES)}")
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")

  @property
  def traits(self) -> FamilyTraits:
    """The shape-level traits of this config's family (`models.families.get` has the rest)."""
    return FAMILY_TRAITS[self.family]

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
    # A multi-head config (num_kv_heads == num_heads) stays multi-head when num_heads changes.
    if "num_heads" in kw and "num_kv_heads" not in kw and self.num_kv_heads == self.num_heads:
      kw["num_kv_heads"] = None
    return dataclasses.replace(self, **kw)

  # ---- sizes used by the KV cache, the cost model and the planner ----
  def layer_matmul_params(self) -> int:
    """Weights of one layer's matrix products (q, k, v, out and the MLP projections)."""
    d, f = self.hidden_size, self.ffn_dim
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    return 2 * d * q + 2 * d * kv + (3 if self.traits.gated_mlp else 2) * d * f

  def _norm_params(self) -> int:
    return self.hidden_size * (1 if self.traits.norm == "rmsnorm" else 2)

  def layer_param_count(self) -> int:
    """Parameters of one decoder layer (attention + MLP + two norms)."""
    fam = self.traits
    d, f = self.hidden_size, self.ffn_dim
    n = self.layer_matmul_params() + 2 * self._norm_params()
    if fam.bias:
      q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
      n += q + 2 * kv + d + (2 * f if fam.gated_mlp else f) + d
    return n

  def embed_param_count(self) -> int:
    """Token (+ learned position) embeddings, embedding norm, OPT-350M projections, the final
    norm and an untied LM head."""
    fam = self.traits
    n = self.vocab_size * self.embed_dim
    if fam.positions == "learned":
      n += (self.max_positions + fam.position_offset) * self.hidden_size
    if fam.embed_norm:
      n += self._norm_params()
    if self.word_embed_proj_dim and self.word_embed_proj_dim != self.hidden_size:
      n += 2 * self.hidden_size * self.word_embed_proj_dim
    if self.has_final_norm:
      n += self._norm_params()
    if not self.tie_word_embeddings:
      n += self.vocab_size * self.embed_dim
    return n

  def param_count(self) -> int:
    return self.num_layers * self.layer_param_count() + self.embed_param_count()

  def layer_weight_bytes(self) -> int:
    return self.layer_param_count() * self.dtype_bytes

  def kv_bytes_per_token_per_layer(self) -> int:
    """Bytes of K and V for one token of one sequence in one layer (KV heads, not query heads)."""
    return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes


def _opt(name, layers, hidden, heads, **kw) -> ModelConfig:
  return ModelConfig(name=name, family="opt", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, ffn_dim=4 * hidden, vocab_size=50272,
                     max_positions=2048, **kw)


def _gpt2(name, layers, hidden, heads, **kw) -> ModelConfig:
  return ModelConfig(name=name, family="gpt2", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, ffn_dim=4 * hidden, vocab_size=50257,
                     max_positions=1024, eos_token_id=50256, pad_token_id=50256, **kw)


def _llama(name, layers, hidden, heads, kv_heads, ffn, vocab, positions, theta, tied, **kw):
  # rms_norm_eps is 1e-5 in the Llama-2, Llama-3 and SmolLM2 config.json files.
  return ModelConfig(name=name, family="llama", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, num_kv_heads=kv_heads, ffn_dim=ffn, vocab_size=vocab,
                     max_positions=positions, rope_theta=theta, tie_word_embeddings=tied,
                     layer_norm_eps=1e-5, **kw)


def _bloom(name, layers, hidden, heads, **kw) -> ModelConfig:
  return ModelConfig(name=name, family="bloom", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, ffn_dim=4 * hidden, vocab_size=250880,
                     max_positions=2048, eos_token_id=2, pad_token_id=3, **kw)


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
    # Llama-2 (eos 2; no pad token: 0 is <unk>), Llama-3 (eos <|end_of_text|>), SmolLM2 (the
    # Instruct ids: bos 1, eos and pad 2 <|im_end|>).
    "llama2_7b": lambda: _llama("llama2_7b", 32, 4096, 32, 32, 11008, 32000, 4096, 1e4, False,
                                eos_token_id=2, pad_token_id=0),
    "llama2_13b": lambda: _llama("llama2_13b", 40, 5120, 40, 40, 13824, 32000, 4096, 1e4, False,
                                 eos_token_id=2, pad_token_id=0),
    "llama2_70b": lambda: _llama("llama2_70b", 80, 8192, 64, 8, 28672, 32000, 4096, 1e4, False,
                                 eos_token_id=2, pad_token_id=0),
    "llama3_8b": lambda: _llama("llama3_8b", 32, 4096, 32, 8, 14336, 128256, 8192, 5e5, False,
                                eos_token_id=128001, pad_token_id=128001),
    "smollm2_135m": lambda: _llama("smollm2_135m", 30, 576, 9, 3, 1536, 49152, 8192, 1e5, True,
                                   eos_token_id=2, pad_token_id=2),
    "smollm2_360m": lambda: _llama("smollm2_360m", 32, 960, 15, 5, 2560, 49152, 8192, 1e5, True,
                                   eos_token_id=2, pad_token_id=2),
    "smollm2_1_7b": lambda: _llama("smollm2_1_7b", 24, 2048, 32, 32, 8192, 49152, 8192, 1.3e5,
                                   True, eos_token_id=2, pad_token_id=2),
    "bloom_560m": lambda: _bloom("bloom_560m", 24, 1024, 16),
    "bloom_1b1": lambda: _bloom("bloom_1b1", 24, 1536, 16),
    "bloom_1b7": lambda: _bloom("bloom_1b7", 24, 2048, 16),
    "bloom_3b": lambda: _bloom("bloom_3b", 30, 2560, 32),
    "bloom_7b1": lambda: _bloom("bloom_7b1", 30, 4096, 32),
    # float16 as the cost-model and simulator experiments have always sized it.
    "bloom_176b": lambda: _bloom("bloom_176b", 70, 14336, 112, dtype="float16"),
}


def get_model_config(name: str, **overrides) -> ModelConfig:
  """Returns the preset `name` ("opt_125m", "gpt2_xl", "llama3_8b", ...) with `overrides`."""
  key = name.lower().replace("-", "_")
  if key not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
  cfg = PRESETS[key]()
  return cfg.replace(**overrides) if overrides else cfg


def tiny_config(family: str = "opt", **overrides) -> ModelConfig:
  """A model small enough for unit tests (random weights, milliseconds per step); each family
  adjusts it (`Family.tiny`: e.g. Llama is grouped-query with an untied head)."""
  if family not in FAMILY_TRAITS:
    raise ValueError(f"unknown model family {family!r}; expected one of "
                     f"{', '.join(FAMILY_TRAITS)}")
  base = dict(name=f"tiny_{family}", family=family, num_layers=4, hidden_size=64, num_heads=4,
              ffn_dim=128, vocab_size=128, max_positions=128)
  base.update(dict(FAMILY_TRAITS[family].tiny))
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
    progress_timeout_s: the progress watchdog: a stage that has work waiting and finishes no step
      for this long is stalled, and is killed and replaced like a crashed one.
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
    swapping: microbatch swapping (kv/swapping.py): "off" (D device cache buffers per worker),
      "on" (every cache in host memory, 2 device buffers), "auto" (on only where the cost model
      says the swap-in hides under the step; kv/budget.py `choose`).
    device_kv_budget_bytes: device bytes per worker for KV cache buffers; when set, it decides
      the microbatch size (the largest whose D, or with swapping 2, buffers fit) and
      `microbatch_size` is ignored. None: no budget.
    device_kv_budget_fraction: the budget as a fraction of the device's memory (devices that
      report it, i.e. GPUs); at most one of the two budgets.
    swap_context: the context length "auto" judges the swap-in at (None: max_len).
    runtime: "local" (workers as threads of this process) or "ray" (Ray actor processes; a
      failure is a SIGKILL; runtime/ray.py). The ray_* fields apply to "ray" only:
    ray_address: a running Ray cluster ("auto", "host:6379"), or None for a local session on
      127.0.0.1 without a dashboard.
    ray_placement: "pack" (stages where they fit) or "spread" (one stage per node).
    ray_transport: activations and replicas between actors: "object_store" (default) or
      "jax_transfer" (jax.experimental.transfer under a watchdog).
    ray_gpus_per_stage: GPUs per stage actor (0: CPU, one device per actor).
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
  progress_timeout_s: float = 30.0
  recovery: str = "restart"
  snapshot_every: int = 8
  snapshot_dir: str | None = None
  program: str = "model"
  max_pending: int | None = None
  raise_on_error: bool = True
  # ---- microbatch swapping and the device KV budget (kv/swapping.py, kv/budget.py) ----
  swapping: str = "off"
  device_kv_budget_bytes: int | None = None
  device_kv_budget_fraction: float | None = None
  swap_context: int | None = None
  # ---- prompt-token disaggregation (serving/disagg_engine.py; 0 stages: the colocated engine)
  # prompt_stages Dp and token_stages Dt on disjoint devices (num_stages is then unused);
  # host_slots: prompt caches each token worker holds in host memory (None: Dp + Dt);
  # stream_link: the prompt -> token link paced runs model (costmodel.LINKS name, None: free).
  prompt_stages: int = 0
  token_stages: int = 0
  host_slots: int | None = None
  stream_link: str | None = None
  # layerwise_stream: prompt workers prefill layer by layer and stream each layer's KV as soon as
  # it is dispatched (False: one packet per token stage after the whole stage step; the ablation).
  layerwise_stream: bool = True
  # ---- runtime (issue 14): where the workers run ----
  runtime: str = "local"
  ray_address: str | None = None
  ray_placement: str = "pack"
  ray_transport: str = "object_store"
  ray_gpus_per_stage: float = 0.0

  def __post_init__(self):
    # Each field checked by name here, so a bad value fails at construction, not mid-serve
    # (a heartbeat_s of 0 would spin the heartbeat threads, a NaN timeout never fire).
    _positive_int(self, "max_len", "microbatch_size", "num_stages", "tensor", "snapshot_every")
    _positive_float(self, "step_timeout_s", "heartbeat_s", "heartbeat_timeout_s",
                    "progress_timeout_s")
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
    if self.swapping not in ("off", "on", "auto"):
      raise ValueError(f"unknown swapping mode {self.swapping!r}; expected 'off', 'on' or "
                       "'auto'")
    if self.device_kv_budget_bytes is not None and (
        not _is_int(self.device_kv_budget_bytes) or self.device_kv_budget_bytes < 1):
      raise ValueError(f"device_kv_budget_bytes must be None or an integer >= 1 (bytes per "
                       f"worker), got {self.device_kv_budget_bytes!r}")
    if self.device_kv_budget_fraction is not None and (
        not _is_real(self.device_kv_budget_fraction) or
        not 0 < self.device_kv_budget_fraction <= 1):
      raise ValueError(f"device_kv_budget_fraction must be None or in (0, 1], got "
                       f"{self.device_kv_budget_fraction!r}")
    if self.device_kv_budget_bytes is not None and self.device_kv_budget_fraction is not None:
      raise ValueError("give device_kv_budget_bytes or device_kv_budget_fraction, not both")
    if self.swap_context is not None and (not _is_int(self.swap_context) or
                                          not 1 <= self.swap_context <= self.max_len):
      raise ValueError(f"swap_context must be None or an integer in [1, max_len "
                       f"{self.max_len}], got {self.swap_context!r}")
    _check_runtime(self)


def _check_runtime(cfg) -> None:
  choices = {"runtime": ("local", "ray"), "ray_placement": ("pack", "spread"),
             "ray_transport": ("object_store", "jax_transfer")}
  for name, ok in choices.items():
    if getattr(cfg, name) not in ok:
      raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; expected one of {list(ok)}")
  if not _is_real(cfg.ray_gpus_per_stage) or not 0 <= cfg.ray_gpus_per_stage < math.inf:
    raise ValueError(f"ray_gpus_per_stage must be a number >= 0, got {cfg.ray_gpus_per_stage!r}")


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
