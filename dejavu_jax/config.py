"""Frozen model configurations, the presets of public OPT, GPT-2, Llama, SmolLM2 and BLOOM sizes,
and ServeConfig.

A `ModelConfig` is static (hashable): it is closed over by jitted step functions, so changing
one recompiles. Everything that varies per request (lengths, positions) is a traced array.
`FAMILY_TRAITS` holds the shape-level traits of each model family (norm, gating, positions,
biases: what parameter counts and the tiny test configs need); everything else a family means
(activations, Hugging Face names, parameter axes) lives in `models/families/`, which builds its
`Family` records on these traits. This module imports nothing of the package: it is the bottom
layer.

`ServeConfig` is grouped by concern (`SERVE_GROUPS`: topology, sampling, fault, admission,
memory, disagg, cluster, timing); each field is declared once with its meaning, each group checks
its own fields (`ServeConfigError` names the field), and `serve_fields()`, `serve_field_paths()`
(flat name -> "group.name") and `serve_help()` are generated from the declarations.

Why one module over 400 lines: every ServeConfig field is declared here with its documentation
(the one place docs, validation and --help are generated from); splitting the groups across
files would scatter the one declaration a researcher reads.
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


# ---------------------------------------------------------------------------------------------
# ServeConfig: how a pipeline serves, grouped by concern (STYLE.md item 15).
#
# Every field is declared once, with its meaning, by `_field(default, doc)`; each group checks
# its own fields and names the field in its error (`ServeConfigError.field`); `serve_fields()`,
# `serve_field_paths()` and `serve_help()` are generated from these declarations (the serve
# experiment's --help and --print_config, and the integrator's flat -> nested rewrite map).
# Field names are unique across groups, so a flat name (`recovery`) says which group it lives in.
# ---------------------------------------------------------------------------------------------


class ServeConfigError(ValueError):
  """A ServeConfig field has a bad value; `field` is its (flat) name, and the message starts
  with it."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


def _field(default, doc: str, kind: type | None = None):
  """A documented field. `kind` is the value type of a field whose default is None (what a
  command-line override of it is parsed as)."""
  return dataclasses.field(default=default, metadata={"doc": doc, "kind": kind})


def _fail(name: str, message: str):
  raise ServeConfigError(name, message)


def _check_int(obj, name: str, lo: int = 1, optional: bool = False) -> None:
  v = getattr(obj, name)
  if optional and v is None:
    return
  if not _is_int(v) or v < lo:
    _fail(name, f"must be {'None or ' if optional else ''}an integer >= {lo}, got {v!r}")


def _check_seconds(obj, *names: str) -> None:
  for name in names:
    v = getattr(obj, name)
    if not _is_real(v) or not 0 < v < math.inf:   # NaN fails both comparisons
      _fail(name, f"must be a finite number > 0 (seconds), got {v!r}")


def _check_choice(obj, name: str, choices: tuple, what: str | None = None) -> None:
  v = getattr(obj, name)
  if v not in choices:
    _fail(name, f"unknown {what or name} {v!r}; expected one of {list(choices)}")


# The data-parallel router's policies (serving/dataparallel.py ROUTERS implements each).
ROUTING_POLICIES = ("least_loaded", "round_robin")


@dataclasses.dataclass(frozen=True)
class TopologyConfig:
  """The pipeline: stages, devices, microbatches, cache length, serving mode, stage program."""

  num_stages: int = _field(1, "pipeline depth D (stages on disjoint devices)")
  tensor: int = _field(1, "devices per stage (tensor parallelism inside a stage); num_stages * "
                          "tensor devices in all")
  stage_ranges: tuple[tuple[int, int], ...] | None = _field(
      None, "explicit layer ranges [start, stop) per stage, or None for a balanced split", tuple)
  microbatch_size: int = _field(4, "rows (requests) per microbatch; D microbatches are in flight")
  max_len: int = _field(256, "KV cache length per row (prompt + generated tokens must fit)")
  mode: str = _field("mixed", "'mixed' (per-row lengths; a row's result returns as soon as it "
                              "finishes) | 'paper' (a microbatch's rows share prompt and output "
                              "length and finish together)")
  program: str = _field("model", "stage program: 'model' (the transformer) | 'fake' "
                                 "(pipeline/fake.py: arithmetic you can check by hand; tests and "
                                 "failure campaigns)")
  data_parallel: int = _field(1, "R data-parallel replicas of the whole pipeline (colocated, or "
                                 "the prompt + token pipelines), each on its own devices (R times "
                                 "one replica's), behind one router (serving/dataparallel.py)")
  routing: str = _field("least_loaded", "which replica a request goes to (data_parallel > 1): "
                                        "'least_loaded' (fewest outstanding requests, then fewest "
                                        "outstanding tokens) | 'round_robin'")

  def __post_init__(self):
    _check_int(self, "num_stages")
    _check_int(self, "tensor")
    _check_int(self, "microbatch_size")
    _check_int(self, "max_len")
    _check_choice(self, "mode", ("mixed", "paper"), "serving mode")
    _check_choice(self, "program", ("model", "fake"), "stage program")
    _check_int(self, "data_parallel")
    _check_choice(self, "routing", ROUTING_POLICIES, "routing policy")
    if self.stage_ranges is not None and not (
        isinstance(self.stage_ranges, (tuple, list)) and
        all(isinstance(r, (tuple, list)) and len(r) == 2 for r in self.stage_ranges)):
      _fail("stage_ranges", f"must be None or (start, stop) pairs, got {self.stage_ranges!r}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen (the engine's and `models.generate`'s one sampling config)."""

  temperature: float = _field(0.0, "sampling temperature; 0 is greedy")
  top_k: int = _field(0, "sample among the k most likely tokens (0: all)")
  top_p: float = _field(1.0, "sample among the smallest set of tokens holding this probability "
                             "mass, in (0, 1] (1: all)")
  seed: int = _field(0, "PRNG seed of sampling (the serve experiments also seed the random "
                        "weights and the workload with it)")
  eos_token_id: int | None = _field(None, "stop token, or None to always generate the requested "
                                          "number of tokens", int)

  def __post_init__(self):
    if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
      _fail("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
    _check_int(self, "top_k", lo=0)
    if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
      _fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
    _check_int(self, "seed", lo=0)
    _check_int(self, "eos_token_id", lo=0, optional=True)


@dataclasses.dataclass(frozen=True)
class FaultConfig:
  """Failure detection and recovery (dejavu_jax/fault/)."""

  recovery: str = _field("restart", "what happens to in-flight work when a worker dies: a "
                                    "strategy ('restart' | 'reprefill' | 'replica' | 'snapshot') "
                                    "or a fallback chain such as 'replica,snapshot,reprefill' "
                                    "(fault/strategies.py)")
  snapshot_every: int = _field(8, "the snapshot strategy's period, in steps of a worker")
  snapshot_dir: str | None = _field(None, "the snapshot strategy's directory (None: a temporary "
                                          "directory)", str)
  heartbeat_s: float = _field(1.0, "worker heartbeat period in seconds (the paper: 1 s)")
  heartbeat_timeout_s: float = _field(3.0, "silence in seconds after which a worker is declared "
                                           "dead; must exceed heartbeat_s (the paper: 3 s)")
  progress_timeout_s: float = _field(30.0, "progress watchdog: a stage with work waiting that "
                                           "finishes no step for this many seconds is stalled, "
                                           "and is killed and replaced like a crashed one")
  step_timeout_s: float = _field(120.0, "a stage step that takes longer than this many seconds "
                                        "is an error (a hang fails fast)")
  cache_probe: bool = _field(False, "the cache oracle (serving/cache_oracle.py): every token "
                                    "worker reports a digest of each used cache row after every "
                                    "step, restore, swap-in and prompt load, kept in "
                                    "ServeResult.cache_probes (a host copy of the cache per "
                                    "step: for checks, not for timing)")

  def __post_init__(self):
    if not isinstance(self.recovery, str) or not self.recovery.strip():
      _fail("recovery", f"must be a strategy name or chain, got {self.recovery!r}")
    _check_int(self, "snapshot_every")
    _check_seconds(self, "heartbeat_s", "heartbeat_timeout_s", "progress_timeout_s",
                   "step_timeout_s")
    if not isinstance(self.cache_probe, bool):
      _fail("cache_probe", f"must be True or False, got {self.cache_probe!r}")
    if self.heartbeat_timeout_s <= self.heartbeat_s:
      _fail("heartbeat_timeout_s", f"{self.heartbeat_timeout_s} must exceed the heartbeat "
                                   f"period heartbeat_s {self.heartbeat_s}")


@dataclasses.dataclass(frozen=True)
class AdmissionConfig:
  """What is admitted, and what a failed serve does."""

  max_pending: int | None = _field(None, "admission control: at most this many admitted "
                                         "requests wait for a microbatch slot; one arriving to "
                                         "a full queue is rejected ('queue full'). None: "
                                         "unbounded", int)
  raise_on_error: bool = _field(True, "when serving fails (a stage error, a hang), `serve` "
                                      "raises an EngineError carrying what was served (True) or "
                                      "returns it with ServeResult.error set (False)")

  def __post_init__(self):
    _check_int(self, "max_pending", optional=True)
    if not isinstance(self.raise_on_error, bool):
      _fail("raise_on_error", f"must be True or False, got {self.raise_on_error!r}")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """Microbatch swapping and the device KV budget (runtime/swapping.py, kv/budget.py)."""

  swapping: str = _field("off", "microbatch swapping: 'off' (D device cache buffers per worker) "
                                "| 'on' (every cache in host memory, 2 device buffers) | 'auto' "
                                "(on where the cost model says the swap-in hides under the "
                                "step)")
  device_kv_budget_bytes: int | None = _field(
      None, "device bytes per worker for KV cache buffers; when set it decides the microbatch "
            "size (the largest whose D, or with swapping 2, buffers fit) and microbatch_size is "
            "ignored. None: no budget", int)
  device_kv_budget_fraction: float | None = _field(
      None, "the budget as a fraction in (0, 1] of the device's memory (GPUs); at most one of "
            "the two budgets", float)
  swap_context: int | None = _field(None, "the context length swapping='auto' judges the "
                                          "swap-in at (None: max_len)", int)

  def __post_init__(self):
    _check_choice(self, "swapping", ("off", "on", "auto"), "swapping mode")
    _check_int(self, "device_kv_budget_bytes", optional=True)
    f = self.device_kv_budget_fraction
    if f is not None and (not _is_real(f) or not 0 < f <= 1):
      _fail("device_kv_budget_fraction", f"must be None or in (0, 1], got {f!r}")
    if self.device_kv_budget_bytes is not None and f is not None:
      _fail("device_kv_budget_fraction", "give device_kv_budget_bytes or "
                                         "device_kv_budget_fraction, not both")
    _check_int(self, "swap_context", optional=True)


@dataclasses.dataclass(frozen=True)
class DisaggConfig:
  """Prompt-token disaggregation (serving/disagg_engine.py); 0 stages: the colocated engine."""

  prompt_stages: int = _field(0, "prompt pipeline depth Dp (0 with token_stages 0: colocated; "
                                 "num_stages is then unused)")
  token_stages: int = _field(0, "token pipeline depth Dt, on devices after the prompt "
                                "pipeline's")
  host_slots: int | None = _field(None, "prompt caches each token worker holds in host memory "
                                        "(None: Dp + Dt)", int)
  stream_link: str | None = _field(None, "the prompt -> token link a paced run models "
                                         "(a costmodel.LINKS name; None: free)", str)
  layerwise_stream: bool = _field(True, "prompt workers stream each layer's KV as soon as it is "
                                        "computed (False: one packet per token stage after the "
                                        "whole stage step; the ablation)")

  def __post_init__(self):
    # Whether the two depths pair up, the slots suffice and the link exists is the disaggregated
    # engine's check (DisaggregationError), which knows the model and the devices.
    _check_int(self, "prompt_stages", lo=0)
    _check_int(self, "token_stages", lo=0)
    _check_int(self, "host_slots", lo=0, optional=True)
    if self.stream_link is not None and not isinstance(self.stream_link, str):
      _fail("stream_link", f"must be None or a link name, got {self.stream_link!r}")
    if not isinstance(self.layerwise_stream, bool):
      _fail("layerwise_stream", f"must be True or False, got {self.layerwise_stream!r}")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """Where the workers run (runtime/); the ray_* fields apply to runtime='ray' only."""

  runtime: str = _field("local", "'local' (workers are threads of this process) | 'ray' (one "
                                 "Ray actor process per stage; a failure is a SIGKILL)")
  ray_address: str | None = _field(None, "a running Ray cluster ('auto', 'host:6379'), or None "
                                         "for a local session on 127.0.0.1", str)
  ray_placement: str = _field("pack", "'pack' (stages where they fit) | 'spread' (one stage "
                                      "per node)")
  ray_transport: str = _field("shm", "activations and replicas between actors: 'shm' "
                                     "(replica writes and prompt KV to an actor on the same "
                                     "node through shared memory, the rest as object_store) | "
                                     "'object_store' | 'jax_transfer' "
                                     "(jax.experimental.transfer under a watchdog)")
  ray_gpus_per_stage: float = _field(0.0, "GPUs per stage actor (0: CPU, one device per actor)")
  ray_spares: int = _field(1, "warm spare actors per Ray pipeline (per replica with "
                              "data_parallel): a failed stage's replacement is a started spare "
                              "whose programs are traced; 0: a replacement starts a fresh actor")

  def __post_init__(self):
    _check_choice(self, "runtime", ("local", "ray"))
    _check_int(self, "ray_spares", lo=0)
    _check_choice(self, "ray_placement", ("pack", "spread"))
    _check_choice(self, "ray_transport", ("shm", "object_store", "jax_transfer"))
    v = self.ray_gpus_per_stage
    if not _is_real(v) or not 0 <= v < math.inf:
      _fail("ray_gpus_per_stage", f"must be a number >= 0, got {v!r}")
    if self.ray_address is not None and not isinstance(self.ray_address, str):
      _fail("ray_address", f"must be None or an address string, got {self.ray_address!r}")


@dataclasses.dataclass(frozen=True)
class TimingConfig:
  """How long a stage step lasts."""

  pacing: str = _field("real", "'real' (steps last what they last) | 'paced' (each stage step "
                               "computes for real but lasts the cost model's duration; "
                               "serving/pacing.py)")
  links_table: str | None = _field(None, "a measured link table (benchmarks/transport.py's "
                                         "links.json): paced runs model the prompt -> token "
                                         "stream and host -> device loads over its calibrated "
                                         "links (costmodel.calibrate_links) instead of the "
                                         "presets; the summary records which table", str)

  def __post_init__(self):
    _check_choice(self, "pacing", ("real", "paced"))
    if self.links_table is not None and not isinstance(self.links_table, str):
      _fail("links_table", f"must be None or a path, got {self.links_table!r}")


# group attribute of ServeConfig -> its class, in the order help lists them.
SERVE_GROUPS: dict[str, type] = {
    "topology": TopologyConfig, "sampling": SamplingConfig, "fault": FaultConfig,
    "admission": AdmissionConfig, "memory": MemoryConfig, "disagg": DisaggConfig,
    "cluster": ClusterConfig, "timing": TimingConfig,
}


@dataclasses.dataclass(frozen=True)
class ServeField:
  """One ServeConfig field as declared: its group, name, default, value type and meaning."""
  group: str
  name: str
  default: object
  kind: type
  doc: str

  @property
  def path(self) -> str:
    return f"{self.group}.{self.name}"


def serve_fields() -> tuple[ServeField, ...]:
  """Every ServeConfig field, group by group, from the declarations above."""
  out = []
  for group, cls in SERVE_GROUPS.items():
    for f in dataclasses.fields(cls):
      kind = f.metadata.get("kind") or type(f.default)
      out.append(ServeField(group, f.name, f.default, kind, f.metadata["doc"]))
  return tuple(out)


_FIELD_GROUP: dict[str, str] = {f.name: f.group for f in serve_fields()}
assert len(_FIELD_GROUP) == len(serve_fields()), "ServeConfig field names must be unique"
assert not set(_FIELD_GROUP) & set(SERVE_GROUPS), "a group may not share a field's name"


def serve_field_paths() -> dict[str, str]:
  """Flat field name -> its nested path ("heartbeat_timeout_s" -> "fault.heartbeat_timeout_s"):
  the map that rewrites `sc.<flat>` reads into `sc.<group>.<flat>`."""
  return {name: f"{group}.{name}" for name, group in _FIELD_GROUP.items()}


def serve_help(values: "ServeConfig | None" = None) -> str:
  """Every ServeConfig field, grouped by concern, with its default (or its value in `values`)
  and its meaning."""
  lines = []
  for group, cls in SERVE_GROUPS.items():
    lines.append(f"{group}: {cls.__doc__.splitlines()[0]}")
    for f in dataclasses.fields(cls):
      v = getattr(getattr(values, group), f.name) if values is not None else f.default
      lines.append(f"  {f.name} = {v!r}\n      {f.metadata['doc']}")
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """How a pipeline serves requests (static for the lifetime of an engine), one group per
  concern (`SERVE_GROUPS`; `serve_help()` lists every field with its meaning).

  Built from groups, flat field names, or both (a flat name overrides its group's value):

      ServeConfig(num_stages=2, program="fake", recovery="replica")
      ServeConfig(topology=TopologyConfig(num_stages=2), fault=FaultConfig(recovery="replica"))
      sc.replace(recovery="snapshot")            # flat names or groups, like the constructor

  Read fields by their path, `sc.fault.heartbeat_timeout_s` (`serve_field_paths()`).
  """

  topology: TopologyConfig = dataclasses.field(default_factory=TopologyConfig)
  sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
  fault: FaultConfig = dataclasses.field(default_factory=FaultConfig)
  admission: AdmissionConfig = dataclasses.field(default_factory=AdmissionConfig)
  memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
  disagg: DisaggConfig = dataclasses.field(default_factory=DisaggConfig)
  cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
  timing: TimingConfig = dataclasses.field(default_factory=TimingConfig)

  # Written by hand (dataclass keeps a class's own __init__) so that flat names route into their
  # groups; `dataclasses.replace(sc, recovery=...)` keeps working through it as well.
  def __init__(self, **kw):
    flat: dict[str, dict] = {g: {} for g in SERVE_GROUPS}
    groups = {}
    for key, value in kw.items():
      if key in SERVE_GROUPS:
        if not isinstance(value, SERVE_GROUPS[key]):
          raise TypeError(f"ServeConfig {key} must be a {SERVE_GROUPS[key].__name__}, got "
                          f"{type(value).__name__}")
        groups[key] = value
      elif key in _FIELD_GROUP:
        flat[_FIELD_GROUP[key]][key] = value
      else:
        import difflib  # pylint: disable=g-import-not-at-top
        close = difflib.get_close_matches(key, list(_FIELD_GROUP) + list(SERVE_GROUPS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"ServeConfig has no field {key!r}{hint}")
    for group, cls in SERVE_GROUPS.items():
      base = groups.get(group)
      if base is None:
        value = cls(**flat[group])
      else:
        value = dataclasses.replace(base, **flat[group]) if flat[group] else base
      object.__setattr__(self, group, value)
    self.__post_init__()

  def __post_init__(self):
    # Checks across groups; each group checked its own fields already.
    sc = self.memory.swap_context
    if sc is not None and sc > self.topology.max_len:
      _fail("swap_context", f"must be None or an integer in [1, max_len "
                            f"{self.topology.max_len}], got {sc!r}")

  def replace(self, **kw) -> "ServeConfig":
    """A copy with fields (flat names) or whole groups replaced."""
    return ServeConfig(**{**{g: getattr(self, g) for g in SERVE_GROUPS}, **kw})

  def flat(self) -> dict[str, object]:
    """Every field by its flat name."""
    return {name: getattr(getattr(self, group), name) for name, group in _FIELD_GROUP.items()}


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)
