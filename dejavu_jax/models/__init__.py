"""Flax decoders of every registered family (OPT, GPT-2, Llama, BLOOM: models/families/) built as
stages over layer ranges, with an explicit KV cache."""

from dejavu_jax.models.decoder import (DecoderStage, init_params, param_shapes, stage_apply,
                                       stage_params, stage_param_names)

__all__ = ["DecoderStage", "init_params", "param_shapes", "stage_apply", "stage_params",
           "stage_param_names"]
