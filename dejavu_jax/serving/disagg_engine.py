"""The disaggregated engine's names, kept for callers: one engine class serves both shapes
(serving/engine.py), the prompt path (serving/prompt_path.py) follows the config."""

from __future__ import annotations

from dejavu_jax.config import ModelConfig, ServeConfig
from dejavu_jax.serving.disagg_split import DisaggregationError, check_split  # noqa: F401
from dejavu_jax.serving.engine import PipelineEngine, make_engine  # noqa: F401


def DisaggregatedEngine(cfg: ModelConfig, params, serve: ServeConfig, **kw) -> PipelineEngine:  # pylint: disable=invalid-name
  """A `PipelineEngine` whose config must name a prompt/token split (checked by name)."""
  if not (serve.disagg.prompt_stages or serve.disagg.token_stages):
    check_split(cfg, serve, 0)   # names the missing prompt_stages / token_stages
  return PipelineEngine(cfg, params, serve, **kw)
