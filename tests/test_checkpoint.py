"""HF checkpoint directory -> params -> orbax -> params is bit-exact; bad checkpoints are named."""

import json
import os

import jax
import numpy as np
import pytest
import torch

from dejavu_jax.config import tiny_config
from dejavu_jax.models import param_shapes, stage_params
from dejavu_jax.models.checkpoint import restore_params, save_params
from dejavu_jax.models.convert import load_hf_checkpoint
from tests import hf_util


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama", "bloom"])
def test_hf_to_orbax_roundtrip_bit_exact(tmp_path, family):
  cfg = tiny_config(family)
  model = hf_util.hf_model(cfg)
  model.save_pretrained(tmp_path / "hf")
  _, params = load_hf_checkpoint(str(tmp_path / "hf"))
  save_params(str(tmp_path / "orbax"), params)
  back = restore_params(str(tmp_path / "orbax"), like=param_shapes(cfg))
  jax.tree.map(np.testing.assert_array_equal, params, back)
  # A stage restores just its own subset.
  sub = restore_params(str(tmp_path / "orbax"), like=param_shapes(cfg, 2, 4))
  jax.tree.map(np.testing.assert_array_equal, stage_params(cfg, params, 2, 4), sub)
  # And the values are the torch ones (e.g. one q projection, transposed for OPT).
  sd = model.state_dict()
  if family == "opt":
    np.testing.assert_array_equal(params["layers_1"]["attn"]["q_proj"]["kernel"],
                                  sd["model.decoder.layers.1.self_attn.q_proj.weight"].numpy().T)


def test_pytorch_bin_checkpoint(tmp_path):
  cfg = tiny_config("opt")
  model = hf_util.hf_model(cfg)
  model.save_pretrained(tmp_path / "st")
  model.save_pretrained(tmp_path / "bin", safe_serialization=False)
  if not any(f.endswith(".bin") for f in os.listdir(tmp_path / "bin")):
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for f in os.listdir(tmp_path / "bin"):
      if f.endswith(".safetensors"):
        os.remove(tmp_path / "bin" / f)
  a = load_hf_checkpoint(str(tmp_path / "st"))[1]
  b = load_hf_checkpoint(str(tmp_path / "bin"))[1]
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_half_precision_load(tmp_path):
  cfg = tiny_config("gpt2")
  hf_util.hf_model(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
  loaded_cfg, params = load_hf_checkpoint(str(tmp_path), dtype="bfloat16")
  assert loaded_cfg.dtype == "bfloat16"
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}


def test_shape_mismatch_is_named(tmp_path):
  cfg = tiny_config("opt")
  hf_util.hf_model(cfg).save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as f:
    hf = json.load(f)
  hf["ffn_dim"] = 96  # the weights say 128
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(ValueError, match=r"layers_0.*fc1.*has shape \(128,\) in the checkpoint but the config implies \(96,\)"):
    load_hf_checkpoint(str(tmp_path))


def test_missing_pieces_are_named(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    load_hf_checkpoint(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
  with pytest.raises(ValueError, match="unsupported model_type 'mamba'"):
    load_hf_checkpoint(str(tmp_path))
  with pytest.raises(ValueError, match="no checkpoint"):
    restore_params(str(tmp_path / "nothing"))
