"""Every preset builds under jax.eval_shape, with the parameter count of its Hugging Face config."""

import math

import jax
import pytest
import torch

from dejavu_jax.config import PRESETS, get_model_config, tiny_config
from dejavu_jax.models import param_shapes
from tests import hf_util

MODEL_PRESETS = list(PRESETS)


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_preset_eval_shape_and_param_count(name):
  cfg = get_model_config(name)
  shapes = param_shapes(cfg)
  count = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
  assert count == cfg.param_count()
  with torch.device("meta"):  # no weights allocated
    hf = hf_util.hf_class(cfg)(hf_util.hf_config(cfg))
  # HF counts the tied LM head once (parameters() deduplicates shared tensors).
  assert count == sum(p.numel() for p in hf.parameters())


def test_known_sizes():
  assert round(get_model_config("opt_125m").param_count() / 1e6) == 125
  assert round(get_model_config("opt_66b").param_count() / 1e9) == 66
  assert round(get_model_config("gpt2_xl").param_count() / 1e9, 1) == 1.6
  assert round(get_model_config("llama2_7b").param_count() / 1e9, 2) == 6.74
  assert round(get_model_config("llama3_8b").param_count() / 1e9, 2) == 8.03
  assert round(get_model_config("smollm2_135m").param_count() / 1e6) == 135
  assert round(get_model_config("bloom_560m").param_count() / 1e6) == 559
  assert round(get_model_config("bloom_176b").param_count() / 1e9) == 176


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_param_dtypes(dtype):
  shapes = param_shapes(get_model_config("opt_350m", dtype=dtype))
  assert {str(s.dtype) for s in jax.tree.leaves(shapes)} == {dtype}


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="unknown model preset 'opt_7b'"):
    get_model_config("opt_7b")


def test_stage_shapes_partition_the_model():
  cfg = tiny_config("opt", word_embed_proj_dim=32, pre_layer_norm=False)
  whole = param_shapes(cfg)
  first, last = param_shapes(cfg, 0, 2), param_shapes(cfg, 2, 4)
  assert set(first) | set(last) == set(whole)
  assert set(first) & set(last) == {"embed_tokens"}  # tied LM head lives on the last stage too
