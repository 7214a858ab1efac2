"""Hugging Face checkpoint directory (config.json + safetensors or pytorch_model.bin) -> params.

Reads only local files: nothing is fetched at run time. The family comes from config.json's
`model_type` through the registry (models/families/). Every refusal is a ValueError that names
the file, field, tensor or parameter at fault: an unreadable or invalid config.json or weights
file, a missing config field, a tensor the config needs but the checkpoint lacks, a tensor the
checkpoint has but the config does not use (e.g. layers beyond num_layers), a shape that
disagrees with the config, and NaN or infinite weights.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import ModelConfig
from dejavu_jax.models import families
from dejavu_jax.models.decoder import param_shapes


def load_hf_config(path: str, dtype: str | None = None) -> ModelConfig:
  """ModelConfig from `path`/config.json (any registered family's model_type)."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise ValueError(f"no config.json in checkpoint directory {path!r}")
  try:
    with open(cfg_file) as f:
      hf = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{cfg_file} must hold a JSON object, got {type(hf).__name__}")
  try:
    family = families.for_model_type(hf.get("model_type"))
    cfg = family.config_from_hf(hf, name=os.path.basename(os.path.normpath(path)))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{cfg_file}: {e}") from None
  return cfg.replace(dtype=dtype) if dtype else cfg


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory as numpy arrays (float32 for half-precision files)."""
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  sd: dict[str, np.ndarray] = {}
  if files:
    for f in files:
      sd.update(_read_safetensors(os.path.join(path, f)))
    return sd
  bins = sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
  if not bins:
    raise ValueError(f"no *.safetensors or pytorch_model*.bin weights in {path!r}")
  import torch  # pylint: disable=g-import-not-at-top
  for f in bins:
    file = os.path.join(path, f)
    try:
      # weights_only: a pickle may not run code on load.
      state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except  # torch raises many kinds
      raise ValueError(f"cannot read weights file {file}: {e}") from None
    sd.update({k: v.float().numpy() if v.is_floating_point() else v.numpy()
               for k, v in state.items()})
  return sd


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  if os.path.getsize(file) == 0:
    raise ValueError(f"weights file {file} is empty")
  try:
    try:
      return safetensors.numpy.load_file(file)
    except TypeError:  # bfloat16 has no numpy dtype: go through torch
      import safetensors.torch  # pylint: disable=g-import-not-at-top
      return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
              for k, v in safetensors.torch.load_file(file).items()}
  except Exception as e:  # pylint: disable=broad-except  # SafetensorError, OSError, ...
    raise ValueError(f"cannot read weights file {file} (corrupt or truncated?): {e}") from None


class _Tracked(dict):
  """A state dict that remembers which tensors a family's mapping read."""

  def __init__(self, *a, **kw):
    super().__init__(*a, **kw)
    self.used: set[str] = set()

  def __getitem__(self, key):
    value = super().__getitem__(key)
    self.used.add(key)
    return value


def params_from_state_dict(cfg: ModelConfig, sd: dict[str, np.ndarray]):
  """Maps a HF state dict to this project's params tree, checked and cast to cfg.dtype.

  Raises ValueError naming: a tensor the config needs that is missing, tensors present but unused
  (beyond the family's ignored buffers and a tied model's redundant lm_head.weight), a shape the
  config does not imply, a tensor with NaN or infinite values."""
  family = families.get(cfg.family)
  sd = _Tracked(family.strip_prefix(sd))
  try:
    raw = family.params_from_hf(cfg, sd)
  except KeyError as e:
    raise ValueError(f"checkpoint lacks tensor {e.args[0]!r} required by the config") from None
  unused = sorted(k for k in sd if k not in sd.used and not family.is_ignored(k)
                  and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
  if unused:
    more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
    raise ValueError(f"checkpoint has {len(unused)} tensors the config does not use (does "
                     f"num_layers={cfg.num_layers} match the checkpoint?): "
                     f"{', '.join(unused[:8])}{more}")
  for k in sorted(sd.used):
    a = dict.__getitem__(sd, k)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
      raise ValueError(f"checkpoint tensor {k!r} has NaN or infinite values")
  expected = param_shapes(cfg)
  flat_raw = dict(jax.tree_util.tree_flatten_with_path(raw)[0])
  flat_exp = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  for path, spec in flat_exp.items():
    name = jax.tree_util.keystr(path)
    if path not in flat_raw:
      raise ValueError(f"checkpoint lacks parameter {name}")
    if tuple(flat_raw[path].shape) != tuple(spec.shape):
      raise ValueError(f"parameter {name} has shape {tuple(flat_raw[path].shape)} in the "
                       f"checkpoint but the config implies {tuple(spec.shape)}")
  return jax.tree.map(lambda a, s: jnp.asarray(a, dtype=s.dtype), raw, expected)


def load_hf_checkpoint(path: str, dtype: str | None = None):
  """(ModelConfig, params) from a local Hugging Face checkpoint directory."""
  cfg = load_hf_config(path, dtype)
  return cfg, params_from_state_dict(cfg, read_state_dict(path))
