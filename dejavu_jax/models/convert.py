"""Hugging Face checkpoint directory (config.json + safetensors or pytorch_model.bin) -> params.

Reads only local files: nothing is fetched at run time. Shapes are checked against the config
and a mismatch is a ValueError naming the parameter.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import ModelConfig
from dejavu_jax.models import gpt2, opt
from dejavu_jax.models.decoder import param_shapes

_FAMILIES = {"opt": opt, "gpt2": gpt2}


def load_hf_config(path: str, dtype: str | None = None) -> ModelConfig:
  """ModelConfig from `path`/config.json (model_type 'opt' or 'gpt2')."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise ValueError(f"no config.json in checkpoint directory {path!r}")
  with open(cfg_file) as f:
    hf = json.load(f)
  family = hf.get("model_type")
  if family not in _FAMILIES:
    raise ValueError(f"unsupported model_type {family!r} in {cfg_file}; expected 'opt' or 'gpt2'")
  cfg = _FAMILIES[family].config_from_hf(hf, name=os.path.basename(os.path.normpath(path)))
  return cfg.replace(dtype=dtype) if dtype else cfg


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory as numpy arrays (float32 for half-precision files)."""
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  sd: dict[str, np.ndarray] = {}
  if files:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    for f in files:
      try:
        sd.update(safetensors.numpy.load_file(os.path.join(path, f)))
      except TypeError:  # bfloat16 has no numpy dtype: go through torch
        sd.update(_torch_safetensors(os.path.join(path, f)))
    return sd
  bins = sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
  if not bins:
    raise ValueError(f"no *.safetensors or pytorch_model*.bin weights in {path!r}")
  import torch  # pylint: disable=g-import-not-at-top
  for f in bins:
    # weights_only: a pickle may not run code on load.
    state = torch.load(os.path.join(path, f), map_location="cpu", weights_only=True)
    sd.update({k: v.float().numpy() if v.is_floating_point() else v.numpy()
               for k, v in state.items()})
  return sd


def _torch_safetensors(file: str) -> dict[str, np.ndarray]:
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in safetensors.torch.load_file(file).items()}


def params_from_state_dict(cfg: ModelConfig, sd: dict[str, np.ndarray]):
  """Maps a HF state dict to this project's params tree, checked and cast to cfg.dtype."""
  family = _FAMILIES[cfg.family]
  sd = family.strip_prefix(sd)
  try:
    raw = family.params_from_hf(cfg, sd)
  except KeyError as e:
    raise ValueError(f"checkpoint lacks tensor {e.args[0]!r} required by the config") from None
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
