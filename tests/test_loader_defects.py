"""Checkpoint-loading defects an outside check found, each fixed: untied LM heads, GPT-2 without
score scaling, null special ids, and named refusals for broken files, missing fields, unused
tensors and non-finite weights (transformers `save_pretrained` directories)."""

import json
import os

import numpy as np
import pytest
import torch

from dejavu_jax.config import tiny_config
from dejavu_jax.kv.cache import init_cache_for
from dejavu_jax.models.convert import load_hf_checkpoint
from dejavu_jax.models.decoder import stage_apply
from dejavu_jax.models.generate import generate, pad_prompts
from tests import hf_util

TOL = 1e-4


def _save(cfg, path, **config_edits):
  """A random HF model of `cfg` saved to `path`, with config.json fields edited (None: removed)."""
  model = hf_util.hf_model(cfg)
  model.save_pretrained(path)
  if config_edits:
    _edit_config(path, **config_edits)
  return model


def _edit_config(path, **edits):
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  for k, v in edits.items():
    if v is _DROP:
      hf.pop(k, None)
    else:
      hf[k] = v
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)


_DROP = object()


def _max_logit_error(cfg, params, model):
  seq = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
  tokens, positions = pad_prompts(seq, 16, cfg.pad_token_id)
  _, got = stage_apply(cfg, 0, cfg.num_layers, params, init_cache_for(cfg, cfg.num_layers, 2, 16),
                       tokens, positions)
  return float(np.abs(np.asarray(got)[:, :12] - hf_util.hf_logits(model, seq)).max())


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama", "bloom"])
def test_untied_lm_head_is_loaded_and_used(tmp_path, family):
  cfg = tiny_config(family, tie_word_embeddings=False)
  model = _save(cfg, tmp_path)
  loaded, params = load_hf_checkpoint(str(tmp_path))
  assert not loaded.tie_word_embeddings and "lm_head" in params
  np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                model.state_dict()["lm_head.weight"].numpy().T)
  assert _max_logit_error(loaded, params, model) <= TOL


def test_gpt2_without_attention_scaling(tmp_path):
  cfg = tiny_config("gpt2", attn_scale=1.0)
  model = _save(cfg, tmp_path)
  assert not model.config.scale_attn_weights
  loaded, params = load_hf_checkpoint(str(tmp_path))
  assert loaded.attn_scale == 1.0
  assert _max_logit_error(loaded, params, model) <= TOL


@pytest.mark.parametrize("family,field", [("opt", "pad_token_id"), ("gpt2", "eos_token_id"),
                                          ("gpt2", "pad_token_id"), ("llama", "pad_token_id")])
def test_null_special_ids_still_generate(tmp_path, family, field):
  cfg = tiny_config(family)
  model = _save(cfg, tmp_path, **{field: None})
  loaded, params = load_hf_checkpoint(str(tmp_path))
  assert 0 <= loaded.pad_token_id < loaded.vocab_size
  if field == "eos_token_id":
    assert loaded.eos_token_id is None  # no stop token: every row runs to max_new_tokens
  prompts = [[5, 17, 33, 40, 9], [8, 3]]
  out = generate(loaded, params, prompts, 6)
  assert all(len(o) <= 6 for o in out)
  with torch.no_grad():
    ref = model.generate(torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, 5:]
  assert generate(loaded, params, prompts[:1], 6, eos_token_id=-1)[0] == ref.tolist()


@pytest.mark.parametrize("family,field", [("opt", "ffn_dim"), ("opt", "hidden_size"),
                                          ("gpt2", "n_embd"), ("llama", "intermediate_size"),
                                          ("bloom", "vocab_size")])
def test_missing_size_field_is_named_with_the_file(tmp_path, family, field):
  _save(tiny_config(family), tmp_path, **{field: _DROP})
  with pytest.raises(ValueError, match=rf"config\.json.*lacks the required field '{field}'"):
    load_hf_checkpoint(str(tmp_path))


@pytest.mark.parametrize("field", ["reorder_and_upcast_attn", "scale_attn_by_inverse_layer_idx"])
def test_gpt2_refusals_name_the_field(tmp_path, field):
  _save(tiny_config("gpt2"), tmp_path, **{field: True})
  with pytest.raises(ValueError, match=rf"config\.json.*{field}=True is not supported"):
    load_hf_checkpoint(str(tmp_path))


def _weights_file(path):
  (f,) = [f for f in os.listdir(path) if f.endswith(".safetensors")]
  return os.path.join(path, f)


@pytest.mark.parametrize("damage", ["empty", "truncated", "corrupt"])
def test_broken_safetensors_name_the_file(tmp_path, damage):
  _save(tiny_config("opt"), tmp_path)
  file = _weights_file(tmp_path)
  data = open(file, "rb").read()
  if damage == "empty":
    data = b""
  elif damage == "truncated":
    data = data[:len(data) // 2]
  else:  # garbage where the header's JSON is
    data = data[:8] + b"\xff" * 64 + data[72:]
  open(file, "wb").write(data)
  with pytest.raises(ValueError, match=rf"weights file {file}"):
    load_hf_checkpoint(str(tmp_path))


def test_invalid_config_json_names_the_file(tmp_path):
  _save(tiny_config("opt"), tmp_path)
  (tmp_path / "config.json").write_text('{"model_type": "opt", "hidden_size": ')
  with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
    load_hf_checkpoint(str(tmp_path))


@pytest.mark.parametrize("family,layer_key", [("opt", "decoder.layers.2."),
                                              ("llama", "model.layers.2."),
                                              ("bloom", "transformer.h.2.")])
def test_fewer_layers_than_the_checkpoint_is_refused(tmp_path, family, layer_key):
  cfg = tiny_config(family)
  field = {"bloom": "n_layer"}.get(family, "num_hidden_layers")
  _save(cfg, tmp_path, **{field: 2})
  with pytest.raises(ValueError, match=rf"does not use.*num_layers=2.*{layer_key}"):
    load_hf_checkpoint(str(tmp_path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
  cfg = tiny_config("opt")
  model = hf_util.hf_model(cfg)
  with torch.no_grad():
    model.model.decoder.layers[1].fc1.weight[3, 5] = bad
  model.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r"'decoder\.layers\.1\.fc1\.weight' has NaN or infinite"):
    load_hf_checkpoint(str(tmp_path))
