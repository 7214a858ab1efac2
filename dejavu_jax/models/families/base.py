"""What a model family is: the `Family` record every family module fills in, plus the helpers
their Hugging Face converters share (reading config fields, torch Linear -> Flax Dense).

A family owns everything that differs between decoder architectures: the norm, the MLP's
activation and gating, the position scheme (learned table, RoPE on q/k, ALiBi bias on the scores),
whether linear layers carry biases, where the attention scale is applied, the Hugging Face names,
and the logical axes of its parameters (which `pipeline/plan.py` maps onto the mesh). The blocks
in `models/layers.py` and `models/decoder.py` read these fields; they never compare family names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import linen as nn

from dejavu_jax.config import FamilyTraits

# Logical axes of the weights every family shares (Megatron: q/k/v and the MLP's input
# projections split by output features, out_proj and the MLP's output projection by input
# features). "embed" is never split; "heads", "kv_heads" and "mlp" are what tensor parallelism
# splits (see pipeline/plan.py).
ATTENTION_AXES: dict[str, dict[str, tuple[str, ...]]] = {
    "q_proj": {"kernel": ("embed", "heads"), "bias": ("heads",)},
    "k_proj": {"kernel": ("embed", "kv_heads"), "bias": ("kv_heads",)},
    "v_proj": {"kernel": ("embed", "kv_heads"), "bias": ("kv_heads",)},
    "out_proj": {"kernel": ("heads", "embed"), "bias": ("embed",)},
}
MLP_AXES = {
    "fc1": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
    "fc2": {"kernel": ("mlp", "embed"), "bias": ("embed",)},
}
GATED_MLP_AXES = {
    "gate_proj": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
    "up_proj": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
    "down_proj": {"kernel": ("mlp", "embed"), "bias": ("embed",)},
}


@dataclasses.dataclass(frozen=True)
class Family:
  """One decoder family (static: blocks branch on these fields at trace time).

  Attributes:
    traits: the shape-level traits (`config.FAMILY_TRAITS`: norm, gated_mlp, positions,
      position_offset, bias, embed_norm, tiny), readable here as attributes of the family.
    model_types: Hugging Face `model_type` values this family loads.
    activation: the MLP nonlinearity.
    scale_queries: q is scaled before q.k (OPT) instead of the scores after (everyone else); kept
      apart so float32 logits match Hugging Face to the last bits.
    param_axes: parameter owner name -> leaf -> logical axes (see ATTENTION_AXES).
    config_from_hf(hf: dict, name: str) -> ModelConfig.
    params_from_hf(cfg, tensors: dict[str, np.ndarray]) -> params tree (HF names, prefix stripped).
    strip_prefix(tensors) -> tensors with the names params_from_hf expects.
    ignored: regexes of checkpoint tensors that carry no weights (buffers such as GPT-2's causal
      mask); any other tensor the mapping does not use is an error.
  """

  traits: FamilyTraits
  model_types: tuple[str, ...]
  activation: Callable[[Any], Any]
  config_from_hf: Callable[..., Any]
  params_from_hf: Callable[..., dict]
  strip_prefix: Callable[[dict], dict]
  scale_queries: bool = False
  param_axes: Mapping[str, Mapping[str, tuple[str, ...]]] = dataclasses.field(
      default_factory=lambda: {**ATTENTION_AXES, **MLP_AXES})
  ignored: tuple[str, ...] = ()

  def __getattr__(self, name: str):
    # name, norm, gated_mlp, positions, position_offset, bias, embed_norm, tiny: declared once,
    # in config.FAMILY_TRAITS (the layer below), and read here as the family's own.
    if name != "traits" and name in FamilyTraits.__dataclass_fields__:
      return getattr(self.traits, name)
    raise AttributeError(name)

  def __hash__(self):  # param_axes is a dict: hash by name (one record per family)
    return hash(self.name)

  def is_ignored(self, tensor_name: str) -> bool:
    return any(re.search(p, tensor_name) for p in self.ignored)


# ---- config.json helpers ----
def field(hf: dict, key: str, family: str):
  """hf[key], or a ValueError naming the missing field (not a bare KeyError)."""
  if hf.get(key) is None:
    raise ValueError(f"{family} config lacks the required field {key!r}")
  return hf[key]


def token_id(value) -> int | None:
  """A special token id from config.json: an int, the first of a list, or None."""
  if isinstance(value, (list, tuple)):
    value = value[0] if value else None
  return None if value is None else int(value)


def special_ids(hf: dict, eos_default: int | None) -> dict:
  """eos_token_id and pad_token_id for ModelConfig.

  eos: the config's (the first of a list), else `eos_default` when the key is absent; an explicit
  null means the model has no stop token (None). pad: the config's, else eos, else 0. Padding
  tokens are never attended (their positions are -1), so any id in the vocabulary is sound.
  """
  eos = token_id(hf["eos_token_id"]) if "eos_token_id" in hf else eos_default
  pad = token_id(hf.get("pad_token_id"))
  if pad is None:
    pad = eos if eos is not None else 0
  return {"eos_token_id": eos, "pad_token_id": pad}


def refuse(hf: dict, family: str, **unsupported) -> None:
  """Raises a ValueError naming the first option set to a value we do not implement.
  unsupported: field name -> the value we implement (a field absent from hf is fine)."""
  for key, ok in unsupported.items():
    if key in hf and hf[key] is not None and hf[key] != ok:
      raise ValueError(f"{family} config field {key}={hf[key]!r} is not supported "
                       f"(only {key}={ok!r})")


# ---- weight helpers ----
def linear(sd: dict, prefix: str) -> dict:
  """torch Linear `prefix` ([out, in] weight, optional bias) -> Flax Dense ([in, out] kernel)."""
  out = {"kernel": np.ascontiguousarray(sd[prefix + ".weight"].T)}
  if prefix + ".bias" in sd:
    out["bias"] = sd[prefix + ".bias"]
  return out


def layer_norm(sd: dict, prefix: str) -> dict:
  return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def rms_norm(sd: dict, prefix: str) -> dict:
  return {"scale": sd[prefix + ".weight"]}


def head(cfg, sd: dict, embed_key: str) -> dict:
  """Token embedding, plus the untied LM head when the config has one ([V, E] -> [E, V])."""
  p = {"embed_tokens": {"embedding": sd[embed_key]}}
  if not cfg.tie_word_embeddings:
    p["lm_head"] = {"kernel": np.ascontiguousarray(sd["lm_head.weight"].T)}
  return p


def with_prefix(sd: dict, prefix: str, keep: tuple[str, ...] = ("lm_head.",),
                drop: str | None = None) -> dict:
  """Tensor names normalised to start with `prefix` (keys in `keep` stay as they are); `drop` is
  a leading wrapper (e.g. "model.") removed first."""
  out = {}
  for k, v in sd.items():
    if drop and k.startswith(drop):
      k = k[len(drop):]
    if not k.startswith(prefix) and not k.startswith(keep):
      k = prefix + k
    out[k] = v
  return out


def gelu_tanh(x):
  """GELU, tanh approximation (GPT-2's gelu_new; BLOOM's bloom_gelu_forward is the same formula
  with sqrt(2/pi) rounded to 0.79788456, a 1e-10 relative difference)."""
  return nn.gelu(x, approximate=True)
